"""Import pretrained weights: ViT trunks (detectron2 ViTDet, SAM / timm ``samvit_*``, timm ViT / MAE) and BERT.

Loading is safe (``torch.load(weights_only=True)``, safetensors, or a restricted unpickler for detectron2's
``.pkl``) and strict: every key of the source is either loaded, or dropped because its format declares it
outside the trunk (a classifier head, SAM's neck, a class token); every key of the target is either loaded or,
where the format has no such tensor (a plain ViT has no relative position tables), left at its
initialisation. Anything else raises :class:`WeightImportError` naming the keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vglaw import safe_pickle
from vglaw.vision import PatchConvEmbed

VitFormat = Literal["vitdet", "sam", "vit"]
StateDict = dict[str, Tensor]


class WeightImportError(RuntimeError):
    """The source does not map onto the target; the message names the keys."""


@dataclass
class LoadReport:
    """What an import did, key by key."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    resampled: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # source keys outside the trunk, by the format's rules
    initialised: list[str] = field(default_factory=list)  # target keys the format has no tensor for


def read_state_dict(source: str | os.PathLike[str] | Mapping[str, object]) -> StateDict:
    """Read a checkpoint (``.safetensors``, ``.pth``/``.pt``/``.bin``, detectron2 ``.pkl``) into tensors.

    Wrappers such as ``{"model": ...}`` or ``{"state_dict": ...}`` are unwrapped.
    """
    if isinstance(source, Mapping):
        data: object = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        elif path.suffix == ".pkl":
            data = safe_pickle.load(path, allow=safe_pickle.NUMPY_GLOBALS | safe_pickle.PLAIN_DATA_GLOBALS)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
    if not isinstance(data, Mapping):
        raise WeightImportError(f"checkpoint holds a {type(data).__name__}, not a state dict")
    out: StateDict = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            # Contiguous, and writable (a tensor over read-only memory is undefined behaviour); 0-d stays 0-d.
            value = torch.from_numpy(np.require(value, requirements=["C", "W"]))
        if isinstance(value, Tensor):
            out[str(key)] = value
    return out


def detect_vit_format(state: Mapping[str, Tensor]) -> VitFormat:
    """Tell the checkpoint layout from its keys."""
    if any(k.startswith("backbone.net.") for k in state):
        return "vitdet"
    if any(k.startswith("image_encoder.") for k in state):
        return "sam"
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 4:
        return "sam"
    if "patch_embed.proj.weight" in state:
        return "vit"
    raise WeightImportError("cannot tell the ViT checkpoint format: no patch_embed.proj.weight or known prefix")


# Source keys each format declares outside the trunk.
_DROPPED: dict[VitFormat, re.Pattern[str]] = {
    "vitdet": re.compile(r"^(?!backbone\.net\.)"),  # FPN, RPN, ROI heads, pixel statistics
    # timm's samvit keys (``neck.*``) and SAM's own release (``image_encoder.neck.*`` beside the prompt encoder
    # and mask decoder)
    "sam": re.compile(r"^((image_encoder\.)?(neck|head)\.|prompt_encoder\.|mask_decoder\.|pixel_(mean|std)$)"),
    "vit": re.compile(r"^(cls_token$|dist_token$|norm\.|fc_norm\.|head\.|head_dist\.|mask_token$|decoder_)"),
}


def convert_vit_state_dict(
    state: Mapping[str, Tensor], target: nn.Module, source_format: VitFormat | Literal["auto"] = "auto"
) -> tuple[StateDict, LoadReport]:
    """Map ``state`` onto ``target``'s (a :class:`vglaw.vision.ViTDetBackbone`) keys and shapes."""
    fmt: VitFormat = detect_vit_format(state) if source_format == "auto" else source_format
    if isinstance(getattr(target, "patch_embed", None), PatchConvEmbed):
        raise WeightImportError(
            f"the backbone's stem is patch+conv, whose convolutions no {fmt} checkpoint holds: "
            "pretrained ViT weights need the patch stem (stem: patch)"
        )
    report = LoadReport(source_format=fmt)
    wanted = target.state_dict()
    converted: StateDict = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if _DROPPED[fmt].search(key):
            report.dropped.append(key)
            continue
        name = key.removeprefix("backbone.net.").removeprefix("image_encoder.")
        name = name.replace("mlp.lin1.", "mlp.fc1.").replace("mlp.lin2.", "mlp.fc2.")
        if name not in wanted:
            unexpected.append(key)
            continue
        converted[name] = _fit(name, value, wanted[name], report)
    missing = [k for k in wanted if k not in converted]
    # A plain ViT carries no relative position tables: ViTDet starts them at zero (as ours are initialised).
    allowed_missing = [k for k in missing if fmt == "vit" and k.endswith((".rel_pos_h", ".rel_pos_w"))]
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise WeightImportError(
            f"{fmt} checkpoint does not match the backbone: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    report.loaded = sorted(converted)
    report.initialised = allowed_missing
    return converted, report


def load_vit_weights(
    backbone: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    source_format: VitFormat | Literal["auto"] = "auto",
) -> LoadReport:
    """Load a pretrained ViT trunk into ``backbone`` (the qkv weights become W0); strict, see module doc."""
    converted, report = convert_vit_state_dict(read_state_dict(source), backbone, source_format)
    result = backbone.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(report.initialised)
    return report


def _fit(name: str, value: Tensor, like: Tensor, report: LoadReport) -> Tensor:
    """Resample position tensors to the target's grid; every other tensor must match exactly."""
    value = value.to(like.dtype)
    if name == "pos_embed":
        resized = resample_pos_embed(value, like.shape[1], like.shape[2])
    elif name.endswith((".rel_pos_h", ".rel_pos_w")) and value.shape[1:] == like.shape[1:]:
        resized = resample_rel_pos(value, like.shape[0])
    else:
        resized = value
    if resized.shape != like.shape:
        raise WeightImportError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(like.shape)}")
    if resized.shape != value.shape:
        report.resampled[name] = (tuple(value.shape), tuple(resized.shape))
    return resized


