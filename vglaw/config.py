"""Typed configuration for VG-LAW models.

A model is described by one :class:`VGLAWConfig` tree. Presets (see :mod:`vglaw.registry`) derive from these
defaults, which are the paper's ``base`` model, and change a few fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Task = Literal["rec", "res"]
STEMS = ("patch", "patch+conv")  # VisionConfig.stem


@dataclass
class VisionConfig:
    """ViTDet-style visual backbone (spec item 4)."""

    image_size: int = 448
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)
    use_rel_pos: bool = True
    drop_path: float = 0.1
    norm_eps: float = 1e-6
    # How pixels become tokens: "patch", ViTDet's (one linear projection of each patch, what pretrained
    # checkpoints hold), or "patch+conv", that projection plus a branch of 3x3 stride-2 convolutions (for models
    # trained from scratch; see vglaw.vision.PatchConvEmbed)
    stem: str = "patch"

    def __post_init__(self) -> None:
        self.global_blocks = tuple(int(i) for i in self.global_blocks)
        _require(self.stem in STEMS, f"stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        _require(
            self.stem == "patch" or (self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0),
            f"the {self.stem} stem halves the resolution per layer: patch_size {self.patch_size} is not a power of 2",
        )
        _require(self.image_size > 0 and self.patch_size > 0, "image_size and patch_size must be positive")
        _require(
            self.image_size % self.patch_size == 0,
            f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}",
        )
        _require(self.depth > 0, "depth must be positive")
        _require(
            self.embed_dim % self.num_heads == 0,
            f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
        )
        _require(self.window_size >= 0, "window_size must be >= 0 (0 means global attention everywhere)")
        bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
        _require(not bad, f"global_blocks {bad} are outside 0..{self.depth - 1}")
        _require(0.0 <= self.drop_path < 1.0, "drop_path must be in [0, 1)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """BERT language backbone (spec item 1)."""

    num_layers: int = 6
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_tokens: int = 40
    max_position_embeddings: int = 512
    # Std of the random initialisation when no pretrained BERT is loaded. BERT's 0.02 leaves a freshly
    # initialised encoder's [CLS] almost the same for every expression (about 1% apart at the tiny size),
    # which starves the heads of language; models trained from scratch use a wider start.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _require(self.num_layers > 0, "num_layers must be positive")
        _require(self.init_std > 0, "init_std must be positive")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        _require(self.vocab_size > 5, "vocab_size is too small to hold the special tokens")
        _require(
            2 < self.max_tokens <= self.max_position_embeddings,
            "max_tokens must leave room for [CLS]/[SEP] and fit max_position_embeddings",
        )


@dataclass
class AdaptiveConfig:
    """Language feature aggregation and weight generation (spec items 2 and 3)."""

    enabled: bool = True  # False gives the static-backbone ablation: language reaches the heads only
    groups: int = 12
    reduction: int = 16
    rank: int = 32  # d_w

    def __post_init__(self) -> None:
        _require(self.groups > 0 and self.reduction > 0 and self.rank > 0, "groups, reduction, rank > 0")


@dataclass
class HeadConfig:
    """Multi-task head (spec items 5 and 6)."""

    tasks: tuple[Task, ...] = ("rec", "res")
    pool_dim: int = 64  # LAP key/query width k
    box_hidden: int = 256
    mask_hidden: int = 256
    mask_threshold: float = 0.35
    # Not in the paper (0: none): a linear classifier of the referred object's category on LAP's pooled feature,
    # trained by ``loss.category``; category ids must be below this. The paper's ViT comes from a COCO
    # detector and already tells categories apart; one trained from scratch learns colour and position long
    # before shape (docs/training.md).
    categories: int = 0

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        _require(len(self.tasks) > 0, "at least one task ('rec', 'res') is needed")
        _require(set(self.tasks) <= {"rec", "res"}, f"unknown tasks in {self.tasks}; use 'rec' and/or 'res'")
        _require(len(set(self.tasks)) == len(self.tasks), f"repeated task in {self.tasks}")
        _require(0.0 < self.mask_threshold < 1.0, "mask_threshold must be in (0, 1)")
        _require(
            isinstance(self.categories, int) and not isinstance(self.categories, bool) and self.categories >= 0,
            f"categories must be an integer >= 0, got {self.categories!r}",
        )
        _require(self.categories == 0 or "rec" in self.tasks, "the category classifier needs the 'rec' branch")


@dataclass
class VGLAWConfig:
    """The whole model."""

    name: str = "base"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        _require(
            self.text.hidden_size % self.adaptive.groups == 0,
            f"text hidden_size {self.text.hidden_size} is not divisible by groups {self.adaptive.groups}",
        )
        _require(
            self.text.hidden_size % self.adaptive.reduction == 0,
            f"text hidden_size {self.text.hidden_size} is not divisible by reduction {self.adaptive.reduction}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VGLAWConfig:
        sections = {
            "vision": VisionConfig,
            "text": TextConfig,
            "adaptive": AdaptiveConfig,
            "head": HeadConfig,
        }
        unknown = set(data) - set(sections) - {"name"}
        _require(not unknown, f"unknown config sections {sorted(unknown)}")
        kwargs: dict[str, Any] = {k: sections[k](**data[k]) for k in sections if k in data}
        return cls(name=data.get("name", "custom"), **kwargs)

    def replace(self, **overrides: Any) -> VGLAWConfig:
        """A copy with fields changed, by section (``vision={"depth": 4}``) or by unique field name.

        Field names are unique across sections, so ``replace(depth=4, tasks=("rec",))`` is unambiguous.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            if key == "name":
                data["name"] = value
            elif key in data and isinstance(data[key], dict):
                _require(isinstance(value, dict), f"override for section '{key}' must be a dict")
                data[key].update(value)
            else:
                owners = [s for s, fields in data.items() if isinstance(fields, dict) and key in fields]
                _require(len(owners) == 1, f"unknown config field '{key}'")
                data[owners[0]][key] = value
        return VGLAWConfig.from_dict(data)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
