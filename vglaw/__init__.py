"""VG-LAW: language adaptive weight generation for multi-task visual grounding, in PyTorch.

Nothing in this package imports Ray, MLflow or ``torch.distributed``; the pipeline lives in ``pipelines``.
The names below load on first use (PEP 562), so that ``vglaw.geometry`` or ``vglaw.safe_pickle`` alone,
which the data pipeline's workers need, do not import torch, timm and transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vglaw.checkpoint import load_pretrained, save_pretrained
    from vglaw.config import AdaptiveConfig, HeadConfig, TextConfig, VGLAWConfig, VisionConfig
    from vglaw.model import VGLAW, VGLAWOutput
    from vglaw.predictor import Grounding, Predictor
    from vglaw.registry import create_model, get_config, list_models
    from vglaw.tokenizer import ExpressionTokenizer

_EXPORTS = {
    "load_pretrained": "vglaw.checkpoint",
    "save_pretrained": "vglaw.checkpoint",
    "AdaptiveConfig": "vglaw.config",
    "HeadConfig": "vglaw.config",
    "TextConfig": "vglaw.config",
    "VGLAWConfig": "vglaw.config",
    "VisionConfig": "vglaw.config",
    "VGLAW": "vglaw.model",
    "VGLAWOutput": "vglaw.model",
    "Grounding": "vglaw.predictor",
    "Predictor": "vglaw.predictor",
    "create_model": "vglaw.registry",
    "get_config": "vglaw.registry",
    "list_models": "vglaw.registry",
    "ExpressionTokenizer": "vglaw.tokenizer",
}

__all__ = [
    "VGLAW",
    "AdaptiveConfig",
    "ExpressionTokenizer",
    "Grounding",
    "HeadConfig",
    "Predictor",
    "TextConfig",
    "VGLAWConfig",
    "VGLAWOutput",
    "VisionConfig",
    "create_model",
    "get_config",
    "list_models",
    "load_pretrained",
    "save_pretrained",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # A submodule, as after ``import vglaw.weights``: ``import vglaw`` then ``vglaw.weights.load_vit_weights``.
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'vglaw' has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
