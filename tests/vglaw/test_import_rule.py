"""The model library knows nothing about the cluster: no ray, mlflow or torch.distributed under vglaw/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vglaw

FORBIDDEN = ("ray", "mlflow", "torch.distributed")


def _is_forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def test_no_forbidden_import_statements() -> None:
    offenders = []
    for path in Path(vglaw.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if _is_forbidden(n)]
    assert not offenders, offenders


def _loaded_after_import(imports: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` a fresh interpreter has in ``sys.modules`` after ``import <imports>``."""
    code = f"import sys, {imports}\nprint(','.join(m for m in {candidates!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_importing_vglaw_loads_no_cluster_module() -> None:
    imports = "vglaw, vglaw.weights, vglaw.predictor, vglaw.losses, vglaw.metrics, vglaw.geometry"
    loaded = _loaded_after_import(imports, ("ray", "mlflow"))
    assert loaded == [], f"importing vglaw pulled in: {loaded}"


def test_data_pipeline_modules_do_not_load_torch() -> None:
    # Preprocessing workers letterbox PIL images and numpy masks only; torch would add seconds to each
    # worker's start.
    loaded = _loaded_after_import(
        "vglaw.geometry, vglaw.safe_pickle, pipelines.data.preprocess", ("torch", "timm", "transformers")
    )
    assert loaded == [], f"the data pipeline pulled in: {loaded}"


def test_package_names_load_on_first_use() -> None:
    assert set(vglaw.__all__) <= set(dir(vglaw))
    for name in vglaw.__all__:
        assert getattr(vglaw, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        vglaw.Nope  # noqa: B018


def test_submodules_are_reachable_from_the_package_alone() -> None:
    # README: `import vglaw` and then `vglaw.weights.load_vit_weights(...)`, with no `import vglaw.weights`.
    code = "import vglaw\nprint(vglaw.weights.load_vit_weights.__module__, vglaw.geometry.Letterbox.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["vglaw.weights", "Letterbox"]
