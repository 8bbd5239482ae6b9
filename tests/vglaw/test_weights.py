"""Weight import: SAM / timm samvit, plain timm ViT, detectron2 ViTDet layouts, and local BERT directories."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from functools import partial

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertForPreTraining, BertModel

from tests.pretrained_layouts import bert_release_config
from vglaw import ExpressionTokenizer, create_model, get_config
from vglaw.language import LanguageBackbone
from vglaw.safe_pickle import UnsafePickleError
from vglaw.vision import ViTDetBackbone
from vglaw.weights import (
    WeightImportError,
    load_bert_weights,
    load_vit_weights,
    read_state_dict,
    resample_rel_pos,
)


@pytest.fixture(scope="module")
def timm_sam():
    """timm's SAM ViT-B at 448 with every tensor random (no download), and its trunk features."""
    torch.manual_seed(0)
    model = timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=448, norm_layer=partial(nn.LayerNorm, eps=1e-6)
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.normal_(std=0.1)
    images = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        (trunk,) = model.forward_intermediates(images, indices=[11], intermediates_only=True)  # before the neck
    return model, images, trunk


def _base_backbone() -> ViTDetBackbone:
    config = get_config("base").vision
    return ViTDetBackbone(
        image_size=config.image_size,
        window_size=config.window_size,
        global_blocks=config.global_blocks,
        drop_path=0,
    ).eval()


def test_samvit_safetensors_reproduces_timm_trunk(timm_sam, tmp_path) -> None:
    model, images, trunk = timm_sam
    path = tmp_path / "samvit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = _base_backbone()
    report = load_vit_weights(backbone, path)
    assert report.source_format == "sam" and report.initialised == [] and not report.resampled
    assert all(k.startswith("neck.") or k.startswith("head.") for k in report.dropped)
    assert len(report.loaded) == len(backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), trunk, rtol=1e-4, atol=1e-4)


def test_sam_release_layout_reproduces_timm_trunk(timm_sam, tmp_path) -> None:
    """SAM's own ``sam_vit_b_01ec64.pth``: ``image_encoder.*`` (``mlp.lin1``), the prompt encoder, the mask decoder."""
    model, images, trunk = timm_sam
    state = {f"image_encoder.{k}".replace(".mlp.fc", ".mlp.lin"): v for k, v in model.state_dict().items()}
    assert "image_encoder.neck.0.weight" in state and "image_encoder.blocks.0.mlp.lin1.weight" in state
    heads = {
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 128),
        "prompt_encoder.point_embeddings.0.weight": torch.randn(1, 256),
        "prompt_encoder.not_a_point_embed.weight": torch.randn(1, 256),
        "prompt_encoder.mask_downscaling.0.weight": torch.randn(4, 1, 2, 2),
        "prompt_encoder.no_mask_embed.weight": torch.randn(1, 256),
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight": torch.randn(256, 256),
        "mask_decoder.iou_token.weight": torch.randn(1, 256),
        "mask_decoder.mask_tokens.weight": torch.randn(4, 256),
        "mask_decoder.output_upscaling.0.weight": torch.randn(256, 64, 2, 2),
        "mask_decoder.iou_prediction_head.layers.0.weight": torch.randn(256, 256),
    }
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state | heads, path)
    backbone = _base_backbone()
    report = load_vit_weights(backbone, path)
    assert report.source_format == "sam" and report.initialised == [] and not report.resampled
    assert set(report.dropped) == {k for k in state if k.startswith("image_encoder.neck.")} | set(heads)
    assert len(report.loaded) == len(backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), trunk, rtol=1e-4, atol=1e-4)


