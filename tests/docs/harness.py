"""The fenced ``bash`` and ``python`` blocks of README.md and docs/, as tests (collected by Sybil, conftest.py).

Every block runs as it is written, from the root of a workspace laid out as a clone is after ``make demo``: the
repository's files, ``.venv``, the built-in synthetic data in ``data/synthetic`` and
``data/processed/synthetic_unc_128``, a tiny model in ``runs/vglaw-synthetic/model`` registered in ``mlflow.db``
as ``vglaw-synthetic@best`` (seeded, untrained: the docs' commands need a model, not a good one), and a REFER
download of refcoco in ``data/refer`` and ``data/coco/train2014``. A block that cannot run here says so right
above it, in the Markdown, with its reason:

    <!-- docs: check "needs an AWS account" -->  checked instead of run: each command's flags against its
                                                 ``--help`` (jobs: parsed by their own parser, training
                                                 overrides loaded into the config), the files it names exist,
                                                 cluster and Serve YAML against Ray's schemas;
    <!-- docs: server "runs until Ctrl-C" -->    started in the background and kept until the session ends
                                                 (a page that starts the same command shares it); the test
                                                 waits for http://127.0.0.1:8000/healthz.

Python blocks run in one namespace per page; ``<!-- invisible-code-block: python ... -->`` gives a page the
variables its visible blocks take for granted.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml
from sybil import Document, Example, Region
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer

from tests.pipelines.job_harness import run_job

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The endpoint the docs' Serve commands start (jobs.serve's default port).
ENDPOINT = "http://127.0.0.1:8000"
DIRECTIVE = re.compile(r'<!--\s*docs:\s*(?P<mode>check|server)\s+"(?P<reason>[^"]+)"\s*-->\s*\n\s*$')
# Programs that are not on this machine or that act on things outside it (a cloud, a registry, a Kubernetes
# cluster): their commands are checked through the repository files they name.
EXTERNAL = {"aws", "kubectl", "helm", "docker", "curl", "openssl", "git", "sed", "mkdir", "chmod", "cat", "cd"}
# Top-level repository files and folders the workspace links to (data/, runs/ and mlflow.db are its own).
OWN = {".git", ".venv", "data", "runs", "mlruns", "mlflow.db", "mlartifacts"}


# ---- the workspace -------------------------------------------------------------------------------------------


def docs_env(workspace: Path) -> dict[str, str]:
    """The environment the docs assume: ``.venv`` activated, no cluster address, the workspace's own MLflow store."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "VGLAW_SERVE_TOKEN")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent), PYTHONUNBUFFERED="1")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workspace / 'mlflow.db'}"
    return env


def _run(args: list[str], workspace: Path, timeout: float) -> subprocess.CompletedProcess:
    return run_job(args, docs_env(workspace), timeout, cwd=workspace)


