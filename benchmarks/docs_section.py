"""Writing a benchmark's generated results into ``docs/benchmarks.md``, between the markers that hold them.

A script owns only the text between ``<!-- begin: benchmarks/<name>.py -->`` and ``<!-- end: benchmarks/<name>.py
-->``; the heading and the notes people wrote around it stay as they are.
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def markers(script: str) -> tuple[str, str]:
    """The begin and end markers of ``benchmarks/<script>.py``'s block."""
    return f"<!-- begin: benchmarks/{script}.py -->", f"<!-- end: benchmarks/{script}.py -->"


def write_generated(script: str, block: str, docs: Path = DOCS) -> None:
    """Replaces the text between ``script``'s markers in ``docs`` with ``block``.

    Raises:
        ValueError: If the markers are missing or out of order: the doc says where results go, not the script.
    """
    begin, end = markers(script)
    text = docs.read_text(encoding="utf-8")
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{docs} lacks the block {begin} ... {end}; add it where the results belong")
    docs.write_text(f"{text[: start + len(begin)]}\n{block.strip()}\n{text[stop:]}", encoding="utf-8")
