"""The restricted unpickler: plain data and numpy arrays at every protocol, never code or forged arrays."""

from __future__ import annotations

import builtins
import codecs
import importlib
import os
import pickle
import subprocess
from collections import OrderedDict

import numpy as np
import pytest
from numpy._core.multiarray import _reconstruct

from vglaw import safe_pickle
from vglaw.safe_pickle import NUMPY_GLOBALS, PLAIN_DATA_GLOBALS, UnsafePickleError

WITH_NUMPY = PLAIN_DATA_GLOBALS | NUMPY_GLOBALS


class _Reduce:
    """Pickles as the ``__reduce__`` value it is given: how the tests write crafted pickles."""

    def __init__(self, *value: object) -> None:
        self.value = value

    def __reduce__(self) -> tuple[object, ...]:
        return self.value


def _plain_data() -> dict[str, object]:
    return {
        "int": 7,
        "negative": -3,
        "big": 2**80,
        "float": 0.1,
        "inf": float("inf"),
        "str": "the man on the left — ☃",
        "bytes": b"\x00\xffab",
        "empty bytes": b"",
        "none": None,
        "bools": [True, False],
        "nested": {"list": [1, [2.5, "x"], (3, b"y")], "tuple": ((), (1,)), "empty": {}},
        "set": {1, 2},
        "ordered": OrderedDict(b=1, a=2),
    }


def _arrays() -> dict[str, object]:
    grid = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    return {
        "float32": grid,
        "int64": np.arange(-5, 5, dtype=np.int64),
        "uint8": np.arange(250, 256, dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "float16": np.array([0.5, -2.0], dtype=np.float16),
        "complex64": np.array([1 + 2j], dtype=np.complex64),
        "0-d": np.array(3.25),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(grid),
        "strided": np.arange(20, dtype=np.int64)[::3],
        "transposed": grid.T,
        "big-endian": np.arange(4, dtype=">i4"),
        "scalars": [np.float32(1.5), np.int64(-2), np.bool_(True)],
        "same array twice": [grid, grid],
    }


def _assert_same(loaded: object, original: object, reference: object) -> None:
    """``loaded`` holds ``original``'s values, with the types and dtypes that plain ``pickle`` gives (``reference``)."""
    assert type(loaded) is type(reference), (type(loaded), type(reference))
    if isinstance(original, dict):
        assert list(loaded) == list(original)
        for key in original:
            _assert_same(loaded[key], original[key], reference[key])
    elif isinstance(original, (list, tuple)):
        assert len(loaded) == len(original)
        for item, expected, ref in zip(loaded, original, reference):
            _assert_same(item, expected, ref)
    elif isinstance(original, np.ndarray):
        assert loaded.dtype == reference.dtype and loaded.shape == original.shape
        assert loaded.flags.writeable
        np.testing.assert_array_equal(loaded, original)
    else:
        assert loaded == original


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_data_and_numpy_arrays_round_trip(protocol) -> None:
    original = {"plain": _plain_data(), "arrays": _arrays()}
    data = pickle.dumps(original, protocol=protocol)
    loaded = safe_pickle.load(data, allow=WITH_NUMPY)
    _assert_same(loaded, original, pickle.loads(data))
    assert loaded["arrays"]["same array twice"][0] is loaded["arrays"]["same array twice"][1]


@pytest.mark.parametrize("protocol", [2, 5])
def test_plain_data_needs_no_numpy(protocol) -> None:
    original = _plain_data()
    data = pickle.dumps(original, protocol=protocol)
    _assert_same(safe_pickle.load(data), original, pickle.loads(data))
    with pytest.raises(UnsafePickleError, match="numpy"):
        safe_pickle.load(pickle.dumps(np.zeros(2), protocol=protocol))


def test_numpy_1_module_paths_load() -> None:
    """detectron2's model zoo was pickled under numpy 1.x, which names ``numpy.core.multiarray``."""
    original = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.5)}
    data = pickle.dumps(original, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray\n_reconstruct" in data
    _assert_same(safe_pickle.load(data, allow=WITH_NUMPY), original, pickle.loads(data))


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("call", [os.system, builtins.eval, builtins.exec, subprocess.check_call])
def test_code_is_refused_and_does_not_run(tmp_path, protocol, call) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    argument = {
        os.system: command,
        builtins.eval: f"__import__('os').system({command!r})",
        builtins.exec: f"import os; os.system({command!r})",
        subprocess.check_call: ["touch", str(marker)],
    }[call]
    data = pickle.dumps({"model": {"x": _Reduce(call, (argument,))}}, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=call.__name__):
        safe_pickle.load(data, allow=WITH_NUMPY)
    assert not marker.exists()


@pytest.mark.parametrize("call", [builtins.getattr, importlib.import_module, builtins.__import__, np.load])
def test_reaching_for_code_is_refused(call) -> None:
    data = pickle.dumps(_Reduce(call, ("os",)), protocol=4)
    with pytest.raises(UnsafePickleError, match=call.__name__):
        safe_pickle.load(data, allow=WITH_NUMPY)


# Admitted globals used other than the way pickle and numpy use them. numpy itself would build the forged
# arrays: object pointers from raw bytes, memory outside the buffer, or a crash.
FORGED = {
    "a codec other than latin1": (_Reduce(codecs.encode, ("text", "rot13")), "latin1"),
    "bytes(n) allocating n": (_Reduce(bytes, (10**9,)), "without arguments"),
    "ndarray over a buffer": (_Reduce(np.ndarray, ((2,), np.dtype("u1"), b"ab", -5)), "may not be called"),
    "_reconstruct of another type": (_Reduce(_reconstruct, (OrderedDict, (0,), b"b")), "ndarray only"),
    "object array": (np.array([1, "a"], dtype=object), "only bool, integer"),
    "structured array": (np.zeros(2, dtype=[("a", "<i4")]), "only bool, integer"),
    "dtype with forged flags": (
        _Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 27)),
        "dtype state",
    ),
    "dtype with forged fields": (
        _Reduce(np.dtype, ("f8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("f8"), 0)}, 8, 1, 0)),
        "dtype state",
    ),
    "state of another object": (_Reduce(OrderedDict, (), {"attribute": 1}), "set the state of a OrderedDict"),
}


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("name", list(FORGED))
def test_admitted_globals_are_refused_other_uses(name, protocol) -> None:
    payload, message = FORGED[name]
    with pytest.raises(UnsafePickleError, match=message):
        safe_pickle.load(pickle.dumps({"x": payload}, protocol=protocol), allow=WITH_NUMPY)


def test_out_of_band_buffers_are_refused() -> None:
    """A file cannot carry protocol 5's out-of-band buffers; a pickle that asks for one is refused."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(np.arange(3), protocol=5, buffer_callback=buffers.append)
    assert buffers
    with pytest.raises(pickle.UnpicklingError, match="out-of-band"):
        safe_pickle.load(data, allow=WITH_NUMPY)
