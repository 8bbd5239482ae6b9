"""A restricted unpickler: pickles are data here, never code.

The REFER annotation files (``refs(unc).p``) and detectron2 checkpoints (``.pkl``) are pickles. A plain
``pickle.load`` of a crafted file runs arbitrary code, so every pickle in this project is read through
:func:`load`, which admits only the globals it is told to trust.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterable
from typing import IO, Any

# Globals a numpy array needs to unpickle (numpy 1.x and 2.x module paths).
NUMPY_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)

# Plain containers that some writers pickle by reference rather than by opcode.
CONTAINER_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle asks for a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: frozenset[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnsafePickleError(f"refused to unpickle global '{module}.{name}': only plain data is accepted here")
        if module == "__builtin__":  # Python 2 pickles
            module = "builtins"
        return super().find_class(module, name)


def load(
    source: str | os.PathLike[str] | bytes | IO[bytes],
    allow: Iterable[tuple[str, str]] = CONTAINER_GLOBALS,
    encoding: str = "latin1",
) -> Any:
    """Unpickle ``source`` admitting only the ``(module, name)`` globals in ``allow``.

    Args:
        source: a path, the pickle's bytes, or a binary file object.
        allow: globals the pickle may reference; anything else raises :class:`UnsafePickleError`.
        encoding: how Python 2 ``str`` objects are decoded (REFER files were written by Python 2).
    """
    allowed = frozenset(allow)
    if isinstance(source, bytes):
        return _RestrictedUnpickler(io.BytesIO(source), allowed, encoding=encoding).load()
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _RestrictedUnpickler(f, allowed, encoding=encoding).load()
    return _RestrictedUnpickler(source, allowed, encoding=encoding).load()