def build_workspace(root: Path) -> Path:
    """A clone's root after a small ``make demo``: linked repository files, its own data, runs and MLflow store."""
    import vglaw
    from pipelines.data.parquet import read_split_table
    from tests.pipelines.quirky_refer import build_quirky_refer

    root.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name not in OWN and not entry.name.startswith((".pytest", ".ruff")):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(BIN.parent)
    python = str(BIN / "python")
    _run([python, "-m", "jobs.synth", "--out", "data/synthetic", "--images", "40", "--seed", "0"], root, 120)
    data = "data/processed/synthetic_unc_128"
    _run(
        [python, "-m", "jobs.preprocess", "--refer-root", "data/synthetic", "--out", data, "--image-size", "128",
         "--num-cpus", "2"],
        root,
        300,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    expressions = read_split_table(root / data, "train", ["expression"]).column("expression").to_pylist()
    tokenizer = vglaw.ExpressionTokenizer.train(expressions, vocab_size=300)
    model = vglaw.create_model("tiny", vocab_size=tokenizer.vocab_size)
    vglaw.save_pretrained(model, tokenizer, root / "runs" / "vglaw-synthetic" / "model")
    shutil.copyfile(root / "data" / "synthetic" / "images" / "synthetic_000001.jpg", root / "photo.jpg")
    # The demo registers its model as vglaw-synthetic, alias best (pipelines.tracking.registry, as training does).
    register = (
        "import mlflow; from mlflow import MlflowClient; from pipelines.tracking.registry import log_vglaw_model\n"
        "mlflow.set_experiment('vglaw-synthetic')\n"
        "with mlflow.start_run(run_name='vglaw-synthetic'):\n"
        "    logged = log_vglaw_model('runs/vglaw-synthetic/model', registered_model_name='vglaw-synthetic')\n"
        "MlflowClient().set_registered_model_alias('vglaw-synthetic', 'best', logged.version)\n"
    )
    _run([python, "-c", register], root, 300)
    # A REFER download: refcoco's refs(unc).p and instances.json, and its images (with the quirks of real ones).
    download = build_quirky_refer(root / "download")
    (root / "data" / "coco").mkdir()
    download.refer_root.rename(root / "data" / "refer")
    download.image_root.rename(root / "data" / "coco" / "train2014")
    return root


# ---- Sybil: the parser and the evaluators --------------------------------------------------------------------


class DocBlockParser:
    """Regions for ``bash`` and ``python`` fences and invisible Python blocks, each with its mode."""

    def __init__(self) -> None:
        self.fences = FencedCodeBlockLexer(language=r"bash|python")
        self.invisible = DirectiveInHTMLCommentLexer(directive="invisible-code-block", arguments="python")

    def __call__(self, document: Document) -> Iterator[Region]:
        for region in self.fences(document):
            language, source = region.lexemes["language"], str(region.lexemes["source"])
            directive = DIRECTIVE.search(document.text, 0, region.start)
            mode, reason = (directive["mode"], directive["reason"]) if directive else ("run", "")
            if language == "python":
                if mode != "run":
                    raise ValueError(f"python blocks run; '{mode}' applies to bash blocks only")
                yield Region(region.start, region.end, source, evaluate_python)
            else:
                evaluator = {"run": run_bash, "check": check_bash, "server": start_server}[mode]
                yield Region(region.start, region.end, (source, reason), evaluator)
        for region in self.invisible(document):
            yield Region(region.start, region.end, str(region.lexemes["source"]), evaluate_python)


def evaluate_python(example: Example) -> None:
    workspace = example.namespace["docs_workspace"]
    code = compile("\n" * example.line + example.parsed, str(example.path), "exec")
    with contextlib.chdir(workspace):  # as a user's shell would have it
        exec(code, example.namespace)


def run_bash(example: Example) -> None:
    source, _ = example.parsed
    workspace = example.namespace["docs_workspace"]
    _run(["bash", "-eo", "pipefail", "-c", source], workspace, 900)  # -e as a script; no -u, as a shell


def start_server(example: Example) -> None:
    """Start the block in the background, once per session (pages that start the same server share it; stopped by
    :func:`stop_servers`); wait until the endpoint is healthy."""
    source, _ = example.parsed
    workspace, servers = example.namespace["docs_workspace"], example.namespace["docs_servers"]
    (argv,) = commands(source)
    key = shlex.join([Path(argv[0]).name, *argv[1:]])  # .venv/bin/python is python: .venv/bin leads the PATH
    if key in servers and servers[key][0].poll() is None:
        return
    stop_servers(servers)  # another command on the same port
    log = open(workspace / f"server-{len(servers)}.log", "w")  # noqa: SIM115 (closed by stop_servers)
    server = subprocess.Popen(
        ["bash", "-c", f"exec {source.strip()}"], cwd=workspace, env=docs_env(workspace), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    servers[key] = (server, log)
    from tests.pipelines.serve_harness import wait_until_healthy  # torch and vglaw: only once a page serves

    if wait_until_healthy(ENDPOINT, server, timeout=300):
        return
    log.flush()
    raise AssertionError(f"the server did not become healthy:\n{Path(log.name).read_text()[-4000:]}")


def stop_servers(servers: dict[str, tuple[subprocess.Popen, Any]]) -> None:
    """Ctrl-C to each server, as its user would; what outlives a minute is killed."""
    for server, log in servers.values():
        family = [server, *psutil.Process(server.pid).children(recursive=True)] if server.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=60)
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
        log.close()
    servers.clear()


# ---- checking what cannot run here ---------------------------------------------------------------------------


def commands(source: str) -> Iterator[list[str]]:
    """The simple commands of a bash block: continuations joined, comments, redirections and ``VAR=`` prefixes
    dropped, ``$(...)`` kept as one word, ``&&`` / ``;`` / ``|`` split."""
    text = re.sub(r"\\\n", " ", source)
    text = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", text)
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", ";", "|", "||", "&"):
                if command:
                    yield command
                command = []
            elif command and command[-1] in (">", ">>", "2>", "<"):
                command.pop()
            elif not command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
                continue
            else:
                command.append(word)


def check_bash(example: Example) -> None:
    source, _ = example.parsed
    workspace = example.namespace["docs_workspace"]
    for argv in commands(source):
        check_command(argv, workspace)


def check_command(argv: list[str], workspace: Path) -> None:
    """Fails if ``argv`` cannot be what it claims on this machine: an unknown flag, a missing file, a bad config."""
    program = Path(argv[0]).name
    if program == "export":
        return
    if program in EXTERNAL:
        _check_named_files(argv, workspace)
    elif program == "python":
        _check_python(argv, workspace)
    elif program == "make":
        _run(["make", "-n", *argv[1:]], workspace, 60)
    elif program in ("ray", "serve", "mlflow"):
        _check_cli(argv, workspace)
    else:
        raise AssertionError(f"no check for {program!r}: run the block, or teach tests/docs/harness.py to check it")


def _check_named_files(argv: list[str], workspace: Path) -> None:
    for word in argv:
        if re.match(r"(cluster|configs|docs|jobs|pipelines|benchmarks|vglaw)/", word):
            matches = glob.glob(word, root_dir=workspace)
            assert matches, f"{shlex.join(argv)}: {word} names no file of the repository"
            for match in matches:
                if match.endswith((".yaml", ".yml")):
                    list(yaml.safe_load_all((workspace / match).read_text()))


def _check_python(argv: list[str], workspace: Path) -> None:
    if argv[1] == "-c":
        compile(argv[2], "<python -c>", "exec")
        return
    if argv[1] == "-m" and argv[2].startswith("jobs."):
        _check_job(argv[2], argv[3:])
        return
    _check_flags(argv, argv[:3] if argv[1] == "-m" else argv[:2], workspace)


def _check_job(module: str, args: list[str]) -> None:
    """A job's own parser reads the arguments (flags, types, choices); training overrides load into the config."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    parser.exit = _parser_exit  # type: ignore[method-assign]
    parsed = parser.parse_args(args)
    if module == "jobs.train":
        from pipelines.train.config import load_config

        # Weights on the cluster's storage are not here: the key is still checked, with no file behind it.
        overrides = [re.sub(r"^(model\.pretrained_\w+)=(/.*)$", _absent_to_null, o) for o in parsed.overrides]
        load_config(REPO / parsed.config, overrides)


def _absent_to_null(match: re.Match) -> str:
    return match[0] if Path(match[2]).exists() else f"{match[1]}=null"


def _parser_exit(status: int = 0, message: str | None = None) -> None:
    raise AssertionError(message or f"the parser exited with {status}")


def _check_cli(argv: list[str], workspace: Path) -> None:
    """``ray`` / ``serve`` / ``mlflow``: flags against the subcommand's ``--help``, and what it deploys validated."""
    at = argv.index("--") if "--" in argv else len(argv)  # ray job submit ... -- <entrypoint>
    words, entrypoint = argv[:at], argv[at + 1 :]
    depth = 3 if words[:2] == ["ray", "job"] else 2
    _check_flags(words, words[:depth], workspace)
    positional = [w for w in words[depth:] if not w.startswith("-")]
    if words[:2] == ["serve", "deploy"]:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load((workspace / positional[0]).read_text()))
    elif words[:2] == ["serve", "run"]:
        import importlib

        from pipelines.serve.settings import ServeSettings

        module, _, attribute = positional[0].partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), positional[0]
        ServeSettings.model_validate(dict(w.split("=", 1) for w in positional[1:]))
    elif words[0] == "ray" and depth == 2 and positional and positional[0].endswith(".yaml"):
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(yaml.safe_load((workspace / positional[0]).read_text())))
    if entrypoint:
        check_command(entrypoint, workspace)


def _check_flags(argv: list[str], program: list[str], workspace: Path) -> None:
    text = help_text(tuple(program), workspace)
    for word in argv[len(program) :]:
        flag = word.split("=", 1)[0]
        if re.fullmatch(r"--?[A-Za-z][\w-]*", flag):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{shlex.join(argv)}: no {flag} in {program}"
            )


@functools.cache
def help_text(program: tuple[str, ...], workspace: Path) -> str:
    return _run([*program, "--help"], workspace, 120).stdout
