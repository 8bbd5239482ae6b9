"""VG-LAW: language adaptive weight generation for multi-task visual grounding, in PyTorch.

Nothing in this package imports Ray, MLflow or ``torch.distributed``; the pipeline lives in ``pipelines``.
"""

from vglaw.checkpoint import load_pretrained, save_pretrained
from vglaw.config import AdaptiveConfig, HeadConfig, TextConfig, VGLAWConfig, VisionConfig
from vglaw.model import VGLAW, VGLAWOutput
from vglaw.predictor import Grounding, Predictor
from vglaw.registry import create_model, get_config, list_models
from vglaw.tokenizer import ExpressionTokenizer

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
