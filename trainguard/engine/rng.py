"""The host's python, numpy and torch-CPU RNG streams: per-sample seeds, a cheap check of whether
anything drew from the streams (:class:`RngWatch`), and putting them back as they were.

With them, :class:`~trainguard.engine.fetch.SampleFetcher` and the user's collator behave as if
seeded per sample or per batch, and pay for seeding only once something draws.
"""

from __future__ import annotations

import _random
import contextlib
import ctypes
import pickle
import random
import struct
import sys

import numpy as np
import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index`` in ``epoch`` (also of a batch, from its ids, for the user's collator)."""
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**31 - 1)


class RngWatch:
    """Tells whether anything drew from the python, numpy or torch-CPU global RNG between two
    :meth:`mark` s, in about 5 us a mark (reading the three states the usual way takes 45 us:
    numpy's ``get_state`` copies its 624 words one by one in Python, python's ``getstate`` makes
    625 int objects).

    Both Mersenne Twisters are read as raw bytes instead, 1 us each, with their cached second
    gaussian (using it changes nothing else): numpy's words at its bit generator's
    ``ctypes.state_address``; python's words, and numpy's ``has_gauss``/``gauss``, inside the
    generator objects, at the place where known values were found once (searched only within the
    object's size; numpy's on a private ``RandomState`` with a cached gaussian, drawn to check the
    flag clears). Where a search fails, that generator is read the usual way.
    """

    _py_offset: int | None = None  # python: where `int index; uint32 state[624]` sits in its generator (-1: not found)
    _np_offset: int | None = None  # numpy: where `int has_gauss; double gauss` sits in a RandomState (-1: not found)

    @classmethod
    def _python(cls) -> tuple:
        gen = random.random.__self__  # the generator behind the module's functions
        if cls._py_offset is None:
            words = random.getstate()[1]
            raw = struct.pack("=i624I", words[624], *words[:624])
            ok = type(gen) in (random.Random, _random.Random)
            cls._py_offset = ctypes.string_at(id(gen), type(gen).__basicsize__).find(raw) if ok else -1
        if cls._py_offset < 0:
            return "state", random.getstate()
        return "mt", ctypes.string_at(id(gen) + cls._py_offset, 4 + 624 * 4), gen.gauss_next

    @classmethod
    def _find_gauss(cls) -> int:
        rs = np.random.RandomState(12345)
        rs.standard_normal()  # draws two gaussians and keeps the second
        gauss = rs.get_state()[4]
        at = ctypes.string_at(id(rs), type(rs).__basicsize__).find(struct.pack("=d", gauss))
        if at < 8 or ctypes.c_int.from_address(id(rs) + at - 8).value != 1:  # aug_bitgen_t: {bitgen_t *; int has_gauss; double gauss}
            return -1
        rs.standard_normal()  # uses the kept one
        return at if ctypes.c_int.from_address(id(rs) + at - 8).value == 0 else -1

    @classmethod
    def _numpy(cls) -> tuple:
        rs = np.random.mtrand._rand
        if cls._np_offset is None:
            cls._np_offset = cls._find_gauss()
        bg = rs._bit_generator
        if type(bg) is not np.random.MT19937 or cls._np_offset < 0:  # another bit generator set globally, or not found
            return "state", pickle.dumps(np.random.get_state(legacy=False))
        words = ctypes.string_at(bg.ctypes.state_address, 624 * 4 + 4)  # uint32 key[624]; int pos
        has_gauss = ctypes.c_int.from_address(id(rs) + cls._np_offset - 8).value
        return "mt", words, ctypes.c_double.from_address(id(rs) + cls._np_offset).value if has_gauss else None

    @classmethod
    def mark(cls) -> tuple:
        """The three streams' states, to compare with a later mark or to go back to."""
        return cls._python(), cls._numpy(), torch.default_generator.get_state()

    @staticmethod
    def same(a: tuple, b: tuple) -> bool:
        """Whether nothing drew from the RNGs between marks ``a`` and ``b``."""
        return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])

    @staticmethod
    def restore(mark: tuple) -> None:
        """Put the three streams back as they were at ``mark``."""
        py, nps, tg = mark
        if nps[0] == "state":
            np.random.set_state(pickle.loads(nps[1]))
        else:
            _, raw, gauss = nps
            key = np.frombuffer(raw[:-4], dtype=np.uint32).copy()
            pos = int.from_bytes(raw[-4:], sys.byteorder, signed=True)
            np.random.set_state(("MT19937", key, pos, int(gauss is not None), gauss or 0.0))
        if py[0] == "state":
            random.setstate(py[1])
        else:
            _, raw, gauss_next = py
            index, *words = struct.unpack("=i624I", raw)
            random.setstate((3, (*words, index), gauss_next))
        torch.default_generator.set_state(tg)


@contextlib.contextmanager
def host_rng_kept():
    """Leave this process's python/numpy/torch-CPU RNG streams as they were (dropout, ...)."""
    saved = RngWatch.mark()
    try:
        yield
    finally:
        RngWatch.restore(saved)