def test_detectron2_layout_reproduces_timm_trunk(timm_sam, tmp_path) -> None:
    """ViTDet's checkpoints: ``backbone.net.*`` keys, pos_embed [1, 1+N, C] with a class-token row, numpy .pkl."""
    model, images, trunk = timm_sam
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(("neck.", "head.")):
            continue
        if key == "pos_embed":
            value = torch.cat([torch.randn(1, 1, 768), value.reshape(1, -1, 768)], dim=1)
        state[f"backbone.net.{key}"] = value.numpy()
    state["backbone.simfp_2.0.weight"] = np.zeros((768, 384, 2, 2), dtype=np.float32)
    state["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 1024), dtype=np.float32)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    backbone = _base_backbone()
    report = load_vit_weights(backbone, path)
    assert report.source_format == "vitdet" and report.initialised == []
    assert set(report.dropped) == {"backbone.simfp_2.0.weight", "roi_heads.box_predictor.cls_score.weight"}
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), trunk, rtol=1e-4, atol=1e-4)


def _small_backbone() -> ViTDetBackbone:
    return ViTDetBackbone(image_size=64, embed_dim=32, depth=2, num_heads=2, window_size=2, global_blocks=(1,))


@pytest.mark.parametrize("protocol", [2, 5])
def test_detectron2_pickle_loads_at_protocols_2_and_5(tmp_path, protocol) -> None:
    """Protocol 2 writes the arrays' bytes through ``_codecs.encode``; protocol 5 through numpy's ``_frombuffer``."""
    torch.manual_seed(0)
    source = _small_backbone()
    state = {f"backbone.net.{k}": v.numpy() for k, v in source.state_dict().items()}
    state["backbone.simfp_2.0.weight"] = np.zeros((32, 16, 2, 2), dtype=np.float32)
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": state, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))
    target = _small_backbone()
    report = load_vit_weights(target, path)
    assert report.source_format == "vitdet" and report.dropped == ["backbone.simfp_2.0.weight"]
    expected = source.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_pickled_arrays_become_tensors_of_the_same_shape(tmp_path) -> None:
    """0-d arrays stay 0-d; read-only arrays (protocol 5 pickles them as immutable bytes) are copied."""
    read_only = np.arange(6, dtype=np.float32).reshape(2, 3)
    read_only.flags.writeable = False
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps({"model": {"scalar": np.array(2.5), "read_only": read_only}}, protocol=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor would share read-only memory
        state = read_state_dict(path)
    assert state["scalar"].shape == () and state["scalar"].item() == 2.5
    torch.testing.assert_close(state["read_only"], torch.from_numpy(read_only.copy()))


def test_detectron2_pretraining_sizes_are_resampled(timm_sam) -> None:
    """A 1024-px ViTDet has 127-row global rel-pos tables and a 224-px MAE pos_embed: both are resampled."""
    model, _, _ = timm_sam
    state = {f"backbone.net.{k}": v for k, v in model.state_dict().items() if not k.startswith(("neck.", "head."))}
    big_table = torch.randn(127, 64)
    state["backbone.net.blocks.2.attn.rel_pos_h"] = big_table
    state["backbone.net.pos_embed"] = torch.randn(1, 197, 768)
    backbone = _base_backbone()
    report = load_vit_weights(backbone, state)
    assert report.resampled["blocks.2.attn.rel_pos_h"] == ((127, 64), (55, 64))
    assert report.resampled["pos_embed"] == ((1, 197, 768), (1, 28, 28, 768))
    expected = F.interpolate(big_table.t()[None], size=55, mode="linear").squeeze(0).t()
    torch.testing.assert_close(backbone.blocks[2].attn.rel_pos_h.detach(), expected)
    grid = state["backbone.net.pos_embed"][:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    expected_pos = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(backbone.pos_embed.detach(), expected_pos)


def test_timm_vit_224_loads_with_pos_embed_resampling(tmp_path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    backbone = _base_backbone()
    report = load_vit_weights(backbone, path)
    assert report.source_format == "vit"
    assert set(report.dropped) == {"cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert report.resampled == {"pos_embed": ((1, 197, 768), (1, 28, 28, 768))}
    # Plain ViTs carry no relative position tables; they start at zero as in ViTDet.
    assert len(report.initialised) == 24 and all("rel_pos" in k for k in report.initialised)
    assert all(block.attn.rel_pos_h.abs().sum() == 0 for block in backbone.blocks)
    for i in (0, 11):
        torch.testing.assert_close(backbone.blocks[i].attn.qkv.weight, vit.blocks[i].attn.qkv.weight)  # -> W0
    grid = vit.pos_embed.detach()[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(backbone.pos_embed.detach(), expected)


def test_loaded_backbone_is_w0_of_the_full_model(timm_sam) -> None:
    model, _, _ = timm_sam
    vglaw = create_model("base", drop_path=0.0)
    load_vit_weights(vglaw.visual, model.state_dict())
    torch.testing.assert_close(vglaw.visual.blocks[5].attn.qkv.weight, model.blocks[5].attn.qkv.weight)


def test_mismatches_are_named() -> None:
    backbone = _small_backbone()
    good = backbone.state_dict()
    extra = dict(good, **{"blocks.0.attn.q_bias": torch.zeros(32)})
    with pytest.raises(WeightImportError, match=r"unexpected \['blocks.0.attn.q_bias'\]"):
        load_vit_weights(backbone, extra)
    missing = {k: v for k, v in good.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(WeightImportError, match=r"missing \['blocks.1.mlp.fc2.weight'\]"):
        load_vit_weights(backbone, missing)
    wrong = dict(good, **{"blocks.0.mlp.fc1.weight": torch.zeros(10, 32)})
    with pytest.raises(WeightImportError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint shape"):
        load_vit_weights(backbone, wrong)
    with pytest.raises(FileNotFoundError):
        load_vit_weights(backbone, "/nonexistent/vit.pth")


def test_malicious_pickle_is_refused(tmp_path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Exploit()}}, f)
    with pytest.raises(UnsafePickleError, match="system"):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_resample_rel_pos_is_identity_at_same_size() -> None:
    table = torch.randn(27, 64)
    assert resample_rel_pos(table, 27) is table


def test_local_bert_directory_keeps_first_layers(tmp_path) -> None:
    torch.manual_seed(0)
    source = BertForPreTraining(
        BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
    )
    source.save_pretrained(tmp_path / "bert")
    language = LanguageBackbone(
        vocab_size=300, num_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128
    )
    report = load_bert_weights(language, tmp_path / "bert")
    assert any(k.startswith("bert.encoder.layer.3.") for k in report.dropped)
    assert any(k.startswith("cls.") for k in report.dropped)
    assert not any(".layer.2." in k or ".layer.3." in k for k in report.loaded)
    src = source.bert.state_dict()
    for key, value in language.bert.state_dict().items():
        if key in src:
            assert torch.equal(value, src[key]), key
    wide = LanguageBackbone(vocab_size=300, num_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=128)
    with pytest.raises(WeightImportError, match="hidden_size"):
        load_bert_weights(wide, tmp_path / "bert")


# bert-base-uncased's vocab.txt, shortened: [PAD], [unused0..98], [UNK], [CLS], [SEP], [MASK], then punctuation,
# lower-case words and ##word pieces.
BERT_VOCAB = [
    "[PAD]",
    *(f"[unused{i}]" for i in range(99)),
    *("[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    *("!", ",", ".", "a", "the", "man", "on", "left", "right", "of", "dog", "walk", "##ing", "##s"),
]


def _bert_base_uncased_release(directory, hidden: int = 64, intermediate: int = 128, layers: int = 12) -> dict:
    """Write bert-base-uncased's files (narrower: 768 -> ``hidden``) with the release's TF-era key names.

    Returns the written state dict: ``bert.`` prefix, ``LayerNorm.gamma`` / ``beta``, the pooler, and the
    masked-LM and next-sentence heads (``cls.*``).
    """
    generator = torch.Generator().manual_seed(0)
    vocab = len(BERT_VOCAB)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    def dense(prefix: str, out: int, inp: int) -> dict:
        return {f"{prefix}.weight": tensor(out, inp), f"{prefix}.bias": tensor(out)}

    def layer_norm(prefix: str) -> dict:
        return {f"{prefix}.LayerNorm.gamma": 1 + tensor(hidden), f"{prefix}.LayerNorm.beta": tensor(hidden)}

    state = {
        "bert.embeddings.word_embeddings.weight": tensor(vocab, hidden),
        "bert.embeddings.position_embeddings.weight": tensor(512, hidden),
        "bert.embeddings.token_type_embeddings.weight": tensor(2, hidden),
        **layer_norm("bert.embeddings"),
    }
    for i in range(layers):
        prefix = f"bert.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            state |= dense(f"{prefix}.attention.self.{name}", hidden, hidden)
        state |= dense(f"{prefix}.attention.output.dense", hidden, hidden) | layer_norm(f"{prefix}.attention.output")
        state |= dense(f"{prefix}.intermediate.dense", intermediate, hidden)
        state |= dense(f"{prefix}.output.dense", hidden, intermediate) | layer_norm(f"{prefix}.output")
    state |= dense("bert.pooler.dense", hidden, hidden)
    state |= {"cls.predictions.bias": tensor(vocab), "cls.predictions.decoder.weight": tensor(vocab, hidden)}
    state |= dense("cls.predictions.transform.dense", hidden, hidden) | layer_norm("cls.predictions.transform")
    state |= dense("cls.seq_relationship", 2, hidden)
    config = bert_release_config(
        vocab, hidden_size=hidden, num_layers=layers, num_heads=4, intermediate_size=intermediate
    )
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "vocab.txt").write_text("".join(f"{token}\n" for token in BERT_VOCAB))
    return state


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
def test_bert_base_uncased_release_matches_transformers(tmp_path, weights_file) -> None:
    """The release's 12 layers, kept to the first 6, compute what transformers' BertModel of 6 layers does."""
    bert_dir = tmp_path / "bert-base-uncased"
    state = _bert_base_uncased_release(bert_dir)
    if weights_file == "pytorch_model.bin":
        torch.save(state, bert_dir / weights_file)
    else:
        save_file(state, str(bert_dir / weights_file))

    tokenizer = ExpressionTokenizer.from_vocab_file(bert_dir)
    batch = tokenizer(["The MAN on the Left", "a dog Walking"])
    ids = {token: i for i, token in enumerate(BERT_VOCAB)}
    assert (ids["[CLS]"], ids["[SEP]"]) == (101, 102)
    expected_ids = [
        ["[CLS]", "the", "man", "on", "the", "left", "[SEP]"],
        ["[CLS]", "a", "dog", "walk", "##ing", "[SEP]", "[PAD]"],
    ]
    assert batch.input_ids.tolist() == [[ids[t] for t in row] for row in expected_ids]

    language = LanguageBackbone(
        vocab_size=len(BERT_VOCAB), num_layers=6, hidden_size=64, num_attention_heads=4, intermediate_size=128
    ).eval()
    report = load_bert_weights(language, bert_dir)
    deep = re.compile(r"^bert\.encoder\.layer\.([6-9]|1[01])\.")
    assert set(report.dropped) == {k for k in state if k.startswith(("cls.", "bert.pooler.")) or deep.match(k)}
    assert len(report.loaded) == len(language.bert.state_dict()) == 5 + 6 * 16

    config = BertConfig.from_json_file(bert_dir / "config.json")
    config.num_hidden_layers = 6
    reference = BertModel(config).eval()
    renamed = {
        key.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias"): value
        for key, value in state.items()
        if key.startswith("bert.") and not deep.match(key)
    }
    reference.load_state_dict(renamed, strict=True)
    with torch.no_grad():
        ours = language(batch.input_ids, batch.attention_mask)
        theirs = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    config_json = json.loads((bert_dir / "config.json").read_text())
    (bert_dir / "config.json").write_text(json.dumps(config_json | {"hidden_act": "relu"}))
    with pytest.raises(WeightImportError, match="hidden_act"):
        load_bert_weights(language, bert_dir)
