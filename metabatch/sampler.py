"""Seeded, random-access batch specs: which tasks, and of which size, at every step.

``batch_specs(seed, ...)[step]`` is a pure function of ``(seed, step)``: a
:class:`BatchSpec` holding the batch key, the task indices and the ``n_ctx`` /
``n_tgt`` shared by every task of that batch. Because the sequence is random
access, resuming at a step, sharding over ranks and changing the loader's
worker count never change which tasks are drawn.

How the stream is derived from the seed (stable; golden tests pin it):

- ``root = key(seed)``; ``k_tasks, k_sizes, k_perms = split(root, 3)``.
- The batch key of global step ``s`` is ``fold_in(k_tasks, s)``; task ``j`` of
  the global batch is built with ``fold_in(spec.key, j)``.
- ``n_ctx`` then ``n_tgt`` are drawn (inclusive ranges) from
  ``numpy_rng(fold_in(k_sizes, s))``.
- Task indices: the stream of global positions ``0, 1, 2, ...`` is cut into
  epochs of ``num_tasks``; epoch ``e`` is the permutation
  ``numpy_rng(fold_in(k_perms, e)).permutation(num_tasks)`` (identity with
  ``shuffle=False``), and step ``s`` takes positions ``s*B .. s*B+B-1``. Every
  task appears once per epoch; a batch may straddle two epochs.
"""

from __future__ import annotations

import operator
from typing import Iterator, NamedTuple, Sequence, Union

import numpy as np

from . import random as _random

__all__ = ["BatchSpec", "BatchSpecs", "batch_specs"]

SizeArg = Union[int, Sequence[int]]


class BatchSpec(NamedTuple):
    """The shape of one batch: what every worker needs to build it.

    Attributes:
        step: the global step this batch belongs to.
        key: the batch key; task ``j`` uses ``fold_in(key, offset + j)``.
        indices: the task indices of this batch (this rank's share of it).
        n_ctx: the number of context (support) points of every task.
        n_tgt: the number of target (query) points of every task.
        offset: the position of ``indices[0]`` inside the global batch
            (``rank * batch_size // world_size``; 0 without sharding).
    """

    step: int
    key: _random.Key
    indices: tuple
    n_ctx: int
    n_tgt: int
    offset: int = 0

    def task_keys(self) -> tuple:
        """The key of each task of this spec, in order of ``indices``.

        Examples:
            >>> import metabatch as mb
            >>> spec = mb.batch_specs(0, num_tasks=10, batch_size=4, n_ctx=5, n_tgt=5)[0]
            >>> spec.task_keys()[1] == mb.random.fold_in(spec.key, 1)
            True
        """
        return tuple(_random.fold_in(self.key, self.offset + j) for j in range(len(self.indices)))


def _int_arg(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"batch_specs(): {name} must be an int, got {value!r}.")
    value = operator.index(value)
    if value < low:
        raise ValueError(f"batch_specs(): {name} must be >= {low}, got {value}.")
    return value


def _size_arg(value, name: str) -> tuple:
    """An int or an inclusive (low, high) range -> (low, high)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        low = high = operator.index(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        low, high = (operator.index(v) for v in value)
    else:
        raise TypeError(f"batch_specs(): {name} must be an int or an inclusive (low, high) "
                        f"pair of ints, got {value!r}.")
    if low < 0:
        raise ValueError(f"batch_specs(): {name} must not be negative, got {value!r}.")
    if low > high:
        raise ValueError(f"batch_specs(): {name}={value!r} is an empty range: low > high; "
                         f"write ({high}, {low}).")
    return low, high


class BatchSpecs:
    """A lazy, random-access sequence of :class:`BatchSpec`; see :func:`batch_specs`.

    ``specs[step]`` gives the spec of any global step (``step >= 0``), whatever
    ``start`` is; iteration yields ``specs[start], specs[start + 1], ...``.
    """

    def __init__(self, seed, num_tasks, batch_size, n_ctx, n_tgt, *, shuffle=True,
                 num_batches=None, start=0, rank=0, world_size=1):
        self.seed = _int_arg(seed, "seed", 0)
        self.num_tasks = _int_arg(num_tasks, "num_tasks", 1)
        self.batch_size = _int_arg(batch_size, "batch_size", 1)
        self.n_ctx = _size_arg(n_ctx, "n_ctx")
        self.n_tgt = _size_arg(n_tgt, "n_tgt")
        self.shuffle = bool(shuffle)
        self.start = _int_arg(start, "start", 0)
        self.num_batches = None if num_batches is None else _int_arg(num_batches, "num_batches", 0)
        if self.num_batches is not None and self.start > self.num_batches:
            raise ValueError(f"batch_specs(): start={self.start} lies past the end of the stream "
                             f"(num_batches={self.num_batches}).")
        self.world_size = _int_arg(world_size, "world_size", 1)
        self.rank = _int_arg(rank, "rank", 0)
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
    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = _random.numpy_rng(_random.fold_in(self._k_perms, epoch)).permutation(self.num_tasks)
            else:
                perm = np.arange(self.num_tasks)
            if len(self._perm_cache) >= 2:  # a batch touches at most the current and next epoch
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = perm
        return perm

    def _indices(self, first: int, count: int) -> tuple:
        out = []
        while count:
            epoch, pos = divmod(first, self.num_tasks)
            take = min(count, self.num_tasks - pos)
            out.extend(self._perm(epoch)[pos:pos + take].tolist())
            first += take
            count -= take
        return tuple(out)

    def __getitem__(self, step) -> BatchSpec:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"batch specs are indexed by a global step (int), got {step!r}.")
        step = operator.index(step)
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}: specs are indexed by global step.")
        if self.num_batches is not None and step >= self.num_batches:
            raise IndexError(f"step {step} lies past the end of the stream (num_batches={self.num_batches}).")
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

    def replace(self, **changes) -> "BatchSpecs":
        """A copy with some arguments changed, e.g. ``specs.replace(start=step)`` to resume.

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
    """The seeded stream of batch specs that drives :func:`task_loader`.

    Args:
        seed: the seed of the whole stream (an int ``>= 0``).
        num_tasks: how many task indices there are (``>= 1``); each epoch visits
            every index once.
        batch_size: tasks per *global* batch (over all ranks).
        n_ctx: context points per task: an int, or an inclusive ``(low, high)``
            range drawn once per batch.
        n_tgt: target points per task, like ``n_ctx``.
        shuffle: a fresh permutation of the indices every epoch; ``False`` walks
            ``0, 1, 2, ...`` in order.
        num_batches: the length of the stream (steps ``0 .. num_batches-1``);
            ``None`` for an endless stream.
        start: the first step iteration yields; ``start=k`` resumes the stream
            exactly where step ``k`` begins.
        rank: this process's rank; it gets the ``rank``-th contiguous chunk of
            every global batch.
        world_size: the number of ranks; must divide ``batch_size``.

    Returns:
        A :class:`BatchSpecs`: ``specs[step]`` for random access, ``iter(specs)``
        for the stream from ``start``.

    Raises:
        ValueError: a size is negative or empty (``n_ctx=(5, 2)``), ``batch_size``
            or ``num_tasks`` is not positive, ``rank >= world_size``, or
            ``batch_size % world_size != 0``.
        TypeError: an argument is not an int (or pair of ints).

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
