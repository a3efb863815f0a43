"""Per-sample seeds of the plan for many samples at once, equal to `plan.sample_seeds`' bit for bit.

`sample_seeds` derives a sample's seeds from `np.random.SeedSequence([seed, row, repeat,
variant]).spawn(2)`: the first child's first 64-bit word gives the variant seed, the second child's
K words the mask seeds (each shifted right by one bit). Called once per sample, SeedSequence costs
about a tenth of a millisecond, most of a million-row plan's time. Its algorithm (Melissa
O'Neill's seed_seq_fe, as numpy implements it in numpy/random/bit_generator.pyx) is uint32 hashing
whose constants do not depend on the data, so it runs here on whole columns of samples with numpy's
wrapping uint32 arithmetic. tests/test_plan_scale.py checks it against SeedSequence itself.
"""

from __future__ import annotations

import numpy as np

POOL_SIZE = 4
INIT_A = 0x43B0D7E5
MULT_A = 0x931E8875
INIT_B = 0x8B51F9DD
MULT_B = 0x58F38DED
MIX_MULT_L = 0xCA01F9DD
MIX_MULT_R = 0x4973F715
XSHIFT = 16
MASK32 = 0xFFFFFFFF


def _words(n: int) -> list[int]:
    """An int's little-endian uint32 words, as SeedSequence splits entropy (0 is one word)."""
    out = [n & MASK32]
    n >>= 32
    while n:
        out.append(n & MASK32)
        n >>= 32
    return out


class _Hash:
    """The running hash constant of one mixing pass; each use advances it (the data's value does
    not enter it, so one Python int serves every column)."""

    def __init__(self, init: int, mult: int):
        self.value = init
        self.mult = mult

    def mix_in(self, column: np.ndarray) -> np.ndarray:
        out = column ^ np.uint32(self.value)
        self.value = (self.value * self.mult) & MASK32
        out = out * np.uint32(self.value)
        return out ^ (out >> np.uint32(XSHIFT))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = x * np.uint32(MIX_MULT_L) - y * np.uint32(MIX_MULT_R)
    return out ^ (out >> np.uint32(XSHIFT))


def _pool(entropy: list[np.ndarray]) -> list[np.ndarray]:
    """The 4-word pool of every column of `entropy` (a list of uint32 columns)."""
    h = _Hash(INIT_A, MULT_A)
    zero = np.zeros_like(entropy[0])
    pool = [h.mix_in(entropy[i] if i < len(entropy) else zero) for i in range(POOL_SIZE)]
    for src in range(POOL_SIZE):
        for dst in range(POOL_SIZE):
            if src != dst:
                pool[dst] = _mix(pool[dst], h.mix_in(pool[src]))
    for src in range(POOL_SIZE, len(entropy)):
        for dst in range(POOL_SIZE):
            pool[dst] = _mix(pool[dst], h.mix_in(entropy[src]))
    return pool


def _state64(pool: list[np.ndarray], n: int) -> np.ndarray:
    """`generate_state(n, np.uint64)` of every column: (N, n) uint64."""
    h = _Hash(INIT_B, MULT_B)
    words = [h.mix_in(pool[i % POOL_SIZE]) for i in range(2 * n)]
    wide = [w.astype(np.uint64) for w in words]
    pairs = zip(wide[0::2], wide[1::2], strict=True)  # little-endian: low word first
    return np.stack([lo | (hi << np.uint64(32)) for lo, hi in pairs], axis=1)


def many_sample_seeds(
    seed: int, rows: np.ndarray, repeats: np.ndarray, variants: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(variant seeds (N,) uint64, mask seeds (N, k) uint64) of N samples: `sample_seeds(seed,
    rows[i], repeats[i], variants[i], k)` for each i. Each column must be below 2**32 (a row,
    repeat or variant number that large would take a second entropy word)."""
    columns = [np.asarray(c, dtype=np.int64) for c in (rows, repeats, variants)]
    for c in columns:
        if c.size and (c.min() < 0 or c.max() > MASK32):
            raise ValueError("row, repeat and variant numbers must lie in 0..2**32-1")
    n = columns[0].shape[0]
    head = [np.full(n, w, dtype=np.uint32) for w in _words(seed % 2**64)]
    run = head + [c.astype(np.uint32) for c in columns]
    # spawn(2): child i appends spawn key i to the parent's entropy (padded to the pool size).
    pad = [np.zeros(n, dtype=np.uint32)] * max(0, POOL_SIZE - len(run))
    child = [_pool([*run, *pad, np.full(n, i, dtype=np.uint32)]) for i in range(2)]
    variant_seeds = _state64(child[0], 1)[:, 0] >> np.uint64(1)
    mask_seeds = _state64(child[1], k) >> np.uint64(1) if k else np.zeros((n, 0), np.uint64)
    return variant_seeds, mask_seeds
