"""prep/predictions.py: reading a predictions pickle asks for no more memory than the file
holds, and runs no code."""

import pickle
import struct
import time

import numpy as np
import pytest
import torch

from prep.errors import PrepError
from prep.predictions import read_predictions, safe_load


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


HOSTILE = {
    # torch.FloatStorage(3e9): 12 GB from a 40-byte file
    "storage constructor": b"\x80\x02" + _global("torch", "FloatStorage")
    + b"J\x00\x5e\xd0\xb2\x85R.",
    # bytearray(2**34) through an allowed builtin
    "bytearray size": b"\x80\x02" + _global("builtins", "bytearray")
    + b"\x8a\x05\x00\x00\x00\x00\x04\x85R.",
    # numpy.ndarray((100000, 100000)): 80 GB of float64
    "ndarray shape": b"\x80\x02" + _global("numpy", "ndarray")
    + b"J\xa0\x86\x01\x00J\xa0\x86\x01\x00\x86\x85R.",
    # BINBYTES8 announcing 2**40 bytes, followed by three
    "bytes8 length": b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.",
    # BINUNICODE8 likewise
    "unicode8 length": b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"abc.",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_pickle_cannot_ask_for_more_memory_than_it_holds(tmp_path, name):
    path = tmp_path / "r.pkl"
    path.write_bytes(HOSTILE[name])
    t0 = time.perf_counter()
    with pytest.raises(PrepError, match=r"r.pkl: (refused|truncated)"):
        read_predictions(path)
    assert time.perf_counter() - t0 < 2  # refused before anything was allocated


def test_what_the_formats_hold_still_loads(tmp_path):
    """Tensors, arrays, OrderedDict, sets, bytearray: protocols 3 to 5."""
    from collections import OrderedDict

    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "t": torch.ones(3),
           "o": OrderedDict(x=1), "b": bytearray(b"ab"), "s": {1, 2}, "i": np.int64(3)}
    for proto in (3, 4, 5):
        path = tmp_path / f"p{proto}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=proto))
        back = safe_load(path)
        assert back["a"].shape == (2, 3) and back["t"].sum() == 3 and back["b"] == b"ab"
        assert back["o"] == {"x": 1} and back["s"] == {1, 2} and back["i"] == 3
