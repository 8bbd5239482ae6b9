"""The package layout holds: stage packages under pipelines/, and each shared thing written once."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "train", "evaluate", "serve", "tracking")


def _sources(*folders: str) -> dict[str, str]:
    return {
        str(path.relative_to(REPO)): path.read_text(encoding="utf-8")
        for folder in folders
        for path in sorted((REPO / folder).rglob("*.py"))
    }


def test_pipelines_holds_only_stage_packages_and_the_runtime_helpers() -> None:
    modules = sorted(p.name for p in (REPO / "pipelines").glob("*.py"))
    packages = sorted(p.name for p in (REPO / "pipelines").iterdir() if (p / "__init__.py").is_file())
    assert modules == ["__init__.py", "runtime.py"]
    assert packages == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_every_entry_point_a_stage_names_exists(stage: str) -> None:
    package = importlib.import_module(f"pipelines.{stage}")
    assert package.__all__, f"pipelines.{stage} names no entry point"
    for name in package.__all__:
        assert getattr(package, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute"):
        package.nothing_by_this_name  # noqa: B018


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (r"mask_utils\.(encode|decode)\(", "vglaw/rle.py"),  # the one RLE codec
        (r"hashlib\.sha256\(", "pipelines/runtime.py"),  # the one file hash
        (r"\.convert\(\s*[\"']RGB[\"']\s*\)", "vglaw/images.py"),  # the one conversion to 8-bit RGB
        (r"def model_identity\(|class ModelIdentity\b", "pipelines/tracking/registry.py"),
        (r"[\"'](model\.safetensors|vocab\.txt)[\"']", "vglaw/"),  # model-directory file names
    ],
)
def test_each_shared_thing_is_written_once(pattern: str, home: str) -> None:
    sources = _sources("pipelines", "jobs", "vglaw")
    found = sorted(path for path, text in sources.items() if re.search(pattern, text))
    assert found, f"{pattern} is nowhere: the check is stale"
    assert all(path.startswith(home) for path in found), f"{pattern} outside {home}: {found}"
