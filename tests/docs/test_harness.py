"""The docs harness itself: it splits blocks into commands as bash would, reads each block's mode from the
Markdown, and its checks fail on what a reader's copy-paste would fail on."""

from __future__ import annotations

import pytest
from sybil import Document

from tests.docs.harness import REPO, DocBlockParser, check_bash, check_command, commands, evaluate_python, run_bash


def test_commands_are_split_as_bash_would() -> None:
    block = (
        "export RAY_ADDRESS=http://127.0.0.1:8265   # the dashboard\n"
        "VGLAW_SERVE_TOKEN=$(openssl rand -hex 32) python -m jobs.serve --model ... \\\n"
        "    --host 0.0.0.0\n"
        'python -c "import secrets; print(1)" > ~/token && chmod 600 ~/token\n'
        "# a comment line\n"
        "kubectl get pods | grep ray\n"
    )
    assert list(commands(block)) == [
        ["export", "RAY_ADDRESS=http://127.0.0.1:8265"],
        ["python", "-m", "jobs.serve", "--model", "...", "--host", "0.0.0.0"],
        ["python", "-c", "import secrets; print(1)"],
        ["chmod", "600", "~/token"],
        ["kubectl", "get", "pods"],
        ["grep", "ray"],
    ]


def test_each_block_takes_the_mode_written_above_it(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n"
        '<!-- docs: check "needs a cluster" -->\n```bash\nray up cluster/launcher-aws-a100.yaml\n```\n\n'
        "```bash\nls\n```\n\n"
        '<!-- docs: server "serves until Ctrl-C" -->\n```bash\npython -m jobs.serve --model m\n```\n\n'
        "<!-- invisible-code-block: python\nx = 1\n-->\n```python\nprint(x)\n```\n\n"
        "```yaml\nnot: a block the harness runs\n```\n"
    )
    regions = sorted(DocBlockParser()(Document(page.read_text(), str(page))), key=lambda r: r.start)
    assert [r.evaluator.__name__ for r in regions] == [
        "check_bash",
        "run_bash",
        "start_server",
        "evaluate_python",
        "evaluate_python",
    ]
    assert regions[0].parsed == ("ray up cluster/launcher-aws-a100.yaml\n", "needs a cluster")
    assert regions[4].parsed == "print(x)\n"


def test_a_python_block_may_not_be_only_checked(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text('<!-- docs: check "why" -->\n```python\nprint(1)\n```\n')
    with pytest.raises(ValueError, match="python blocks run"):
        list(DocBlockParser()(Document(page.read_text(), str(page))))


@pytest.mark.parametrize(
    "command",
    [
        "python -m jobs.train --config configs/synthetic.yaml optim.epochs=2 run.name=quick",
        "python -m jobs.evaluate --model models:/vglaw-synthetic@best --data d --splits val --actors 2",
        "ray job submit --working-dir . -- python -m jobs.preprocess --dataset refcoco --split-by unc "
        "--refer-root /r --out /o",
        "kubectl apply -f cluster/kuberay/rayjob-train.yaml",
        "serve run pipelines.serve:build_app model=runs/m max_batch_size=8",
    ],
)
def test_a_command_as_documented_passes_its_check(command: str) -> None:
    for argv in commands(command):
        check_command(argv, REPO)


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("python -m jobs.train --config configs/synthetic.yaml optim.epoch=2", "epoch"),  # no such field
        ("python -m jobs.train --config configs/synthetic.yaml --epochs 2", "unrecognized arguments"),
        ("python -m jobs.evaluate --model m --data d --splits val --actor-count 2", "unrecognized arguments"),
        ("ray job submit --working-dir . --gpus 1 -- python -m jobs.train", "no --gpus"),
        ("ray job submit --working-dir . -- python -m jobs.train --config configs/nope.yaml", "nope.yaml"),
        ("kubectl apply -f cluster/kuberay/nope.yaml", "names no file"),
        ("serve run pipelines.serve:build_app model=runs/m max_batch=8", "max_batch"),
        ("python benchmarks/model_step.py --preset tiny --batches 8", "no --batches"),
        ("terraform apply", "no check for 'terraform'"),
    ],
)
def test_a_command_that_would_fail_fails_its_check(command: str, error: str) -> None:
    with pytest.raises(Exception, match=error):
        for argv in commands(command):
            check_command(argv, REPO)


class _Example:
    def __init__(self, parsed, workspace) -> None:
        self.parsed, self.namespace, self.path, self.line = parsed, {"docs_workspace": workspace}, "page.md", 3


def test_a_failing_block_fails_and_python_runs_in_the_workspace(tmp_path) -> None:
    with pytest.raises(AssertionError, match="no-such-command"):
        run_bash(_Example(("no-such-command --flag\n", ""), tmp_path))
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        check_bash(_Example(("python -m jobs.synth --out x --images-count 3\n", "why"), tmp_path))
    example = _Example("from pathlib import Path\nhere = Path.cwd()\n", tmp_path)
    evaluate_python(example)
    assert example.namespace["here"] == tmp_path
