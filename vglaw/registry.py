"""Named model sizes, in the style of ``timm.create_model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vglaw.config import AdaptiveConfig, HeadConfig, TextConfig, VGLAWConfig, VisionConfig

if TYPE_CHECKING:
    from vglaw.model import VGLAW

_PRESETS: dict[str, Callable[[], VGLAWConfig]] = {}


def register_preset(fn: Callable[[], VGLAWConfig]) -> Callable[[], VGLAWConfig]:
    """Register ``fn`` (returning a config) under its function name."""
    _PRESETS[fn.__name__] = fn
    return fn


@register_preset
def base() -> VGLAWConfig:
    """The paper's model: ViT-B/16 at 448 (ViTDet layout), BERT-base first 6 layers, G=12, r=16, d_w=32."""
    return VGLAWConfig(name="base")


@register_preset
def small() -> VGLAWConfig:
    """A CPU-trainable model for the synthetic dataset and demos: 256 px, 6 blocks of width 192."""
    return VGLAWConfig(
        name="small",
        vision=VisionConfig(
            image_size=256,
            embed_dim=192,
            depth=6,
            num_heads=3,
            window_size=8,
            global_blocks=(2, 5),
            drop_path=0.05,
        ),
        text=TextConfig(
            num_layers=2, hidden_size=192, num_attention_heads=3, intermediate_size=768, vocab_size=8192, init_std=0.1
        ),
        adaptive=AdaptiveConfig(groups=3, reduction=16, rank=16),
        head=HeadConfig(pool_dim=64, box_hidden=128, mask_hidden=96),
    )


@register_preset
def tiny() -> VGLAWConfig:
    """The smallest complete model: a full forward and backward on the CPU in well under a second."""
    return VGLAWConfig(
        name="tiny",
        vision=VisionConfig(
            image_size=128,
            embed_dim=128,
            depth=4,
            num_heads=4,
            window_size=4,
            global_blocks=(1, 3),
            drop_path=0.0,
        ),
        text=TextConfig(
            num_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=256, vocab_size=4096, init_std=0.1
        ),
        adaptive=AdaptiveConfig(groups=4, reduction=16, rank=16),
        head=HeadConfig(pool_dim=32, box_hidden=64, mask_hidden=64),
    )


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, smallest last."""
    return list(_PRESETS)


def get_config(name: str, **overrides: Any) -> VGLAWConfig:
    """The preset's config with ``overrides`` applied (see :meth:`VGLAWConfig.replace`)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model '{name}'; choose one of {list_models()}")
    config = _PRESETS[name]()
    return config.replace(**overrides) if overrides else config


def create_model(name: str, **overrides: Any) -> VGLAW:
    """Build a randomly initialised VG-LAW model by preset name.

    Example:
        ``create_model("tiny", tasks=("rec",), vocab_size=tokenizer.vocab_size)``
    """
    from vglaw.model import VGLAW

    return VGLAW(get_config(name, **overrides))
