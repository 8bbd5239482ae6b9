"""bf16 autocast on the CPU against fp32 eager: the precision a GPU cluster trains and serves in, run where CI runs.

The reference is always the same model in fp32 without autocast. Each tolerance below is 2x to 10x the worst
difference measured on a 2-core AMD EPYC with AVX-512 BF16 (torch 2.14) over 8 seeds of ``tiny``, 4 of ``small``
and 4 of ``base`` (batch 1 to 4, Phi and the relative-position tables randomised as in :func:`exercised`), so
that another CPU's bf16 kernels still pass while a dtype bug (a branch dropped, an output rounded to bf16) does
not. The forward/backward test also asserts that the language-adaptive update moves the fp32 features by more
than twice the feature tolerance, so a bf16 path that silently skipped the update would fail.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import vglaw.precision as precision_module
from vglaw import VGLAW, ExpressionTokenizer, Predictor, create_model, save_pretrained
from vglaw.adaptive import LanguageAdaptiveWeights, linear_with_update, materialised_qkv
from vglaw.losses import GroundingLoss
from vglaw.metrics import GroundingMetrics, box_iou_paired
from vglaw.model import VGLAWOutput
from vglaw.precision import PRECISIONS, autocast, autocast_dtype, cpu_bf16_instructions, resolve_precision
from vglaw.transforms import normalize

# Worst measured (tiny and small | base) -> tolerance.
BOX_ATOL = 2e-3  # normalised canvas units: 2.1e-4 | 8.0e-4
MASK_PROB_ATOL = 0.06  # sigmoid of the mask logits: 0.016 | 0.030
MASK_AGREEMENT = 0.985  # share of pixels whose 0.35-thresholded mask agrees: >= 0.9967 | >= 0.9951
FEATURE_RTOL = 0.03  # ||F_bf16 - F_fp32|| / ||F_fp32|| of the visual features: 0.0029 | 0.012
ATTENTION_ATOL = 1e-3  # LAP's attention weights (each ~1/64 to 1/784): 1.8e-4 | 9.8e-5
LOSS_RTOL = 5e-3  # the training loss (~4): 2.6e-3 absolute, 6e-4 relative
GRAD_GLOBAL_COS = 0.998  # cosine of all parameter gradients as one vector: >= 0.99920
GRAD_LOW_RANK_COS = 0.99  # cosine of the gradients of P, Q and every Phi_i: >= 0.9973
GRAD_PARAM_COS = 0.9  # cosine per parameter, for those with >= 1% of the largest gradient norm: >= 0.9507
# NOTE: per parameter the cosine is noisy: a gradient that is a sum over few samples with cancellation (the box
# MLP's last layer at batch 2) loses more than bf16's 2**-9 relative rounding; the global cosine is the tight check.
# Parameters below 1% of the largest gradient norm are left to the global check: among them are the attention key
# biases, whose exact gradient is zero (softmax ignores a shift shared by all keys), so their cosine is noise.

CPU_PRESETS = ["tiny", "small"]


def exercised(name: str, seed: int = 0, **overrides) -> VGLAW:
    """A seeded model in eval mode whose every bf16-sensitive path does work.

    At initialisation Phi is zero (the low-rank update is a no-op) and the relative-position tables are zero (the
    attention bias is a no-op); both get small random values here. With these the update changes the visual
    features by 6-10% (tiny), 14-18% (small) and 84-88% (base).
    """
    torch.manual_seed(seed)
    model = create_model(name, **overrides).eval()
    with torch.no_grad():
        for layer in model.weight_generator.phi:
            nn.init.normal_(layer.weight, std=0.05)
            nn.init.normal_(layer.bias, std=0.05)
        for block in model.visual.blocks:
            nn.init.normal_(block.attn.rel_pos_h, std=0.1)
            nn.init.normal_(block.attn.rel_pos_w, std=0.1)
    return model


def make_batch(model: VGLAW, batch: int, length: int = 12, seed: int = 0) -> tuple[Tensor, ...]:
    """Images, token ids, a padding mask (the first sample half padded), target boxes and masks."""
    generator = torch.Generator().manual_seed(seed)
    size, vocab = model.config.vision.image_size, model.config.text.vocab_size
    images = normalize(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator))
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length // 2 :] = False
    boxes = torch.rand(batch, 4, generator=generator) * 0.5 + 0.25
    masks = (torch.rand(batch, size, size, generator=generator) > 0.5).float()
    return images, ids, mask, boxes, masks


def step(
    model: VGLAW, precision: str, batch: tuple[Tensor, ...], forward: Callable[..., VGLAWOutput] | None = None
) -> tuple[VGLAWOutput, Tensor, dict[str, Tensor]]:
    """Forward and loss in ``precision``'s autocast region, backward outside it, as training does.

    ``forward`` (default: ``model``) may be ``torch.compile(model)``; gradients are read from ``model``.
    """
    images, ids, mask, boxes, masks = batch
    model.zero_grad(set_to_none=True)
    with autocast(precision, "cpu"):
        out = (model if forward is None else forward)(images, ids, mask)
        loss = GroundingLoss()(out.boxes, out.mask_logits, boxes, masks)["loss"]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


def _relative(a: Tensor, reference: Tensor) -> float:
    return ((a - reference).norm() / reference.norm()).item()


def _cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def assert_outputs_close(out: VGLAWOutput, reference: VGLAWOutput) -> None:
    """``out`` (bf16 autocast, eager or compiled) against the fp32 eager ``reference``, within the bf16 budget."""
    for field in ("boxes", "mask_logits", "box_attention", "visual_features"):
        value = getattr(out, field)
        assert value.dtype == torch.float32, f"{field} is {value.dtype}"
        assert torch.isfinite(value).all(), field
    assert (out.boxes - reference.boxes).abs().max() < BOX_ATOL
    assert (out.box_attention - reference.box_attention).abs().max() < ATTENTION_ATOL
    assert _relative(out.visual_features, reference.visual_features) < FEATURE_RTOL
    probs, reference_probs = out.mask_logits.sigmoid(), reference.mask_logits.sigmoid()
    assert (probs - reference_probs).abs().max() < MASK_PROB_ATOL
    assert ((probs >= 0.35) == (reference_probs >= 0.35)).float().mean() >= MASK_AGREEMENT


def assert_gradients_close(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    """bf16 gradients against fp32 ones: finite, fp32, the same parameters, and close in direction."""
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    names = list(reference)
    flat, flat_reference = (torch.cat([g[n].flatten() for n in names]) for g in (grads, reference))
    assert _cosine(flat, flat_reference) > GRAD_GLOBAL_COS
    low_rank = [n for n in names if n.startswith("weight_generator.")]
    assert len(low_rank) > 2  # P, Q and the Phi layers
    for name in low_rank:
        assert _cosine(grads[name], reference[name]) > GRAD_LOW_RANK_COS, name
    largest = max(g.norm() for g in reference.values())
    for name in names:
        if reference[name].norm() >= 0.01 * largest:
            assert _cosine(grads[name], reference[name]) > GRAD_PARAM_COS, name


# ---- vglaw.precision ------------------------------------------------------------------------------


def test_resolve_precision_defaults_and_checks() -> None:
    assert PRECISIONS == ("fp32", "bf16")
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision(None, torch.device("cuda")) == "bf16"  # a device object needs no GPU
    assert resolve_precision(None, "cuda:1") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    for bad in ("fp16", "bfloat16", "BF16", ""):
        with pytest.raises(ValueError, match="precision must be one of"):
            resolve_precision(bad, "cpu")


@pytest.mark.parametrize(("flags", "on_cpu"), [((), "fp32"), (("avx512_bf16",), "bf16"), (("amx_bf16",), "bf16")])
def test_auto_is_bf16_where_the_hardware_computes_in_bf16(
    flags: tuple[str, ...], on_cpu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: flags)
    assert resolve_precision("auto", "cpu") == on_cpu
    assert resolve_precision("auto", "cuda") == "bf16"  # whatever the CPU has
    assert resolve_precision(None, "cpu") == "fp32"  # the default stays fp32 on every CPU


def test_cpu_bf16_instructions_are_read_from_the_flags_line(tmp_path) -> None:
    head = "processor\t: 0\nmodel name\t: Test CPU avx512_bf16 (in the name, not a flag)\n"
    cases = {
        "fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16": ("avx512_bf16", "amx_bf16"),
        "fpu sse2 avx2 avx512f avx512_vnni": (),
        "fpu amx_bf16 amx_int8": ("amx_bf16",),
    }
    for flags, expected in cases.items():
        (tmp_path / "cpuinfo").write_text(f"{head}flags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: avx512_bf16\n")
        assert cpu_bf16_instructions(tmp_path / "cpuinfo") == expected, flags
    assert cpu_bf16_instructions(tmp_path / "absent") == ()


def test_autocast_region_dtype() -> None:
    assert autocast_dtype("fp32", "cpu") is None and autocast_dtype("bf16", "cpu") is torch.bfloat16
    a = torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError):
        autocast("fp16", "cpu")


def test_autocast_resolves_auto_and_the_default_for_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import vglaw.precision

    monkeypatch.setattr(vglaw.precision, "cpu_bf16_instructions", lambda: ())  # a CPU without bf16 arithmetic
    assert autocast_dtype("auto", "cuda") is torch.bfloat16 and autocast_dtype(None, "cuda") is torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype(None, "cpu") is None
    with autocast("auto", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(vglaw.precision, "cpu_bf16_instructions", lambda: ("avx512_bf16",))
    assert autocast_dtype("auto", "cpu") is torch.bfloat16 and autocast_dtype(None, "cpu") is None
    with autocast("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu")


# ---- the layer that failed: the in-place low-rank update ----------------------------------------


def test_low_rank_update_under_bf16_autocast() -> None:
    """``linear_with_update`` used to raise ("Bad in-place call") under autocast; now it matches fp32."""
    torch.manual_seed(0)
    generator = LanguageAdaptiveWeights(num_blocks=1, embed_dim=32, hidden_dim=6, rank=8)
    for layer in generator.phi:
        nn.init.normal_(layer.weight, std=0.5)
        nn.init.normal_(layer.bias, std=0.5)
    qkv = nn.Linear(32, 96)
    x, h1 = torch.randn(3, 5, 7, 32), torch.randn(3, 1, 6)  # [B, H, W, C], [B, blocks, d_h]
    (update,) = generator(h1)
    reference = materialised_qkv(x.reshape(3, -1, 32), qkv.weight, qkv.bias, update).reshape(3, 5, 7, 96)
    static = qkv(x)
    scale = reference.abs().max()
    assert (reference - static).abs().max() > 0.2 * scale  # the update matters
    with autocast("bf16", "cpu"):
        (update,) = generator(h1)
        fast = linear_with_update(x, qkv, update)
        update.dense = True
        dense = linear_with_update(x, qkv, update)
    # bf16 rounds x, W0, down and up to 2**-9 each; measured worst 0.7% of the output's largest value.
    for out in (fast, dense):
        assert out.dtype == torch.bfloat16
        assert (out.float() - reference).abs().max() < 0.02 * scale


# ---- the whole model ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_forward_and_backward_in_bf16_match_fp32(name: str) -> None:
    model = exercised(name)
    batch = make_batch(model, batch=2)
    reference, reference_loss, reference_grads = step(model, "fp32", batch)
    out, loss, grads = step(model, "bf16", batch)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference_loss, rtol=LOSS_RTOL, atol=0)
    assert_outputs_close(out, reference)
    assert_gradients_close(grads, reference_grads)
    # The check can fail: without the language-adaptive update the fp32 features move well beyond the tolerance.
    with torch.no_grad():
        for layer in model.weight_generator.phi:
            layer.weight.zero_()
            layer.bias.zero_()
        static = model(*batch[:3])
    assert _relative(static.visual_features, reference.visual_features) > 2 * FEATURE_RTOL


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_predictor_in_bf16_matches_fp32(name: str, tokenizer: ExpressionTokenizer) -> None:
    model = exercised(name, vocab_size=tokenizer.vocab_size)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(90, 160), (200, 120)]]
    texts = ["the small red circle", "the square left of the blue triangle"]
    fp32 = Predictor(model, tokenizer, precision="fp32")
    bf16 = Predictor(model, tokenizer, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert Predictor(model, tokenizer).precision == "fp32"  # the CPU's default
    for a, b in zip(bf16.predict(images, texts), fp32.predict(images, texts)):
        assert np.abs(np.subtract(a.box_normalized, b.box_normalized)).max() < BOX_ATOL
        assert a.mask_probs.dtype == np.float32 and np.isfinite(a.mask_probs).all()
        assert np.abs(a.mask_probs - b.mask_probs).max() < MASK_PROB_ATOL
        assert (a.mask == b.mask).mean() >= MASK_AGREEMENT


def test_predictor_precision_is_checked_and_passed_on(tmp_path, tiny_model, tokenizer) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(tiny_model, tokenizer, precision="fp16")
    save_pretrained(tiny_model, tokenizer, tmp_path)
    assert Predictor.from_pretrained(tmp_path).precision == "fp32"
    assert Predictor.from_pretrained(tmp_path, precision="bf16").precision == "bf16"


def test_base_forward_in_bf16_matches_fp32() -> None:
    """The paper's preset at 448, one sample: a few seconds on a 2-core CPU."""
    model = exercised("base")
    images, ids, mask, _, _ = make_batch(model, batch=1)
    with torch.no_grad():
        reference = model(images, ids, mask)
        with autocast("bf16", "cpu"):
            out = model(images, ids, mask)
    assert out.boxes.shape == (1, 4)
    assert out.mask_logits.shape == (1, 448, 448)
    assert out.box_attention.shape == (1, 28, 28)
    assert out.visual_features.shape == (1, 768, 28, 28)
    assert_outputs_close(out, reference)


# ---- metrics take any float dtype and compute in float64 -----------------------------------------


def test_metrics_do_not_round_to_bf16() -> None:
    pred = torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.3, 0.2, 0.9, 0.8]])
    truth = torch.tensor([[0.2, 0.2, 0.7, 0.7], [0.3, 0.25, 0.9, 0.8]])
    iou = box_iou_paired(pred.bfloat16(), truth)
    assert iou.dtype == torch.float32
    # The IoU of the bf16-rounded coordinates, to float32 precision, not rounded to bf16's 2**-9.
    exact = box_iou_paired(pred.bfloat16().double(), truth.double())
    torch.testing.assert_close(iou.double(), exact, rtol=0, atol=1e-7)
    metrics = GroundingMetrics()
    metrics.update(torch.tensor([3, 9]), iou.bfloat16(), torch.tensor([3, 4]), torch.tensor([5, 4]))
    result = metrics.compute()
    assert result["count"] == 2 and result["miou"] == pytest.approx(0.8)
    assert result["mean_box_iou"] == pytest.approx(float(iou.bfloat16().double().mean()), abs=1e-12)
