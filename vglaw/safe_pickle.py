"""A restricted unpickler: pickles are data here, never code.

The REFER annotation files (``refs(unc).p``) and detectron2 checkpoints (``.pkl``) are pickles. A plain
``pickle.load`` of a crafted file runs arbitrary code, so every pickle in this project is read through
:func:`load`, which admits only the globals it is told to trust.

Admitting a global by name is not enough where calling it, or setting the state of what it returns, does more
than the writer's use of it needs. Such globals resolve to checked stand-ins below (``_STAND_INS``), which
accept what ``pickle`` and numpy write and refuse the rest; numpy's own ``dtype.__setstate__`` and
``ndarray(..., buffer=...)`` trust their input, and a crafted state forges object pointers from raw bytes or
crashes the interpreter.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Iterable
from typing import IO, Any, ClassVar

import numpy as np

# Globals a numpy array or scalar of a plain numeric dtype needs to unpickle (numpy 1.x and 2.x module paths):
# ``_reconstruct`` then BUILD (protocols 2-4, and non-contiguous arrays at 5), ``_frombuffer`` (contiguous
# arrays at protocol 5), ``scalar`` (numpy scalars).
NUMPY_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
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

# Protocols 0-2 have no bytes opcode: Python 3 writes ``b"..."`` as ``_codecs.encode(text, "latin1")`` and
# ``b""`` as ``bytes()``.
BYTES_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes")}
)

# Everything plain Python data (containers, numbers, strings, bytes) needs at any protocol.
PLAIN_DATA_GLOBALS: frozenset[tuple[str, str]] = CONTAINER_GLOBALS | BYTES_GLOBALS

# numpy dtype kinds an array may have: bool, signed and unsigned integers, floats, complex. Never objects
# ("O"), whose items are pointers, nor structured ("V") dtypes, whose fields may be objects.
_PLAIN_DTYPE_KINDS = "biufc"


# The state numpy writes for a plain dtype, less the byte order: (version, subarray, names, fields, item size,
# alignment, flags), the last three -1, -1, 0 meaning "as the type string says".
_PLAIN_DTYPE_STATE = (3, None, None, None, -1, -1, 0)


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle asks for a global outside the allow-list, or uses an admitted one otherwise."""


def _bytes_from_latin1(text: object, encoding: object) -> bytes:
    """``_codecs.encode`` as protocols 0-2 use it for bytes.

    Safe: a pure str -> bytes function. Other codecs are refused: a codec name is looked up (and its module
    imported) by name, and no writer of plain data needs one.
    """
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode is admitted for (str, 'latin1') only, not {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()`` as protocols 0-2 write ``b""``; ``bytes(n)`` would let a few pickle bytes allocate n."""
    if args:
        raise UnsafePickleError("bytes(...) is admitted without arguments only")
    return b""


def _plain_dtype(spec: object, align: object = False, copy: object = True) -> np.dtype:
    """``numpy.dtype(spec, align, copy)`` for a plain numeric ``spec`` such as ``"f4"``.

    Always a copy: numpy's ``float32`` dtype is shared by the whole process, and the BUILD that follows would
    change it everywhere. Its state is checked in :meth:`_CheckedBuildUnpickler.load_build`.
    """
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy.dtype is admitted for a type string only, not a {type(spec).__name__}")
    dtype = np.dtype(spec, align=bool(align), copy=True)
    if dtype.kind not in _PLAIN_DTYPE_KINDS:
        raise UnsafePickleError(f"numpy dtype {dtype} refused: only bool, integer, float and complex arrays")
    return dtype


class _NdarrayToken:
    """Stands in for ``numpy.ndarray``, which numpy names only as ``_reconstruct``'s first argument.

    Calling ``ndarray(shape, dtype, buffer, offset, strides)`` would make arrays over arbitrary memory.
    """

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise UnsafePickleError("numpy.ndarray may not be called: arrays are admitted as numpy pickles them")


_NDARRAY = _NdarrayToken()


def _empty_array(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's ``_reconstruct(ndarray, (0,), b"b")``: an empty array that the BUILD after it fills.

    Shape and dtype are ignored: the array's state carries both (and a huge shape would allocate here).
    """
    if subtype is not _NDARRAY:
        raise UnsafePickleError("numpy _reconstruct is admitted for numpy.ndarray only")
    return np.empty(0, dtype=np.uint8)


def _array_from_buffer(
    buffer: object, dtype: object, shape: object, order: object, axis_order: object = None
) -> np.ndarray:
    """numpy's ``_frombuffer``: a contiguous array at protocol 5, over the pickle's own (in-band) bytes.

    Safe: ``dtype`` comes from :func:`_plain_dtype` (numeric), so the bytes are numbers, never pointers; numpy
    checks that the buffer holds exactly ``shape``.
    """
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype):
        raise UnsafePickleError("numpy _frombuffer is admitted for in-band bytes and a plain dtype only")
    array = np.frombuffer(buffer, dtype=dtype)
    if order == "K" and axis_order is not None:  # numpy >= 2.3: any memory layout, as axis permutation
        return array.reshape(shape, order="C").transpose(axis_order)
    return array.reshape(shape, order=order)


