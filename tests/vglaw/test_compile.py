"""torch.compile of the whole model on the CPU (TorchDynamo, then inductor through the C++ compiler).

Training and serving on GPUs run the model under ``torch.compile`` and bf16 autocast; here the same forward is
traced on the CPU, in fp32 and under CPU bf16 autocast, and must give one graph and eager's numbers. The
tolerances and helpers are those of :mod:`tests.vglaw.test_precision`.
"""

from __future__ import annotations

import pytest
import torch

from vglaw.precision import PRECISIONS, autocast

from .test_precision import assert_gradients_close, assert_outputs_close, exercised, make_batch, step

# fp32 compiled against fp32 eager: inductor fuses and reorders fp32 sums. Measured worst: outputs 2.4e-6 on mask
# logits of magnitude 4.4, gradients 8.9e-7 absolute and 1.1e-6 relative as one vector.
FP32_RTOL, FP32_ATOL = 1e-4, 1e-5
FP32_GRAD_RTOL, FP32_GRAD_ATOL = 1e-3, 1e-5


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_forward_is_one_graph(precision: str, dynamic: bool) -> None:
    """No graph breaks, with static shapes and with a symbolic batch (a Predictor's last, smaller chunk)."""
    torch._dynamo.reset()
    # Train mode with drop-path on: BERT's dropout and DropPath are traced as training traces them.
    model = exercised("tiny", drop_path=0.1).train()
    images, ids, mask, _, _ = make_batch(model, batch=2)
    with torch._dynamo.config.patch(assume_static_by_default=not dynamic), autocast(precision, "cpu"):
        explanation = torch._dynamo.explain(model)(images, ids, mask)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow  # 90-105 s each on 2 cores with a cold inductor cache (120-125 s with tiny's 4 blocks)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_compiled_forward_and_backward_match_eager(precision: str) -> None:
    torch._dynamo.reset()
    # Two blocks, one windowed and one global: every kind of block, in less compile time than tiny's four.
    # Eval mode: no dropout, so compiled and eager draw no random numbers.
    model = exercised("tiny", depth=2, global_blocks=(1,))
    batch = make_batch(model, batch=2)
    reference, reference_loss, reference_grads = step(model, "fp32", batch)
    compiled = torch.compile(model, fullgraph=True)
    out, loss, grads = step(model, precision, batch, forward=compiled)
    if precision == "fp32":
        for field in ("boxes", "mask_logits", "box_attention", "visual_features"):
            torch.testing.assert_close(getattr(out, field), getattr(reference, field), rtol=FP32_RTOL, atol=FP32_ATOL)
        torch.testing.assert_close(loss, reference_loss, rtol=FP32_RTOL, atol=0)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=FP32_GRAD_RTOL, atol=FP32_GRAD_ATOL)
    else:
        # Against fp32 eager, the reference, within the bf16 budget; and against bf16 eager within the same budget
        # (inductor keeps some intermediates in fp32 that eager rounds to bf16, so the two bf16 runs differ too).
        assert_outputs_close(out, reference)
        assert_gradients_close(grads, reference_grads)
        eager, _, eager_grads = step(model, precision, batch)
        assert_outputs_close(out, eager)
        assert_gradients_close(grads, eager_grads)
