"""Tokenizer: trained or local vocab, [CLS]/[SEP], padding, truncation flags, save/load."""

from __future__ import annotations

import pytest

from vglaw import ExpressionTokenizer

from .conftest import EXPRESSIONS


def test_trained_vocab_round_trips(tmp_path) -> None:
    tokenizer = ExpressionTokenizer.train(EXPRESSIONS, vocab_size=150)
    batch = tokenizer(["The small RED circle", "rightmost"])
    cls_id = tokenizer.vocab["[CLS]"]
    assert batch.input_ids[:, 0].tolist() == [cls_id, cls_id]
    assert batch.attention_mask.sum(1).tolist()[1] < batch.attention_mask.sum(1).tolist()[0]
    assert (batch.input_ids[~batch.attention_mask] == tokenizer.pad_id).all()
    assert batch.truncated == [False, False]
    tokenizer.save(tmp_path)
    reloaded = ExpressionTokenizer.from_vocab_file(tmp_path / "vocab.txt")
    assert reloaded.vocab_size == tokenizer.vocab_size
    assert (
        reloaded(["The small RED circle"]).input_ids.tolist() == tokenizer(["the small red circle"]).input_ids.tolist()
    )


def test_long_expressions_are_cut_and_flagged() -> None:
    tokenizer = ExpressionTokenizer.train(EXPRESSIONS, vocab_size=150, max_tokens=10)
    batch = tokenizer(["the small red circle " * 20, "the circle"])
    assert batch.input_ids.shape[1] == 10
    assert batch.truncated == [True, False]
    assert batch.input_ids[0, -1].item() == tokenizer.sep_id


def test_unknown_words_and_unicode_do_not_fail() -> None:
    tokenizer = ExpressionTokenizer.train(EXPRESSIONS, vocab_size=150)
    batch = tokenizer(["der kleine rote Kreis ☃ 猫"])
    assert batch.attention_mask.all()


def test_local_bert_vocab(tmp_path) -> None:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "circle", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = ExpressionTokenizer.from_vocab_file(tmp_path)
    assert tokenizer(["the red circles"]).input_ids.tolist() == [[2, 5, 6, 7, 8, 3]]
    with pytest.raises(FileNotFoundError):
        ExpressionTokenizer.from_vocab_file(tmp_path / "nope")
    with pytest.raises(ValueError, match="special tokens"):
        ExpressionTokenizer({"the": 0})
