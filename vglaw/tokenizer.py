"""Expression tokenizer: a local BERT vocab when given, otherwise a WordPiece vocab trained on the data.

Everything runs offline. The vocab is saved beside a model checkpoint (``vocab.txt``) so that a checkpoint
is self-contained.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from torch import Tensor

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "vocab.txt"


@dataclass
class TokenizedBatch:
    """Token ids padded to the longest expression of the batch (at most ``max_tokens``)."""

    input_ids: Tensor  # [B, L] int64
    attention_mask: Tensor  # [B, L] bool, True for real tokens
    truncated: list[bool]  # per expression: it was longer than max_tokens and was cut

    def to(self, device: torch.device | str) -> TokenizedBatch:
        return TokenizedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.truncated)


class ExpressionTokenizer:
    """Lower-cased BERT WordPiece tokenisation with [CLS] ... [SEP], truncation and padding."""

    def __init__(self, vocab: dict[str, int], max_tokens: int = 40) -> None:
        missing = [t for t in SPECIAL_TOKENS[:4] if t not in vocab]
        if missing:
            raise ValueError(f"vocab lacks the special tokens {missing}")
        if max_tokens < 3:
            raise ValueError("max_tokens must be at least 3 ([CLS], a word, [SEP])")
        self.max_tokens = max_tokens
        self._vocab = dict(vocab)
        self._tokenizer = BertWordPieceTokenizer(vocab=self._vocab, lowercase=True)
        self.pad_id = vocab["[PAD]"]
        self.sep_id = vocab["[SEP]"]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        """A copy of the token -> id mapping (what :meth:`save` writes and the constructor takes)."""
        return dict(self._vocab)

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike[str], max_tokens: int = 40) -> ExpressionTokenizer:
        """Load a BERT ``vocab.txt`` (one token per line, id = line number)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no BERT vocab at {path}")
        tokens = path.read_text(encoding="utf-8").splitlines()
        return cls({token: i for i, token in enumerate(tokens)}, max_tokens=max_tokens)

    @classmethod
    def train(
        cls, expressions: Iterable[str], vocab_size: int = 8192, min_frequency: int = 1, max_tokens: int = 40
    ) -> ExpressionTokenizer:
        """Train a lower-cased WordPiece vocab of at most ``vocab_size`` tokens on ``expressions``."""
        trainer = BertWordPieceTokenizer(lowercase=True)
        trainer.train_from_iterator(
            expressions,
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
        )
        return cls(trainer.get_vocab(), max_tokens=max_tokens)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``vocab.txt`` into ``directory``; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        by_id = sorted(self._vocab.items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("vocab ids are not contiguous from 0")
        path = directory / VOCAB_FILE
        path.write_text("".join(f"{token}\n" for token, _ in by_id), encoding="utf-8")
        return path

    def __call__(self, expressions: str | Sequence[str]) -> TokenizedBatch:
        """Tokenise one expression or a batch of them."""
        if isinstance(expressions, str):
            expressions = [expressions]
        if not expressions:
            raise ValueError("no expressions to tokenise")
        encodings = self._tokenizer.encode_batch(list(expressions))
        ids: list[list[int]] = []
        truncated: list[bool] = []
        for encoding in encodings:
            tokens = encoding.ids  # [CLS] ... [SEP]
            cut = len(tokens) > self.max_tokens
            if cut:
                tokens = [*tokens[: self.max_tokens - 1], self.sep_id]
            ids.append(tokens)
            truncated.append(cut)
        length = max(len(t) for t in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        return TokenizedBatch(input_ids, mask, truncated)
