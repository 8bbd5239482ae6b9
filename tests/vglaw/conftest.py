"""Shared fixtures for the model library's tests."""

from __future__ import annotations

import pytest
import torch

from vglaw import ExpressionTokenizer, create_model

EXPRESSIONS = [
    "the small red circle",
    "the square left of the blue triangle",
    "the rightmost shape",
    "a big green triangle on the right",
    "blue square above the yellow circle",
]


@pytest.fixture(scope="session")
def tokenizer() -> ExpressionTokenizer:
    return ExpressionTokenizer.train(EXPRESSIONS * 4, vocab_size=200)


@pytest.fixture
def tiny_model(tokenizer: ExpressionTokenizer):
    torch.manual_seed(0)
    return create_model("tiny", vocab_size=tokenizer.vocab_size).eval()
