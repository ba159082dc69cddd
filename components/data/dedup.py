"""Deduplication keys and the two dedup passes of the `filter` stage (components/data/filter.py): exact dedup on a
64-bit hash of the normalised text, near dedup by MinHash over word shingles with LSH banding, each candidate pair
confirmed by the signatures' Jaccard estimate. Both passes keep the first occurrence in list order.

Everything is deterministic across processes (blake2b, crc32 and numpy's seeded generator, never hash()): Ray
workers compute the keys, the driver compares them.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from itertools import chain

import numpy as np

__all__ = ["normalize", "exact_hash", "hash_normalized", "minhash_signatures", "minhash_words",
           "lsh_band_keys", "exact_duplicates", "near_duplicates"]

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Exact-dedup normal form: lower case, punctuation stripped, whitespace collapsed."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def exact_hash(text: str) -> int:
    """64-bit hash of the normal form (blake2b: stable across processes, unlike hash())."""
    return hash_normalized(normalize(text))


def hash_normalized(normalized: str) -> int:
    """exact_hash of a text already in normal form."""
    return int.from_bytes(hashlib.blake2b(normalized.encode(), digest_size=8).digest(), "little", signed=True)


_MASK32 = np.uint64(0xFFFFFFFF)
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)  # murmur3 fmix64 constants


def _mix64(h: np.ndarray) -> np.ndarray:
    """murmur3's finaliser: spreads the rolling combination of word hashes over all 64 bits (wraps mod 2^64)."""
    h = h ^ (h >> np.uint64(33))
    h = h * _M1
    h = h ^ (h >> np.uint64(33))
    h = h * _M2
    return h ^ (h >> np.uint64(33))


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-add-shift hash functions h(x) = (a*x + b) mod 2^64 >> 32 (a odd): no modulo, so fast in numpy."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64 - 1, num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    return a, rng.integers(0, 2**64 - 1, num_perm, dtype=np.uint64, endpoint=True)


def minhash_signatures(texts: list[str], num_perm: int = 128, shingle_size: int = 3, seed: int = 0) -> np.ndarray:
    """MinHash signatures (n_texts, num_perm) uint32 of the texts' word shingles (words of `normalize`)."""
    return minhash_words([normalize(t).split() for t in texts], num_perm, shingle_size, seed)


def minhash_words(word_lists: list[list[str]], num_perm: int, shingle_size: int, seed: int) -> np.ndarray:
    """MinHash over word lists, vectorised over the whole batch; a text shorter than one shingle is one shingle of
    all its words."""
    n = len(word_lists)
    if n == 0:
        return np.empty((0, num_perm), dtype=np.uint32)
    vocab = {w: zlib.crc32(w.encode()) for w in {w for words in word_lists for w in words}}
    lengths = np.fromiter(map(len, word_lists), dtype=np.int64, count=n)
    w = np.fromiter(map(vocab.__getitem__, chain.from_iterable(word_lists)), dtype=np.uint64,
                    count=int(lengths.sum()))  # (W,) word hashes of all texts, concatenated
    ends = np.cumsum(lengths)
    starts = ends - lengths
    n_shingles = np.maximum(lengths - shingle_size + 1, 1)  # (n,) at least one shingle per text
    first = np.cumsum(n_shingles) - n_shingles  # (n,) index of each text's first shingle: the reduceat offsets
    # rolled[i] combines the k word hashes from position i (zero-padded at the end). Windows that run into the
    # next text are never selected, except the single shingle of a text shorter than k, recomputed below.
    padded = np.concatenate([w, np.zeros(shingle_size, dtype=np.uint64)])
    rolled = np.zeros(len(w) + 1, dtype=np.uint64)
    for j in range(shingle_size):
        rolled = rolled * np.uint64(1000003) ^ padded[j:j + len(w) + 1]
    # Shingle start positions, text after text: starts[t] + 0 .. n_shingles[t]-1.
    pos = np.repeat(starts - first, n_shingles) + np.arange(int(n_shingles.sum()))
    x = _mix64(rolled[pos]) & _MASK32  # (S,) 32-bit shingle hashes
    for t in np.flatnonzero(lengths < shingle_size):  # rare: a text shorter than a shingle is one shingle
        h = 0
        for word in w[starts[t]:ends[t]].tolist():
            h = (h * 1000003 ^ word) & 0xFFFFFFFFFFFFFFFF
        x[first[t]] = _mix64(np.array([h], dtype=np.uint64))[0] & _MASK32
    a, b = _permutations(num_perm, seed)
    signatures = np.empty((num_perm, n), dtype=np.uint32)
    for i in range(num_perm):  # one 1-D pass per hash function: cache-friendly, ~10x faster than an (S, k) matrix
        signatures[i] = np.minimum.reduceat(((a[i] * x + b[i]) >> np.uint64(32)).astype(np.uint32), first)
    return np.ascontiguousarray(signatures.T)


def lsh_band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) uint64 bucket keys: each band's rows hashed together, salted by the band index."""
    n, num_perm = signatures.shape
    rows = num_perm // bands
    mult = _mix64(np.arange(1, rows + 1, dtype=np.uint64)) | np.uint64(1)  # odd multipliers, one per row
    sig = signatures.astype(np.uint64).reshape(n, bands, rows)
    keys = (sig * mult[None, None, :]).sum(axis=2, dtype=np.uint64)  # wraps mod 2^64
    return _mix64(keys ^ _mix64(np.arange(bands, dtype=np.uint64))[None, :])


def exact_duplicates(hashes: list[int]) -> list[int]:
    """Indices of the documents whose hash occurred earlier in the list (the first occurrence is kept)."""
    seen: set[int] = set()
    dups = []
    for i, h in enumerate(hashes):
        if h in seen:
            dups.append(i)
        else:
            seen.add(h)
    return dups


def near_duplicates(signatures: np.ndarray, bands: int, threshold: float, max_bucket_docs: int = 8) -> list[int]:
    """Indices of the documents that near-duplicate an earlier *kept* document (in list order).

    LSH: two documents are candidates when all rows of some band agree; a candidate is confirmed when the share of
    equal signature entries (the Jaccard estimate) is >= threshold. Each bucket remembers at most max_bucket_docs
    kept documents, so the pass is O(n * bands * max_bucket_docs).
    """
    keys = lsh_band_keys(signatures, bands)
    buckets: dict[int, list[int]] = {}
    dups = []
    for i in range(len(signatures)):
        row = keys[i].tolist()
        candidates = {j for k in row for j in buckets.get(k, ())}
        if candidates:
            cand = np.fromiter(candidates, dtype=np.int64)
            if ((signatures[cand] == signatures[i]).mean(axis=1) >= threshold).any():
                dups.append(i)
                continue
        for k in row:
            bucket = buckets.setdefault(k, [])
            if len(bucket) < max_bucket_docs:
                bucket.append(i)
    return dups
