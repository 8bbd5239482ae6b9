"""``manifest.json``: what a preprocessed output holds, where it came from, and what was skipped.

The manifest is written last, after every Parquet file, so its presence marks a complete output.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines.runtime import text_sha256

__all__ = [
    "MANIFEST_NAME",
    "code_version",
    "manifest_digest",
    "parquet_file_rows",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"


def code_version() -> dict[str, str | None]:
    """The package version and, when run from a git checkout, the commit (``+dirty`` if modified)."""
    try:
        version: str | None = metadata.version("vglaw-ray")
    except metadata.PackageNotFoundError:
        version = None
    commit: str | None = None
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": version, "git_commit": commit}


def parquet_file_rows(folder: str | os.PathLike[str]) -> dict[str, int]:
    """``file name -> row count`` for the Parquet files in ``folder``, from their footers."""
    return {p.name: pq.ParquetFile(p).metadata.num_rows for p in sorted(Path(folder).glob("*.parquet"))}


# What the digest leaves out: when the output was written, and the digest itself.
UNDIGESTED = ("created_at", "digest")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The dataset's fingerprint: the manifest's own ``digest``, or for an output written before manifests had
    one, the first 32 hex digits of the SHA-256 of its canonical JSON (sorted keys, no whitespace) without
    :data:`UNDIGESTED` (what :func:`write_manifest` stores). It covers the files and their row counts, the
    source files' hashes, the settings and the code version."""
    if manifest.get("digest"):
        return str(manifest["digest"])
    body = {k: v for k, v in manifest.items() if k not in UNDIGESTED}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return text_sha256(canonical)[:32]


def write_manifest(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Writes ``manifest`` as ``folder/manifest.json`` (through a temporary file and a rename), with its
    ``digest`` (:func:`manifest_digest`)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    body = {k: v for k, v in manifest.items() if k != "digest"}
    body["digest"] = manifest_digest(body)
    body.setdefault("created_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads ``folder/manifest.json``.

    Raises:
        FileNotFoundError: If there is no manifest (the output is missing or incomplete).
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a complete preprocessed output")
    return json.loads(path.read_text(encoding="utf-8"))