def resample_pos_embed(pos: Tensor, height: int, width: int) -> Tensor:
    """An absolute position embedding ([1, H, W, C], or [1, (1+)N, C] with an optional class token) -> [1, h, w, C].

    Bicubic, as ViTDet and timm resample it; antialiased when shrinking.
    """
    if pos.ndim == 3:
        tokens = pos.shape[1]
        side = round(tokens**0.5)
        if side * side != tokens:  # a leading class-token position
            side = round((tokens - 1) ** 0.5)
            if side * side != tokens - 1:
                raise WeightImportError(f"pos_embed with {tokens} positions is not a square grid")
            pos = pos[:, 1:]
        pos = pos.reshape(1, side, side, -1)
    if pos.shape[1:3] == (height, width):
        return pos
    grid = pos.permute(0, 3, 1, 2).float()
    shrink = height < grid.shape[2] or width < grid.shape[3]
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False, antialias=shrink)
    return grid.permute(0, 2, 3, 1).to(pos.dtype)


def resample_rel_pos(table: Tensor, length: int) -> Tensor:
    """A relative position table [L, c] -> [length, c], linearly, as ViTDet / SAM do it at run time."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().to(table.dtype)


# config.json fields the backbone must share: widths, and what the forward computes that no tensor shape shows.
_BERT_CONFIG_MUST_AGREE = (
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "hidden_act",
    "layer_norm_eps",
)


def load_bert_weights(language: nn.Module, directory: str | os.PathLike[str]) -> LoadReport:
    """Load a local Hugging Face BERT directory into a :class:`vglaw.language.LanguageBackbone`.

    The backbone keeps the checkpoint's first ``num_layers`` layers; deeper layers, the pooler and pre-training
    heads are dropped by rule. Widths, activation and LayerNorm epsilon must agree with ``config.json``. The
    original release's names (a ``bert.`` prefix, ``LayerNorm.gamma`` / ``beta``) are accepted.
    """
    directory = Path(directory)
    files = [directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).is_file()]
    if not files:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory}")
    bert = language.bert
    config_path = directory / "config.json"
    if config_path.is_file():
        source_config = json.loads(config_path.read_text())
        for attr in _BERT_CONFIG_MUST_AGREE:
            mine, theirs = getattr(bert.config, attr), source_config.get(attr)
            if theirs is not None and theirs != mine:
                raise WeightImportError(f"BERT {attr}: checkpoint has {theirs}, the model {mine}")
    state = read_state_dict(files[0])
    layers = bert.config.num_hidden_layers
    wanted = bert.state_dict()
    report = LoadReport(source_format="bert")
    converted: StateDict = {}
    unexpected: list[str] = []
    for key, value in state.items():
        name = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        layer = re.match(r"encoder\.layer\.(\d+)\.", name)
        dropped = (name.startswith(("pooler.", "cls.")) or (layer is not None and int(layer.group(1)) >= layers)) or (
            name == "embeddings.position_ids" and name not in wanted
        )
        if dropped:
            report.dropped.append(key)
        elif name not in wanted:
            unexpected.append(key)
        elif value.shape != wanted[name].shape:
            raise WeightImportError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model {tuple(wanted[name].shape)}"
            )
        else:
            converted[name] = value
    missing = [k for k in wanted if k not in converted and not k.endswith("position_ids")]
    if missing or unexpected:
        raise WeightImportError(
            f"BERT checkpoint mismatch: missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    bert.load_state_dict(converted, strict=False)
    report.loaded = sorted(converted)
    return report
