"""Declared dependencies and the lock file.

Every third-party package the code imports is declared in pyproject.toml: the code (vglaw/, pipelines/,
jobs/, benchmarks/) in [project] dependencies, the tests in those or in the dev extra. A package that only
arrives through another one (FastAPI through Ray Serve, pandas through MLflow) is not declared by that, and
disappears the day the other one drops it.

constraints.txt, the lock file written by `make lock`, pins every one of them and everything they pull in,
at versions that satisfy pyproject.toml; `make setup` and the cluster image install with it.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = REPO / "constraints.txt"

CODE_DIRS = ("vglaw", "pipelines", "jobs", "benchmarks")
TEST_DIRS = ("tests",)
# The project's own top-level packages: the installed ones and the repository-only benchmarks/ and tests/.
FIRST_PARTY = {
    *(pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]),
    *CODE_DIRS,
    *TEST_DIRS,
}
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _requirement_names(requirements: Iterable[str]) -> set[NormalizedName]:
    return {canonicalize_name(Requirement(r).name) for r in requirements} - {PROJECT}


def declared_main() -> set[NormalizedName]:
    return _requirement_names(PYPROJECT["project"]["dependencies"])


def declared_dev() -> set[NormalizedName]:
    return _requirement_names(PYPROJECT["project"]["optional-dependencies"]["dev"])


def imported_modules(dirs: Iterable[str], root: Path = REPO) -> dict[str, set[str]]:
    """Top-level module -> the files (relative to root) that import it, for every absolute import statement
    (also inside functions, TYPE_CHECKING blocks and try blocks), standard library and first party left out."""
    found: dict[str, set[str]] = {}
    for directory in dirs:
        for path in sorted((root / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.partition(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY:
                        continue
                    found.setdefault(top, set()).add(str(path.relative_to(root)))
    return found


def undeclared(imports: dict[str, set[str]], declared: set[NormalizedName]) -> dict[str, str]:
    """module -> why, for each imported module that no declared distribution provides."""
    providers = importlib.metadata.packages_distributions()
    problems = {}
    for module, files in sorted(imports.items()):
        # One module can come from several distributions (mlflow: mlflow, mlflow-skinny, mlflow-tracing).
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        where = ", ".join(sorted(files)[:3]) + (" ..." if len(files) > 3 else "")
        if not dists:
            problems[module] = f"no installed distribution provides it (imported by {where})"
        elif not dists & declared:
            problems[module] = f"provided by {'/'.join(sorted(dists))}, which is not declared (imported by {where})"
    return problems


def read_constraints(path: Path = CONSTRAINTS) -> dict[NormalizedName, Requirement]:
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{path.name}:{number}: {name} pinned twice"
        pins[name] = requirement
    return pins


def pinned_version(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator in ("==", "==="), requirement
    return specifier.version


def lock_python() -> tuple[int, int] | None:
    """The Python (major, minor) the lock was generated with, from its header."""
    match = re.search(r"^# Generated by .* with Python (\d+)\.(\d+)", CONSTRAINTS.read_text(), re.M)
    return (int(match[1]), int(match[2])) if match else None


def requirement_closure(requirements: Iterable[str]) -> dict[NormalizedName, str]:
    """Every distribution the requirements pull in, through the metadata of the installed ones (markers
    evaluated for this interpreter): name -> the requirement that first reached it."""
    reached: dict[NormalizedName, set[str]] = {}
    why: dict[NormalizedName, str] = {}
    stack = [
        (r.name, set(r.extras), f"pyproject.toml: {r}")
        for r in map(Requirement, requirements)
        if r.marker is None or r.marker.evaluate({"extra": ""})
    ]
    while stack:
        name, wanted, reason = stack.pop()
        key = canonicalize_name(name)
        if key in reached and wanted <= reached[key]:
            continue
        reached[key] = reached.get(key, set()) | wanted
        why.setdefault(key, reason)
        try:
            texts = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (a stale .venv): its own requirements are unknown
        for text in texts:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                stack.append((requirement.name, set(requirement.extras), f"{name}: {text}"))
    return why


def make_variables(text: str) -> dict[str, str]:
    variables = {}
    for name, value in re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[:?]?=\s*(.*?)\s*$", text, re.M):
        variables.setdefault(name, value)
    return variables


def make_expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(5):
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], m[0]), text)
    return text


def make_rules(path: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """(target, prerequisites, recipe lines) of each rule in a Makefile, variables expanded."""
    text = path.read_text().replace("\\\n", " ")
    variables = make_variables(text)
    target = None
    for line in text.splitlines():
        if line.startswith("\t") and target is not None:
            target[2].append(make_expand(line.strip(), variables))
            continue
        if target is not None:
            yield target
            target = None
        match = re.match(r"^([^\s#=:][^=:]*?)\s*:(?!=)\s*(.*)$", line)
        if match:
            target = (make_expand(match[1], variables), make_expand(match[2], variables).split(), [])
    if target is not None:
        yield target


def pip_installs(command: str) -> list[list[str]]:
    """The argument lists of the `pip install` commands in a shell command line."""
    if "pip install" not in command:
        return []
    words = shlex.split(command.replace("&&", " && ").replace(";", " ; "))
    installs, current = [], None
    for i, word in enumerate(words):
        if word in ("&&", "||", ";", "|"):
            current = None
        elif word == "install" and i > 0 and words[i - 1] == "pip":
            current = []
            installs.append(current)
        elif current is not None:
            current.append(word)
    return installs


def constraint_files(args: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--constraint") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--constraint="):
            files.append(arg.split("=", 1)[1])
    return files


# --------------------------------------------------------------------------------------------------
# Declared dependencies
# --------------------------------------------------------------------------------------------------


def test_code_imports_only_declared_packages() -> None:
    problems = undeclared(imported_modules(CODE_DIRS), declared_main())
    assert not problems, (
        "third-party packages imported by the code but not in [project] dependencies of pyproject.toml "
        "(add them, then `make lock`):\n" + "\n".join(f"  {m}: {why}" for m, why in problems.items())
    )


def test_tests_import_only_declared_packages() -> None:
    problems = undeclared(imported_modules(TEST_DIRS), declared_main() | declared_dev())
    assert not problems, (
        "third-party packages imported by the tests but in neither [project] dependencies nor the dev extra "
        "(add them to dev, then `make lock`):\n" + "\n".join(f"  {m}: {why}" for m, why in problems.items())
    )


def test_mlflow_3_is_required() -> None:
    (mlflow,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "mlflow"]
    assert not mlflow.specifier.contains("2.22.0"), mlflow
    assert mlflow.specifier.contains("3.0.0"), mlflow


def test_the_check_finds_an_undeclared_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "import os\nfrom . import sibling\nimport vglaw.model\n\ndef f():\n    import pytest.mark\n"
    )
    imports = imported_modules(["pkg"], root=tmp_path)
    assert imports == {"pytest": {"pkg/mod.py"}}
    assert set(undeclared(imports, declared_main())) == {"pytest"}
    assert undeclared(imports, {canonicalize_name("pytest")}) == {}
    assert set(undeclared({"surely_not_installed_xyz": {"x.py"}}, declared_main())) == {"surely_not_installed_xyz"}


# --------------------------------------------------------------------------------------------------
# The lock file
# --------------------------------------------------------------------------------------------------


def test_every_declared_dependency_is_pinned_within_its_bounds() -> None:
    pins = read_constraints()
    requirements = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["dev"]]
    missing, outside = [], []
    for text in requirements:
        requirement = Requirement(text)
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            missing.append(text)
        elif not requirement.specifier.contains(Version(pinned_version(pin)), prereleases=True):
            outside.append(f"{text} but {pin}")
    assert not missing, f"not pinned in constraints.txt (run `make lock`): {missing}"
    assert not outside, f"constraints.txt pins versions pyproject.toml excludes (run `make lock`): {outside}"


def test_pins_are_exact_pypi_releases() -> None:
    for requirement in read_constraints().values():
        assert not requirement.url and not requirement.extras and requirement.marker is None, requirement
        version = pinned_version(requirement)
        # A local build ("2.14.1+cpu") is not what PyPI serves CI, the demo and the cluster image.
        assert Version(version).local is None, requirement
        assert "*" not in version, requirement
    # "===" matches only that exact string, so a "+cpu" build of the same version (--find-links, another
    # index) can never be chosen in place of PyPI's, and torch and torchvision stay one build.
    pins = read_constraints()
    for name in ("torch", "torchvision"):
        (specifier,) = pins[canonicalize_name(name)].specifier
        assert specifier.operator == "===", pins[canonicalize_name(name)]


def test_everything_the_dependencies_pull_in_is_pinned() -> None:
    if lock_python() != sys.version_info[:2]:
        pytest.skip(f"constraints.txt was locked for Python {lock_python()}; markers differ on this one")
    pins = read_constraints()
    project = PYPROJECT["project"]
    closure = requirement_closure([*project["dependencies"], *project["optional-dependencies"]["dev"]])
    unpinned = {name: why for name, why in closure.items() if name not in pins}
    assert not unpinned, "installed dependencies missing from constraints.txt (run `make lock`):\n" + "\n".join(
        f"  {name} (from {why})" for name, why in sorted(unpinned.items())
    )


# --------------------------------------------------------------------------------------------------
# Where the lock file is used
# --------------------------------------------------------------------------------------------------


def test_make_setup_installs_with_the_lock_file() -> None:
    rules = {target: (prerequisites, recipe) for target, prerequisites, recipe in make_rules(REPO / "Makefile")}
    (stamp,) = rules["setup"][0]
    prerequisites, recipe = rules[stamp]
    assert CONSTRAINTS.name in prerequisites, "a new lock file must reinstall .venv"
    installs = [args for line in recipe for args in pip_installs(line) if any(".[dev]" in a for a in args)]
    assert installs, recipe
    for args in installs:
        assert constraint_files(args) == [CONSTRAINTS.name], args
    assert "lock" in rules, "`make lock` regenerates constraints.txt"
    assert any(f"> {CONSTRAINTS.name}" in line or f" {CONSTRAINTS.name};" in line for line in rules["lock"][1])


def test_the_cluster_image_installs_with_the_lock_file() -> None:
    text = (REPO / "cluster" / "Dockerfile").read_text().replace("\\\n", " ")
    copied = [w for line in text.splitlines() if line.startswith("COPY ") for w in line.split()[1:-1]]
    assert CONSTRAINTS.name in copied
    installs = [args for line in text.splitlines() if line.startswith("RUN ") for args in pip_installs(line[4:])]
    assert installs
    for args in installs:
        assert constraint_files(args) == [CONSTRAINTS.name], args
    patterns = [p for p in (REPO / ".dockerignore").read_text().split() if not p.startswith(("#", "!"))]
    assert not [p for p in patterns if fnmatch.fnmatch(CONSTRAINTS.name, p)], "constraints.txt is dockerignored"


def test_the_cluster_launcher_installs_with_the_lock_file() -> None:
    text = (REPO / "cluster" / "launcher-aws-a100.yaml").read_text()
    project_installs = [
        args
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for args in pip_installs(line.strip().lstrip("- "))
        if "-e" in args
    ]
    assert project_installs
    for args in project_installs:
        assert [Path(f).name for f in constraint_files(args)] == [CONSTRAINTS.name], args
