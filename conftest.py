"""The Markdown pages as tests: every fenced bash and python block of README.md and docs/ (tests/docs/harness.py)."""

from __future__ import annotations

import pytest
from sybil import Sybil

from tests.docs.harness import DocBlockParser, build_workspace, stop_servers


@pytest.fixture(scope="session")
def docs_workspace(tmp_path_factory: pytest.TempPathFactory):
    """The clone-after-``make demo`` the pages' blocks run in (built once per session)."""
    return build_workspace(tmp_path_factory.mktemp("docs") / "vglaw-ray")


@pytest.fixture(scope="session")
def docs_servers():
    """The servers the pages started, by command; stopped when the session ends."""
    servers: dict = {}
    yield servers
    stop_servers(servers)


def _teardown(namespace: dict) -> None:
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a page's Ray Data read, in this process
        sys.modules["ray"].shutdown()


pytest_collect_file = Sybil(
    parsers=[DocBlockParser()],
    patterns=["README.md", "docs/*.md"],
    fixtures=["docs_workspace", "docs_servers"],
    teardown=_teardown,
).pytest()