# What an admitted global resolves to, where it is not the real one.
_STAND_INS: dict[tuple[str, str], Callable[..., Any]] = {
    ("_codecs", "encode"): _bytes_from_latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
}
# numpy's ``scalar(dtype, data)`` is admitted as is: its dtype is a plain one, and numpy checks the data's size.


class _AllowList:
    """``find_class`` limited to an allow-list; admitted globals resolve to their stand-ins where they have one."""

    _allowed: frozenset[tuple[str, str]]

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnsafePickleError(f"refused to unpickle global '{module}.{name}': only plain data is accepted here")
        if (module, name) in _STAND_INS:
            return _STAND_INS[module, name]
        if module == "__builtin__":  # Python 2 pickles
            module = "builtins"
        return super().find_class(module, name)  # type: ignore[misc]


class _RestrictedUnpickler(_AllowList, pickle.Unpickler):
    """The C unpickler, for pickles without numpy: BUILD can only reach admitted plain containers."""

    def __init__(self, file: IO[bytes], allowed: frozenset[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed


class _CheckedBuildUnpickler(_AllowList, pickle._Unpickler):
    """The pure-Python unpickler, whose BUILD (``obj.__setstate__(state)``) can be checked.

    Used where numpy is admitted. Checkpoints hold few, large opcodes, so its speed does not matter there.
    """

    dispatch: ClassVar[dict[int, Callable[..., Any]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], allowed: frozenset[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def load_build(self) -> None:
        """BUILD is admitted for numpy dtypes and arrays only, with the state numpy writes for plain ones."""
        if len(self.stack) < 2:
            raise pickle.UnpicklingError("BUILD on an empty stack")
        target, state = self.stack[-2], self.stack[-1]
        if type(target) is np.ndarray:
            # (version, shape, dtype, fortran order, data); numpy checks the data's size against the shape.
            if not (
                isinstance(state, tuple)
                and len(state) == 5
                and isinstance(state[2], np.dtype)
                and isinstance(state[4], (bytes, bytearray, str))  # str: Python 2 pickles, decoded as latin1
            ):
                raise UnsafePickleError("numpy array state refused: not the form numpy writes for plain arrays")
        elif isinstance(target, np.dtype):
            # (version, byte order, subarray, names, fields, item size, alignment, flags): a crafted state
            # turns any dtype into one with object fields, or crashes numpy.
            if not (
                isinstance(state, tuple)
                and len(state) == 8
                and type(state[1]) is str
                and state[1] in ("<", ">", "|", "=")
                and all(type(a) is type(b) and a == b for a, b in zip(state[:1] + state[2:], _PLAIN_DTYPE_STATE))
            ):
                raise UnsafePickleError(f"numpy dtype state {state!r} refused: only plain numeric dtypes")
        else:
            raise UnsafePickleError(f"refused to set the state of a {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def load(
    source: str | os.PathLike[str] | bytes | IO[bytes],
    allow: Iterable[tuple[str, str]] = PLAIN_DATA_GLOBALS,
    encoding: str = "latin1",
) -> Any:
    """Unpickle ``source`` admitting only the ``(module, name)`` globals in ``allow``.

    Args:
        source: a path, the pickle's bytes, or a binary file object.
        allow: globals the pickle may reference; anything else raises :class:`UnsafePickleError`. Add
            :data:`NUMPY_GLOBALS` for numpy arrays (of bool, integer, float and complex dtypes).
        encoding: how Python 2 ``str`` objects are decoded (REFER files were written by Python 2).
    """
    allowed = frozenset(allow)
    unpickler = _CheckedBuildUnpickler if allowed & NUMPY_GLOBALS else _RestrictedUnpickler
    if isinstance(source, bytes):
        return unpickler(io.BytesIO(source), allowed, encoding=encoding).load()
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return unpickler(f, allowed, encoding=encoding).load()
    return unpickler(source, allowed, encoding=encoding).load()
