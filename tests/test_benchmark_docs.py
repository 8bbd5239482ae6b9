"""Benchmark scripts rewrite only their own generated block of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.docs_section import DOCS, markers, write_generated


@pytest.mark.parametrize("script", ["preprocess", "convergence", "variants"])
def test_each_writing_script_has_one_block_in_the_doc(script: str) -> None:
    text = DOCS.read_text(encoding="utf-8")
    begin, end = markers(script)
    assert text.count(begin) == 1 and text.count(end) == 1
    assert text.index(begin) < text.index(end)
    assert (Path(DOCS).parent.parent / "benchmarks" / f"{script}.py").read_text().count(
        f'write_generated("{script}"'
    ) == 1


def test_only_the_block_changes(tmp_path: Path) -> None:
    begin, end = markers("x")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\n## X\n\n{begin}\nold\nresults\n{end}\n\nnotes people wrote\n\n### More notes\n")
    write_generated("x", "new results\n", doc)
    assert doc.read_text() == f"# B\n\n## X\n\n{begin}\nnew results\n{end}\n\nnotes people wrote\n\n### More notes\n"
    with pytest.raises(ValueError, match="lacks the block"):
        write_generated("y", "results", doc)
