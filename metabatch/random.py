"""Explicit, splittable random keys.

A [`Key`][metabatch.random.Key] is a small immutable value. Every random decision in metabatch
flows from one: derive new keys with [`split`][metabatch.random.split] and
[`fold_in`][metabatch.random.fold_in], and turn a key into numbers with
[`numpy_rng`][metabatch.random.numpy_rng] or [`torch_generator`][metabatch.random.torch_generator].
The same key gives the same numbers on every machine, in every process and
for any number of loader workers. Nothing here touches a global RNG.

Derivation is a pure-Python SplitMix64-style mix of two 64-bit words (about
a microsecond per call), with separate domains for `split` and
`fold_in` so that `fold_in(k, 0)` never equals `split(k)[0]`.

Examples:
    >>> import metabatch as mb
    >>> k = mb.random.key(0)
    >>> k1, k2 = mb.random.split(k)
    >>> k1 == mb.random.split(k)[0], k1 == k2
    (True, False)
    >>> rng = mb.random.numpy_rng(mb.random.fold_in(k, 3))
    >>> int(rng.integers(100)) == int(mb.random.numpy_rng(mb.random.fold_in(k, 3)).integers(100))
    True
"""

from __future__ import annotations

import numpy as np
import torch

from . import _validate

__all__ = ["Key", "key", "split", "fold_in", "numpy_rng", "torch_generator", "key_data", "key_from_data"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Domain tags keep the split and fold_in derivations apart.
_FOLD_TAG = 0x243F6A8885A308D3
_SPLIT_TAG = 0x13198A2E03707344


def _mix(z: int) -> int:
    """SplitMix64 finaliser: a bijection of 64-bit ints with good avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class Key:
    """An opaque, immutable, hashable and picklable random key.

    Make one with [`key`][metabatch.random.key]; never construct it directly. Two keys are equal
    when they hold the same 128 bits. The repr shows those bits in hex so that
    a key printed in an error message can be rebuilt with
    [`key_from_data`][metabatch.random.key_from_data], the inverse of [`key_data`][metabatch.random.key_data].

    Examples:
        >>> import pickle, metabatch as mb
        >>> k = mb.random.key(42)
        >>> pickle.loads(pickle.dumps(k)) == k
        True
    """

    __slots__ = ("_hi", "_lo")
    _hi: int
    _lo: int

    def __init__(self, *args, **kwargs):
        raise TypeError("Key is opaque: make one with metabatch.random.key(seed), "
                        "then derive others with split() and fold_in().")

    @classmethod
    def _from_words(cls, hi: int, lo: int) -> Key:
        self = object.__new__(cls)
        object.__setattr__(self, "_hi", hi & _MASK)
        object.__setattr__(self, "_lo", lo & _MASK)
        return self

    def __setattr__(self, name, value):
        raise AttributeError("Key is immutable")

    def __eq__(self, other):
        if not isinstance(other, Key):
            return NotImplemented
        return self._hi == other._hi and self._lo == other._lo

    def __hash__(self):
        return hash((Key, self._hi, self._lo))

    def __reduce__(self):
        return (Key._from_words, (self._hi, self._lo))

    def __repr__(self):
        return f"Key({self._hi:#018x}, {self._lo:#018x})"


def _check_key(k, fn: str) -> Key:
    if not isinstance(k, Key):
        raise TypeError(f"{fn}() needs a metabatch.random.Key, got {k!r} of type "
                        f"{type(k).__name__}; make one with metabatch.random.key(seed).")
    return k


def _as_uint64(value, name: str, fn: str) -> int:
    value = _validate.integer(value, name, fn)  # TypeError for a bool, a float, a string...
    if not 0 <= value <= _MASK:
        raise ValueError(f"{fn}(): {name} must lie in [0, 2**64), got {value}.")
    return value


def key(seed: int) -> Key:
    """Make a key from an integer seed.

    Args:
        seed: an int in `[0, 2**64)` (numpy integers are accepted).

    Returns:
        The [`Key`][metabatch.random.Key] of that seed; equal seeds give equal keys.

    Raises:
        TypeError: `seed` is not an int.
        ValueError: `seed` is negative or too large.

    Examples:
        >>> import metabatch as mb
        >>> mb.random.key(0) == mb.random.key(0), mb.random.key(0) == mb.random.key(1)
        (True, False)
    """
    seed = _as_uint64(seed, "seed", "key")
    return Key._from_words(_mix(seed ^ _GOLDEN), _mix((seed + _GOLDEN) & _MASK ^ _FOLD_TAG))


def fold_in(key: Key, data: int) -> Key:
    """Derive a new key from `key` and an integer (a step, a task position...).

    `fold_in(k, i)` for `i = 0, 1, 2, ...` gives independent streams: use it
    where the data has a natural index, and [`split`][metabatch.random.split] where it has none.

    Args:
        key: the parent key (left unchanged: keys are immutable).
        data: an int in `[0, 2**64)`.

    Returns:
        A new [`Key`][metabatch.random.Key].

    Examples:
        >>> import metabatch as mb
        >>> k = mb.random.key(0)
        >>> mb.random.fold_in(k, 1) == mb.random.fold_in(k, 1), mb.random.fold_in(k, 1) == mb.random.fold_in(k, 2)
        (True, False)
    """
    _check_key(key, "fold_in")
    data = _as_uint64(data, "data", "fold_in")
    d = _mix((data ^ _FOLD_TAG) + _GOLDEN & _MASK)
    hi = _mix(key._hi ^ d)
    return Key._from_words(hi, _mix((key._lo + hi) & _MASK ^ _mix(d ^ _GOLDEN)))


def split(key: Key, num: int = 2) -> tuple[Key, ...]:
    """Split a key into `num` new, independent keys.

    Never reuse the parent after splitting: `key, sub = split(key)`.

    Args:
        key: the parent key.
        num: how many keys to make (`>= 1`).

    Returns:
        A tuple of `num` keys.

    Raises:
        ValueError: `num < 1`.

    Examples:
        >>> import metabatch as mb
        >>> k, sub = mb.random.split(mb.random.key(0))
        >>> len(mb.random.split(k, 5))
        5
    """
    _check_key(key, "split")
    num = _validate.integer(num, "num", "split", low=1, high=_MASK)
    out = []
    for i in range(num):
        d = _mix((i ^ _SPLIT_TAG) + _GOLDEN & _MASK)
        hi = _mix(key._lo ^ d)
        out.append(Key._from_words(hi, _mix((key._hi + hi) & _MASK ^ _mix(d ^ _SPLIT_TAG))))
    return tuple(out)


def key_data(key: Key) -> tuple[int, int]:
    """The two 64-bit words of a key, e.g. to log or checkpoint it.

    Examples:
        >>> import metabatch as mb
        >>> hi, lo = mb.random.key_data(mb.random.key(0))
        >>> mb.random.key_from_data((hi, lo)) == mb.random.key(0)
        True
    """
    _check_key(key, "key_data")
    return key._hi, key._lo


def key_from_data(data: tuple[int, int]) -> Key:
    """The key whose `key_data` is `data`: rebuild a key from a log line or a checkpoint.

    Error messages of the loader print a failing task's key as these two words,
    so that the task can be rerun alone.

    Args:
        data: a pair `(hi, lo)` of ints in `[0, 2**64)`.

    Returns:
        The [`Key`][metabatch.random.Key].

    Raises:
        TypeError: `data` is not a pair of ints.
        ValueError: a word lies outside `[0, 2**64)`.

    Examples:
        >>> import metabatch as mb
        >>> k = mb.random.fold_in(mb.random.key(3), 7)
        >>> mb.random.key_from_data(mb.random.key_data(k)) == k
        True
    """
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"key_from_data(): data must be a pair (hi, lo) of ints as returned by key_data(), "
                        f"got {data!r}.")
    hi, lo = (_as_uint64(v, "data", "key_from_data") for v in data)
    return Key._from_words(hi, lo)


class _KeySeedSequence:
    """numpy's ISeedSequence protocol fed straight from a key (5x cheaper than SeedSequence)."""

    __slots__ = ("_key",)

    def __init__(self, key: Key):
        self._key = key

    def generate_state(self, n_words: int, dtype=np.uint32) -> np.ndarray:
        dtype = np.dtype(dtype)
        n64 = n_words if dtype == np.uint64 else -(-n_words // 2)
        hi, lo = self._key._hi, self._key._lo
        # The key's bits are already mixed; further words cost one mix each.
        words = [hi, lo] + [_mix(((hi if i % 2 else lo) + i * _GOLDEN) & _MASK) for i in range(2, n64)]
        if dtype == np.uint64:
            return np.array(words, dtype=np.uint64)
        if dtype != np.uint32:
            raise ValueError(f"generate_state(): dtype must be uint32 or uint64, got {dtype}.")
        halves = [h for w in words for h in (w & 0xFFFFFFFF, w >> 32)]
        return np.array(halves[:n_words], dtype=np.uint32)


np.random.bit_generator.ISeedSequence.register(_KeySeedSequence)


def numpy_rng(key: Key) -> np.random.Generator:
    """A fresh `numpy.random.Generator` (PCG64) seeded by `key`.

    The stream is fixed by the key and NumPy's PCG64 bit generator, which NumPy
    keeps stable across releases and platforms. PCG64's initial state is
    hashed straight from the key's bits (no `SeedSequence`): about 2 µs.

    Examples:
        >>> import metabatch as mb
        >>> k = mb.random.key(7)
        >>> a = mb.random.numpy_rng(k).normal(size=3)
        >>> b = mb.random.numpy_rng(k).normal(size=3)
        >>> bool((a == b).all())
        True
    """
    _check_key(key, "numpy_rng")
    return np.random.Generator(np.random.PCG64(_KeySeedSequence(key)))  # type: ignore[arg-type]  # a SeedSequence duck


def torch_generator(key: Key, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh `torch.Generator` on `device` seeded by `key`.

    Pass it as `generator=` to `torch.rand`, `torch.randn`,
    `torch.randint`, `torch.randperm`...

    Examples:
        >>> import torch, metabatch as mb
        >>> g1 = mb.random.torch_generator(mb.random.key(1))
        >>> g2 = mb.random.torch_generator(mb.random.key(1))
        >>> torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
        True
    """
    _check_key(key, "torch_generator")
    g = torch.Generator(device=device)
    g.manual_seed(_mix(key._hi ^ _mix(key._lo)))
    return g
