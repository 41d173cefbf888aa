"""Philox4x32-R and Philox2x32-R (Salmon et al. 2011) in numpy: the reference of every Philox in the
package (the C++ replacement op's Philox4x32-10 in csrc/philox.h, the attention kernels' Philox2x32-7).
test_replace.py and test_attention.py check them against the Random123 known answers."""
import numpy as np

U32 = np.uint64(0xFFFFFFFF)


def philox4x32(ctr, key, rounds=10):
    """ctr = 4 word arrays, key = 2 word arrays (anything broadcastable) -> 4 uint32 arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    for rnd in range(rounds):
        if rnd:  # the key is bumped before rounds 2..R
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & U32, (k1 + np.uint64(0xBB67AE85)) & U32
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)   # < 2^64: no overflow
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & U32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & U32
    return [c.astype(np.uint32) for c in (c0, c1, c2, c3)]


def philox2x32(ctr, key, rounds=10):
    """ctr = 2 word arrays, key = 1 word array (anything broadcastable) -> 2 uint32 arrays."""
    c0, c1 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k = np.asarray(key, dtype=np.uint64)
    for rnd in range(rounds):
        if rnd:  # the key is bumped before rounds 2..R
            k = (k + np.uint64(0x9E3779B9)) & U32
        p = c0 * np.uint64(0xD256D193)                                       # < 2^64: no overflow
        c0, c1 = (p >> np.uint64(32)) ^ c1 ^ k, p & U32
    return [c.astype(np.uint32) for c in (c0, c1)]
