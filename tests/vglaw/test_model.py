"""Presets build, run forward and backward, and have the parameter count the spec implies."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from vglaw import VGLAWConfig, create_model, get_config, list_models, load_pretrained, save_pretrained
from vglaw.transforms import normalize

CPU_PRESETS = [name for name in list_models() if name != "base"]


def _batch(config: VGLAWConfig, batch: int, length: int = 12):
    size = config.vision.image_size
    images = normalize(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8))
    ids = torch.randint(5, config.text.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length // 2 :] = False
    return images, ids, mask


def test_registry_lists_every_size() -> None:
    assert {"tiny", "small", "base"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("huge-nonexistent")


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    images, ids, mask = _batch(model.config, batch=4)
    out = model(images, ids, mask)
    size = model.config.vision.image_size
    assert out.boxes.shape == (4, 4) and ((out.boxes > 0) & (out.boxes < 1)).all()
    grid = model.config.vision.grid_size
    assert out.box_attention.shape == (4, grid, grid)
    torch.testing.assert_close(out.box_attention.sum((1, 2)), torch.ones(4))
    assert out.mask_logits.shape == (4, size, size)
    assert out.visual_features.shape == (4, model.config.vision.embed_dim, size // 16, size // 16)
    (out.boxes.sum() + out.mask_logits.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # Phi starts at zero, so P and Q get no gradient on the first step; everything else does.
    assert set(no_grad) <= {"weight_generator.P", "weight_generator.Q"}, no_grad


def test_tiny_step_is_fast_on_cpu() -> None:
    model = create_model("tiny").train()
    images, ids, mask = _batch(model.config, batch=8)
    timings = []
    for _ in range(4):
        start = time.perf_counter()
        out = model(images, ids, mask)
        (out.boxes.sum() + out.mask_logits.mean()).backward()
        timings.append(time.perf_counter() - start)
    # A loose sanity bound (the preset promises well under a second); real timings live in benchmarks/.
    assert min(timings) < 1.0


@pytest.mark.parametrize("tasks", [("rec",), ("res",), ("rec", "res")])
def test_task_switches(tasks: tuple[str, ...]) -> None:
    model = create_model("tiny", tasks=tasks).eval()
    images, ids, mask = _batch(model.config, batch=2)
    with torch.no_grad():
        out = model(images, ids, mask)
    assert (out.boxes is not None) == ("rec" in tasks)
    assert (out.mask_logits is not None) == ("res" in tasks)


def test_static_ablation_has_no_generator() -> None:
    model = create_model("tiny", enabled=False)
    assert model.weight_generator is None and model.aggregation is None
    images, ids, mask = _batch(model.config, batch=2)
    assert model(images, ids, mask).boxes.shape == (2, 4)


def test_category_classifier_is_optional_and_trains_with_the_backbone() -> None:
    assert create_model("tiny")(*_batch(get_config("tiny"), batch=2)).category_logits is None
    torch.manual_seed(0)
    model = create_model("tiny", categories=6).train()
    out = model(*_batch(model.config, batch=3))
    assert out.category_logits.shape == (3, 6)
    out.category_logits.logsumexp(-1).sum().backward()
    assert model.box_head.category.weight.grad is not None
    assert model.visual.patch_embed.proj.weight.grad.abs().sum() > 0  # the backbone learns from it too
    assert {id(p) for p in model.box_head.category.parameters()} <= {id(p) for p in model.head_parameters()}
    with pytest.raises(ValueError, match="categories must be an integer >= 0"):
        get_config("tiny", categories=-1)
    with pytest.raises(ValueError, match="needs the 'rec' branch"):
        get_config("tiny", categories=6, tasks=("res",))


def test_config_validation_and_overrides() -> None:
    config = get_config("tiny", depth=6, global_blocks=(2, 5), tasks=("rec",))
    assert config.vision.depth == 6 and config.head.tasks == ("rec",)
    assert VGLAWConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="global_blocks"):
        get_config("tiny", global_blocks=(9,))
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("tiny", not_a_field=1)
    with pytest.raises(ValueError, match="unknown tasks"):
        get_config("tiny", tasks=("detect",))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        get_config("tiny", image_size=100)
    with pytest.raises(ValueError, match="divisible by groups"):
        get_config("tiny", groups=3)


def test_parameter_groups_partition_the_model() -> None:
    model = create_model("tiny")
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone.isdisjoint(head) and len(backbone | head) == len(list(model.parameters()))
    assert id(model.visual.blocks[0].attn.qkv.weight) in backbone  # W0 trains with the backbone
    assert id(model.weight_generator.P) in head


def test_save_and_load_round_trip(tmp_path, tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=tokenizer.vocab_size).eval()
    save_pretrained(model, tokenizer, tmp_path / "m")
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded_tokenizer.vocab_size == tokenizer.vocab_size
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    tokens = tokenizer("the small red circle")
    images, _, _ = _batch(model.config, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(images, tokens.input_ids, tokens.attention_mask).boxes,
            loaded(images, tokens.input_ids, tokens.attention_mask).boxes,
        )
    with pytest.raises(ValueError, match="tokens but the model embeds"):
        save_pretrained(create_model("tiny", vocab_size=300), tokenizer, tmp_path / "bad")


def expected_base_parameters(vocab: int = 30522) -> int:
    """The count implied by VGLAW_SPEC.md, written out independently of the model code."""
    c, depth, grid, win, head_dim = 768, 12, 448 // 16, 14, 64
    linear = lambda i, o: i * o + o  # noqa: E731
    block = 2 * 2 * c + linear(c, 3 * c) + linear(c, c) + linear(c, 4 * c) + linear(4 * c, c)
    rel_pos = 8 * 2 * (2 * win - 1) * head_dim + 4 * 2 * (2 * grid - 1) * head_dim
    vit = linear(3 * 16 * 16, c) + grid * grid * c + depth * block + rel_pos
    bert_layer = 4 * linear(c, c) + 2 * 2 * c + linear(c, 3072) + linear(3072, c)
    bert = vocab * c + 512 * c + 2 * c + 2 * c + 6 * bert_layer
    d_l, d_h, d_w = 768, 768 // 16, 32
    aggregation = depth * d_l + depth * (linear(d_l, d_h) + 2 * d_h)
    generator = 3 * c * d_w + c * d_w + depth * linear(d_h, d_w * d_w)
    rec = linear(d_l, 64) + linear(c, 64) + linear(c, c) + linear(c, 256) + linear(256, 256) + linear(256, 4)
    res = (c * 256 * 4 + 256) + 2 * 256 + (256 * d_l * 4 + d_l)
    return vit + bert + aggregation + generator + rec + res


@pytest.mark.slow
def test_base_matches_the_paper_and_runs_at_448() -> None:
    torch.manual_seed(0)
    model = create_model("base").eval()
    v = model.config.vision
    assert (v.image_size, v.embed_dim, v.depth, v.window_size, v.global_blocks) == (
        448,
        768,
        12,
        14,
        (2, 5, 8, 11),
    )
    assert dataclasses.astuple(model.config.adaptive) == (True, 12, 16, 32)
    count = sum(p.numel() for p in model.parameters())
    print(f"base parameters: {count:,} (spec: {expected_base_parameters():,})")
    assert count == expected_base_parameters()
    windows = [block.window_size for block in model.visual.blocks]
    assert windows == [0 if i in (2, 5, 8, 11) else 14 for i in range(12)]
    images, ids, mask = _batch(model.config, batch=1)
    with torch.no_grad():
        out = model(images, ids, mask)
    assert out.boxes.shape == (1, 4) and out.mask_logits.shape == (1, 448, 448)
    assert out.visual_features.shape == (1, 768, 28, 28)
