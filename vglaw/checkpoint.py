"""Self-contained model directories: config, weights and the tokenizer's vocab side by side.

Layout::

    <dir>/config.json         {"format": 1, "model": VGLAWConfig.to_dict(), "max_tokens": 40}
    <dir>/model.safetensors   the state dict
    <dir>/vocab.txt           the WordPiece vocab
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vglaw.config import VGLAWConfig
from vglaw.model import VGLAW
from vglaw.tokenizer import ExpressionTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The vocab file is the tokenizer's: vglaw.tokenizer.VOCAB_FILE.


def save_pretrained(model: VGLAW, tokenizer: ExpressionTokenizer, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` and ``tokenizer`` into ``directory`` (created if needed); returns it."""
    if tokenizer.vocab_size != model.config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds {model.config.text.vocab_size}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": str(FORMAT_VERSION)})
    tokenizer.save(directory)
    meta = {"format": FORMAT_VERSION, "model": model.config.to_dict(), "max_tokens": tokenizer.max_tokens}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_pretrained(
    directory: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[VGLAW, ExpressionTokenizer]:
    """Read a directory written by :func:`save_pretrained`; the model comes back in eval mode."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a VG-LAW model directory (no {CONFIG_FILE})")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported model directory format {meta.get('format')!r} (expected {FORMAT_VERSION})")
    model = VGLAW(VGLAWConfig.from_dict(meta["model"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    tokenizer = ExpressionTokenizer.from_vocab_file(directory, max_tokens=meta.get("max_tokens", 40))
    return model.to(device).eval(), tokenizer
