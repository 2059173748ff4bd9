"""Deterministic, content-addressed held-out splits.

Every example has a key (e.g. a Countdown problem's target and sorted numbers). Distinct
keys are ranked by a salted BLAKE2b hash; the first ``test_size`` keys in that ranking form
the test set and every example with one of those keys goes to test, all others to train.
Consequences:

* the split depends only on content and the salt, not on file order or sampling seed;
* duplicated examples can never straddle train and test;
* ``test_size`` counts distinct keys (an int) or is a fraction of them (a float in (0, 1)).

:func:`in_test_bucket` is the streaming counterpart for procedurally generated data, where
the population is not known in advance: a key is held out iff its salted hash falls into
the first ``fraction`` of the hash range, so train and test generators never share a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")

_HASH_BYTES = 8
_HASH_RANGE = 1 << (8 * _HASH_BYTES)


def key_hash(key: Hashable, salt: str) -> int:
    """A stable 64-bit hash of ``repr(key)`` under ``salt`` (unlike the per-run ``hash``)."""
    digest = hashlib.blake2b(
        repr(key).encode("utf-8", "surrogatepass"),
        digest_size=_HASH_BYTES,
        person=b"reflax-split",
        key=salt.encode("utf-8")[:64],
    ).digest()
    return int.from_bytes(digest, "big")


def held_out_split(
    examples: Sequence[T],
    *,
    key: Callable[[T], Hashable],
    test_size: int | float,
    salt: str,
) -> tuple[list[T], list[T]]:
    """``(train, test)``, ordered by key rank; membership is independent of input order."""
    keyed = [(key(example), example) for example in examples]
    ranked = sorted({k for k, _ in keyed}, key=lambda k: (key_hash(k, salt), repr(k)))
    if isinstance(test_size, float):
        n_test = round(test_size * len(ranked))
    else:
        n_test = min(test_size, len(ranked))
    rank = {k: i for i, k in enumerate(ranked)}
    keyed.sort(key=lambda pair: rank[pair[0]])
    train = [example for k, example in keyed if rank[k] >= n_test]
    test = [example for k, example in keyed if rank[k] < n_test]
    return train, test


def in_test_bucket(key: Hashable, *, fraction: float, salt: str) -> bool:
    """Whether a generated example with ``key`` belongs to the held-out test stream."""
    return key_hash(key, salt) < fraction * _HASH_RANGE


def in_bucket(key: Hashable, *, start: float, stop: float, salt: str) -> bool:
    """Whether ``key``'s salted hash falls in the [start, stop) share of the hash range:
    ``in_test_bucket`` is the bucket [0, fraction); a validation split takes the one after."""
    h = key_hash(key, salt)
    return start * _HASH_RANGE <= h < stop * _HASH_RANGE
