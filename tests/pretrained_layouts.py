"""Pretrained-weight files in the layouts their publishers ship, built from random tensors (nothing downloaded).

- detectron2's ViTDet ``model_final_*.pkl``: ``{"model": {name: ndarray}, "__author__": ...}`` with the trunk
  under ``backbone.net.``, a 224-px MAE position embedding with its class-token row, 1024-px global relative
  position tables, and the detector's FPN and heads beside it;
- Google's ``bert-base-uncased`` release as Hugging Face hosts it: ``config.json``, ``vocab.txt`` and a
  ``pytorch_model.bin`` whose keys keep the TF-era names (``bert.`` prefix, ``LayerNorm.gamma`` / ``.beta``)
  and the pre-training heads (``cls.predictions.*``, ``cls.seq_relationship.*``).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BERT_SPECIAL_TOKENS = ["[PAD]", *(f"[unused{i}]" for i in range(10)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vitdet_pkl(
    path: Path,
    trunk: Mapping[str, Tensor],
    global_blocks: Iterable[int] = (2, 5, 8, 11),
    pretrain_grid: int = 14,
    detector_grid: int = 64,
    protocol: int = pickle.DEFAULT_PROTOCOL,
) -> Path:
    """Write ``trunk`` (a :class:`vglaw.vision.ViTDetBackbone` state dict) as detectron2 would have saved it.

    The position embedding becomes a ``pretrain_grid``-square one with a class-token row, and the global blocks'
    relative position tables get the ``2 * detector_grid - 1`` rows of a 1024-px detector; the loader has to
    resample both back.
    """
    generator = torch.Generator().manual_seed(0)
    model: dict[str, np.ndarray] = {}
    for key, value in trunk.items():
        if key == "pos_embed":
            dim = value.shape[-1]
            value = torch.randn(1, 1 + pretrain_grid**2, dim, generator=generator) * 0.02
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and int(key.split(".")[1]) in set(global_blocks):
            value = torch.randn(2 * detector_grid - 1, value.shape[1], generator=generator) * 0.02
        model[f"backbone.net.{key}"] = value.detach().float().numpy()
    dim = trunk["pos_embed"].shape[-1]
    model["backbone.simfp_2.0.weight"] = np.zeros((dim, dim // 2, 2, 2), dtype=np.float32)
    model["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 1024), dtype=np.float32)
    model["pixel_mean"] = np.asarray([[[123.675]], [[116.28]], [[103.53]]], dtype=np.float32)
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f, protocol)
    return path


def bert_vocab(words: Iterable[str]) -> list[str]:
    """A BERT-style WordPiece vocabulary: the special tokens in BERT's order, then lower-cased words."""
    lowered = sorted({w.lower() for w in words if w.strip()})
    return [*BERT_SPECIAL_TOKENS, *lowered, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]


def bert_release_config(
    vocab_size: int, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12, intermediate_size: int = 3072
) -> dict:
    """``config.json`` of the ``bert-base-uncased`` release (its widths unless told otherwise)."""
    return {
        "architectures": ["BertForMaskedLM"],
        "attention_probs_dropout_prob": 0.1,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "transformers_version": "4.6.0.dev0",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def write_bert_release(
    directory: Path,
    vocab: list[str],
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    intermediate_size: int = 3072,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised BERT as the ``bert-base-uncased`` release lays it out; returns ``directory``."""
    from transformers import BertConfig, BertForPreTraining

    directory.mkdir(parents=True, exist_ok=True)
    config = bert_release_config(len(vocab), hidden_size, num_layers, num_heads, intermediate_size)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig(**config))
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue  # a buffer, not in the 2018 release
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[key] = value.clone()
    torch.save(state, directory / "pytorch_model.bin")
    return directory
