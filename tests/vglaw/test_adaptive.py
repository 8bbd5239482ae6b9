"""Language adaptive weights: zero start, the low-rank identity, padding invariance, and that they learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vglaw.adaptive import (
    LanguageAdaptiveWeights,
    LanguageFeatureAggregation,
    linear_with_update,
    materialised_qkv,
)
from vglaw.transforms import normalize
from vglaw.vision import Attention


def _randomise_phi(generator: LanguageAdaptiveWeights) -> None:
    for layer in generator.phi:
        nn.init.normal_(layer.weight, std=0.5)
        nn.init.normal_(layer.bias, std=0.5)


def _random_mask(batch: int, length: int) -> torch.Tensor:
    lengths = torch.randint(1, length + 1, (batch,))
    return torch.arange(length)[None, :] < lengths[:, None]  # [B, L], at least [CLS]


def test_low_rank_equals_materialised_weights() -> None:
    torch.manual_seed(0)
    blocks, text_dim, dim = 3, 48, 32
    aggregation = LanguageFeatureAggregation(num_blocks=blocks, text_dim=text_dim, groups=4, reduction=4)
    generator = LanguageAdaptiveWeights(num_blocks=blocks, embed_dim=dim, hidden_dim=aggregation.out_dim, rank=8)
    _randomise_phi(generator)
    qkv = nn.Linear(dim, 3 * dim)
    for _ in range(3):
        text = torch.randn(5, 9, text_dim)
        updates = generator(aggregation(text, _random_mask(5, 9)))
        x = torch.randn(5, 17, dim)
        for update in updates:
            fast = linear_with_update(x, qkv, update)
            dense = materialised_qkv(x, qkv.weight, qkv.bias, update)
            torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
            update.dense = True  # the switch the benchmarks use takes the same dense route
            torch.testing.assert_close(linear_with_update(x, qkv, update), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 4, 3])  # global, exact windows, padded windows
def test_attention_with_update_equals_per_sample_dense_weights(window: int) -> None:
    torch.manual_seed(1)
    dim, heads, grid = 32, 4, 8
    attention = Attention(dim=dim, num_heads=heads, rel_pos_size=window or grid)
    nn.init.normal_(attention.rel_pos_h, std=0.2)
    nn.init.normal_(attention.rel_pos_w, std=0.2)
    generator = LanguageAdaptiveWeights(num_blocks=1, embed_dim=dim, hidden_dim=6, rank=4)
    _randomise_phi(generator)
    (update,) = generator(torch.randn(2, 1, 6))
    x = torch.randn(2, grid, grid, dim)
    fast = attention(x, window, update)
    dense = update.materialise()  # [B, 3C, C]
    reference = []
    for b in range(2):
        with torch.no_grad():
            per_sample = Attention(dim=dim, num_heads=heads, rel_pos_size=window or grid)
            per_sample.load_state_dict(attention.state_dict())
            per_sample.qkv.weight += dense[b]
        reference.append(per_sample(x[b : b + 1], window))
    torch.testing.assert_close(fast, torch.cat(reference), rtol=1e-4, atol=1e-5)


def test_zero_initialised_phi_gives_the_static_backbone(tiny_model, tokenizer) -> None:
    images = normalize(torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8))
    tokens = tokenizer(["the small red circle", "the rightmost shape"])
    with torch.no_grad():
        text = tiny_model.language(tokens.input_ids, tokens.attention_mask)
        updates = tiny_model.qkv_updates(text, tokens.attention_mask)
        adaptive = tiny_model.visual(images, updates)
        static = tiny_model.visual(images, None)
    assert updates is not None and all(u.down.abs().max() == 0 for u in updates)
    torch.testing.assert_close(adaptive, static, rtol=0, atol=1e-6)


def test_one_step_on_the_generator_makes_features_expression_specific(tiny_model, tokenizer) -> None:
    tiny_model.train()
    generator_params = list(tiny_model.weight_generator.parameters()) + list(tiny_model.aggregation.parameters())
    optimizer = torch.optim.SGD(generator_params, lr=1.0)
    image = normalize(torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8))
    texts = ["the small red circle", "the square left of the blue triangle"]
    tokens = tokenizer(texts)
    out = tiny_model(image.expand(2, -1, -1, -1), tokens.input_ids, tokens.attention_mask)
    (out.boxes.sum() + out.mask_logits.sigmoid().mean()).backward()
    assert tiny_model.weight_generator.phi[0].weight.grad.abs().sum() > 0
    optimizer.step()
    tiny_model.eval()
    with torch.no_grad():
        static = tiny_model.visual(image, None)
        features = []
        for text in texts:
            t = tokenizer(text)
            features.append(tiny_model(image, t.input_ids, t.attention_mask).visual_features)
    assert (features[0] - static).abs().max() > 1e-4
    assert (features[1] - static).abs().max() > 1e-4
    assert (features[0] - features[1]).abs().max() > 1e-4


def test_padding_tokens_change_nothing(tiny_model, tokenizer) -> None:
    for layer in tiny_model.weight_generator.phi:  # make the language path matter
        nn.init.normal_(layer.weight, std=0.05)
    images = normalize(torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8))
    tokens = tokenizer(["the small red circle", "the square left of the blue triangle"])
    pad = torch.full((2, 7), tokenizer.pad_id)
    padded_ids = torch.cat([tokens.input_ids, pad], dim=1)
    padded_mask = torch.cat([tokens.attention_mask, torch.zeros(2, 7, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = tiny_model(images, tokens.input_ids, tokens.attention_mask)
        b = tiny_model(images, padded_ids, padded_mask)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.mask_logits, b.mask_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.visual_features, b.visual_features, rtol=1e-4, atol=1e-5)


def test_aggregation_ignores_padded_token_values() -> None:
    torch.manual_seed(2)
    aggregation = LanguageFeatureAggregation(num_blocks=2, text_dim=16, groups=4, reduction=4)
    text = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, True, False, False, False]])
    changed = text.clone()
    changed[:, 3:] = 1e4
    torch.testing.assert_close(aggregation(text, mask), aggregation(changed, mask))
