"""Seeded, random-access batch specs: which tasks, and of which size, at every step.

`batch_specs(seed, ...)[step]` is a pure function of `(seed, step)`: a
[`BatchSpec`][metabatch.BatchSpec] holding the batch key, the task indices and the `n_ctx` /
`n_tgt` shared by every task of that batch. Because the sequence is random
access, resuming at a step, sharding over ranks and changing the loader's
worker count never change which tasks are drawn.

How the stream is derived from the seed (stable; golden tests pin it):

- `root = key(seed)`; `k_tasks, k_sizes, k_perms = split(root, 3)`.
- The batch key of global step `s` is `fold_in(k_tasks, s)`; task `j` of
  the global batch is built with `fold_in(spec.key, j)`.
- `n_ctx` then `n_tgt` are drawn (inclusive ranges) from
  `numpy_rng(fold_in(k_sizes, s))`.
- Task indices: the stream of global positions `0, 1, 2, ...` is cut into
  epochs of `num_tasks`; epoch `e` is the permutation
  `numpy_rng(fold_in(k_perms, e)).permutation(num_tasks)` (identity with
  `shuffle=False`), and step `s` takes positions `s*B .. s*B+B-1`. Every
  task appears once per epoch; a batch may straddle two epochs.
- Above `HUGE = 2**24` tasks an epoch's permutation is not materialised (it
  would take `8 * num_tasks` bytes): position `p` of epoch `e` maps to
  `_feistel(fold_in(k_perms, e), num_tasks)(p)`, a keyed bijection of
  `range(num_tasks)` (a 4-round Feistel network on the smallest even number
  of bits that covers `num_tasks`, cycle-walking back into range), computed
  per index in O(1) memory. `num_tasks` may then be anything up to `2**64`.

Sizes are checked up front: `n_ctx` / `n_tgt` at most `2**40` points,
`batch_size` at most `MAX_BATCH = 2**16` tasks (a spec lists its task
indices), and steps only as far as positions stay below `2**64`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from . import _validate
from . import random as _random

__all__ = ["BatchSpec", "BatchSpecs", "batch_specs"]

#: Above this many task indices, epochs are permuted per position (no materialised permutation).
HUGE = 2**24
#: The most tasks one (global) batch may hold: a spec lists its indices.
MAX_BATCH = 2**16
_U64 = 2**64 - 1
_FEISTEL_ROUNDS = 4

SizeArg = int | Sequence[int]


class BatchSpec(NamedTuple):
    """The shape of one batch: what every worker needs to build it.

    Attributes:
        step: the global step this batch belongs to.
        key: the batch key; task `j` uses `fold_in(key, offset + j)`.
        indices: the task indices of this batch (this rank's share of it).
        n_ctx: the number of context (support) points of every task.
        n_tgt: the number of target (query) points of every task.
        offset: the position of `indices[0]` inside the global batch
            (`rank * batch_size // world_size`; 0 without sharding).
    """

    step: int
    key: _random.Key
    indices: tuple
    n_ctx: int
    n_tgt: int
    offset: int = 0

    def task_keys(self) -> tuple:
        """The key of each task of this spec, in order of `indices`.

        Examples:
            >>> import metabatch as mb
            >>> spec = mb.batch_specs(0, num_tasks=10, batch_size=4, n_ctx=5, n_tgt=5)[0]
            >>> spec.task_keys()[1] == mb.random.fold_in(spec.key, 1)
            True
        """
        return tuple(_random.fold_in(self.key, self.offset + j) for j in range(len(self.indices)))


def _mix64(z: int) -> int:
    """SplitMix64's finaliser (the round function of the Feistel permutation)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def _feistel(key: _random.Key, n: int):
    """A keyed bijection of `range(n)`, computed per index: `perm(i)` in O(1) memory.

    A balanced Feistel network on the smallest even number of bits `2h` with
    `2**(2h) >= n` permutes `range(2**(2h))`; cycle-walking (apply it again
    until the value is below `n`) restricts it to `range(n)`, taking fewer
    than 4 rounds of walking on average since `2**(2h) < 4n`.
    """
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    keys = [_random.key_data(_random.fold_in(key, r))[0] for r in range(_FEISTEL_ROUNDS)]

    def perm(i: int) -> int:
        x = i
        while True:
            left, right = x >> half, x & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            x = (left << half) | right
            if x < n:
                return x

    return perm


class BatchSpecs:
    """A lazy, random-access sequence of `BatchSpec`; see [`batch_specs`][metabatch.batch_specs].

    `specs[step]` gives the spec of any global step (`step >= 0`), whatever
    `start` is; iteration yields `specs[start], specs[start + 1], ...`.
    """

    def __init__(self, seed, num_tasks, batch_size, n_ctx, n_tgt, *, shuffle=True,
                 num_batches=None, start=0, rank=0, world_size=1):
        fn = "batch_specs"
        self.seed = _validate.integer(seed, "seed", fn, low=0, high=_U64)
        self.num_tasks = _validate.integer(num_tasks, "num_tasks", fn, low=1, high=_U64)
        self.batch_size = _validate.integer(batch_size, "batch_size", fn, low=1, high=MAX_BATCH)
        self.n_ctx = _validate.int_range(n_ctx, "n_ctx", fn)
        self.n_tgt = _validate.int_range(n_tgt, "n_tgt", fn)
        self.shuffle = _validate.flag(shuffle, "shuffle", fn)
        # Global positions (step * batch_size + ...) stay below 2**64, as fold_in needs.
        self.max_steps = (_U64 + 1) // self.batch_size
        self.start = _validate.integer(start, "start", fn, low=0, high=self.max_steps - 1)
        self.num_batches = None if num_batches is None else _validate.integer(
            num_batches, "num_batches", fn, low=0, high=self.max_steps)
        if self.num_batches is not None and self.start > self.num_batches:
            raise ValueError(f"batch_specs(): start={self.start} lies past the end of the stream "
                             f"(num_batches={self.num_batches}).")
        self.world_size = _validate.integer(world_size, "world_size", fn, low=1, high=MAX_BATCH)
        self.rank = _validate.integer(rank, "rank", fn, low=0)
        if self.rank >= self.world_size:
            raise ValueError(f"batch_specs(): rank={self.rank} must be < world_size={self.world_size}.")
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_specs(): batch_size={self.batch_size} (the global batch) must "
                             f"be divisible by world_size={self.world_size}; each rank gets "
                             f"batch_size // world_size tasks.")
        self.local_batch_size = self.batch_size // self.world_size
        self._k_tasks, self._k_sizes, self._k_perms = _random.split(_random.key(self.seed), 3)
        self._perm_cache: dict = {}

    # -- the stream -------------------------------------------------------------------------
    def _perm(self, epoch: int):
        """Epoch `epoch`'s permutation: an array, or a function of the position above `HUGE` tasks."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            key = _random.fold_in(self._k_perms, epoch)
            if self.num_tasks > HUGE:
                perm = _feistel(key, self.num_tasks)
            else:
                perm = _random.numpy_rng(key).permutation(self.num_tasks)
            if len(self._perm_cache) >= 2:  # a batch touches at most the current and next epoch
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = perm
        return perm

    def _indices(self, first: int, count: int) -> tuple:
        out: list[int] = []
        while count:
            epoch, pos = divmod(first, self.num_tasks)
            take = min(count, self.num_tasks - pos)
            if not self.shuffle or self.num_tasks == 1:  # (the permutation of one task is (0,))
                out.extend(range(pos, pos + take))
            elif self.num_tasks > HUGE:
                perm = self._perm(epoch)
                out.extend(perm(p) for p in range(pos, pos + take))
            else:
                out.extend(self._perm(epoch)[pos:pos + take].tolist())
            first += take
            count -= take
        return tuple(out)

    def __getitem__(self, step) -> BatchSpec:
        if not _validate.is_int(step):
            raise TypeError(f"batch specs are indexed by a global step (int), got {step!r:.80}.")
        step = operator.index(step)
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}: specs are indexed by global step.")
        if self.num_batches is not None and step >= self.num_batches:
            raise IndexError(f"step {step} lies past the end of the stream (num_batches={self.num_batches}).")
        if step >= self.max_steps:
            raise IndexError(f"step {step} lies past the last step this stream can address ({self.max_steps - 1}: "
                             f"positions step * batch_size must stay below 2**64).")
        rng = _random.numpy_rng(_random.fold_in(self._k_sizes, step))
        n_ctx = int(rng.integers(self.n_ctx[0], self.n_ctx[1], endpoint=True))
        n_tgt = int(rng.integers(self.n_tgt[0], self.n_tgt[1], endpoint=True))
        offset = self.rank * self.local_batch_size
        indices = self._indices(step * self.batch_size + offset, self.local_batch_size)
        return BatchSpec(step, _random.fold_in(self._k_tasks, step), indices, n_ctx, n_tgt, offset)

    def __iter__(self) -> Iterator[BatchSpec]:
        step = self.start
        while self.num_batches is None or step < self.num_batches:
            yield self[step]
            step += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this batch-spec stream is infinite (num_batches=None) and has no len(); "
                            "pass num_batches=... for a finite one.")
        return self.num_batches - self.start

    def replace(self, **changes) -> BatchSpecs:
        """A copy with some arguments changed, e.g. `specs.replace(start=step)` to resume.

        Examples:
            >>> import metabatch as mb
            >>> specs = mb.batch_specs(0, num_tasks=10, batch_size=2, n_ctx=1, n_tgt=1, num_batches=5)
            >>> [s.step for s in specs.replace(start=3)]
            [3, 4]
        """
        args = dict(seed=self.seed, num_tasks=self.num_tasks, batch_size=self.batch_size,
                    n_ctx=self.n_ctx, n_tgt=self.n_tgt, shuffle=self.shuffle,
                    num_batches=self.num_batches, start=self.start, rank=self.rank,
                    world_size=self.world_size)
        args.update(changes)
        seed, num_tasks, batch_size, n_ctx, n_tgt = (args.pop(k) for k in
                                                     ("seed", "num_tasks", "batch_size", "n_ctx", "n_tgt"))
        return BatchSpecs(seed, num_tasks, batch_size, n_ctx, n_tgt, **args)

    def __repr__(self):
        return (f"batch_specs(seed={self.seed}, num_tasks={self.num_tasks}, batch_size={self.batch_size}, "
                f"n_ctx={self.n_ctx}, n_tgt={self.n_tgt}, shuffle={self.shuffle}, "
                f"num_batches={self.num_batches}, start={self.start}, rank={self.rank}, "
                f"world_size={self.world_size})")


def batch_specs(seed: int, num_tasks: int, batch_size: int, n_ctx: SizeArg, n_tgt: SizeArg, *,
                shuffle: bool = True, num_batches: int | None = None, start: int = 0,
                rank: int = 0, world_size: int = 1) -> BatchSpecs:
    """The seeded stream of batch specs that drives `task_loader`.

    Args:
        seed: the seed of the whole stream (an int in `[0, 2**64)`).
        num_tasks: how many task indices there are (`>= 1`, up to `2**64 - 1`);
            each epoch visits every index once. Above `2**24` no permutation is
            materialised: each index is computed on its own (see the module's notes).
        batch_size: tasks per *global* batch (over all ranks), at most `2**16`.
        n_ctx: context points per task: an int, or an inclusive `(low, high)`
            range drawn once per batch; at most `2**40`.
        n_tgt: target points per task, like `n_ctx`.
        shuffle: a fresh permutation of the indices every epoch; `False` walks
            `0, 1, 2, ...` in order.
        num_batches: the length of the stream (steps `0 .. num_batches-1`);
            `None` for an endless stream.
        start: the first step iteration yields; `start=k` resumes the stream
            exactly where step `k` begins.
        rank: this process's rank; it gets the `rank`-th contiguous chunk of
            every global batch.
        world_size: the number of ranks; must divide `batch_size`.

    Returns:
        A [`BatchSpecs`][metabatch.BatchSpecs]; `specs[step]` gives random access and
        `iter(specs)` the stream from `start`.

    Raises:
        ValueError: a size is negative, above its limit or empty (`n_ctx=(5, 2)`),
            `batch_size` or `num_tasks` is not positive, `rank >= world_size`,
            or `batch_size % world_size != 0`.
        TypeError: an argument is not an int (or pair of ints; `shuffle` not a bool).

    Examples:
        >>> import metabatch as mb
        >>> specs = mb.batch_specs(seed=0, num_tasks=6, batch_size=3, n_ctx=(1, 5), n_tgt=4)
        >>> spec = specs[0]
        >>> spec.step, len(spec.indices), 1 <= spec.n_ctx <= 5, spec.n_tgt
        (0, 3, True, 4)
        >>> sorted(specs[0].indices + specs[1].indices)   # one epoch: every task once
        [0, 1, 2, 3, 4, 5]
    """
    return BatchSpecs(seed, num_tasks, batch_size, n_ctx, n_tgt, shuffle=shuffle,
                      num_batches=num_batches, start=start, rank=rank, world_size=world_size)
