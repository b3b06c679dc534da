"""The metabatch 0.9.1 interface, ``TaskSet`` and ``TaskLoader``, on the new core.

Code written for 0.9.1 runs unchanged::

    class MyTaskSet(TaskSet):
        def __init__(self, data, **sizes):
            super().__init__(**sizes)
            self.data = data
        def __len__(self):
            return len(self.data)
        def __gettask__(self, idx, n_context, n_target):
            ...

    loader = TaskLoader(MyTaskSet(data, min_pts=1, max_ctx_pts=5, max_tgt_pts=10),
                        batch_size=16, num_workers=8)

Underneath, ``TaskLoader`` is a :class:`~metabatch.TaskDataLoader` fed by
:class:`~metabatch.BatchSpec` values: no Manager process, no per-task IPC, one
message per batch, and every batch reproducible from ``loader.seed``.

Randomness. Each batch's indices and sizes come from the seed. Legacy
``__gettask__`` code draws from the global ``random``, ``numpy.random`` and
``torch`` generators; so that its output is reproducible too and independent
of the worker count, the compat layer seeds those three generators from the
batch key right before the first ``__gettask__`` call of each batch, with
``seed = (hi ^ lo) & 0xFFFFFFFF`` of ``key_data(spec.key)``; the tasks of a
batch are then built in order, in one process, so task ``j`` draws right after
tasks ``0..j-1`` of its batch, whatever the number of workers. (This is the
one place in metabatch that touches global generators, and only to serve
legacy code; with ``num_workers=0`` it leaves them advanced past the last
batch.) To rebuild one batch by hand, ``metabatch.build_batch(loader.sample_task,
spec)`` seeds them the same way. Code that migrates declares a ``key``
parameter, ``__gettask__(self, idx, n_context, n_target, key)``, and draws
from :func:`metabatch.random.numpy_rng` instead; then nothing global is
touched and each task depends on its own key only.

This module is the only place in metabatch that uses inheritance.
"""

from __future__ import annotations

import abc
import inspect
import random as _py_random
import secrets

import numpy as np
import torch
import torch.utils.data

from . import random as _random
from .loader import TaskDataLoader, _BatchBuilder, _check_loader_args, _identity
from .sampler import BatchSpec

__all__ = ["TaskSet", "TaskLoader"]


def _check_int(value, name: str, low: int | None = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"TaskSet: {name} must be an int, got {value!r}.")
    if low is not None and value < low:
        raise ValueError(f"TaskSet: {name} must be >= {low}, got {value}.")


class TaskSet(abc.ABC, torch.utils.data.Dataset):
    """The 0.9.1 task dataset: implement ``__gettask__(idx, n_context, n_target)`` and ``__len__``.

    Per batch, ``n_context ~ U{min_pts..max_ctx_pts}`` and ``n_target ~
    U{n_context..max_tgt_pts}``; with ``predict_full_target``, ``n_target =
    total_tgt_pts``; in ``eval`` with ``predict_full_target_during_eval``,
    ``n_target = total_tgt_pts - n_context``.

    Args:
        min_pts: the fewest context points.
        max_ctx_pts: the most context points (``>= min_pts``).
        max_tgt_pts: the most target points (``> max_ctx_pts``).
        total_tgt_pts: the number of points of a full task (needed by the two
            ``predict_full_target`` options).
        eval: evaluation mode (see ``predict_full_target_during_eval``).
        predict_full_target: always ask for ``total_tgt_pts`` targets.
        predict_full_target_during_eval: in eval, ask for the points the
            context leaves: ``total_tgt_pts - n_context``.

    Raises:
        ValueError: the sizes break the rules above (0.9.1 asserted them).

    Examples:
        >>> import numpy as np
        >>> from metabatch import TaskSet, TaskLoader
        >>> class Points(TaskSet):
        ...     def __len__(self):
        ...         return 10
        ...     def __gettask__(self, idx, n_context, n_target):
        ...         return {"context": np.full(n_context, idx), "target": np.zeros(n_target)}
        >>> loader = TaskLoader(Points(min_pts=1, max_ctx_pts=3, max_tgt_pts=6), batch_size=5, seed=0)
        >>> [batch["context"].shape[0] for batch in loader]
        [5, 5]
    """

    def __init__(self, min_pts: int, max_ctx_pts: int, max_tgt_pts: int, total_tgt_pts: int | None = None,
                 eval: bool = False, predict_full_target: bool = False,
                 predict_full_target_during_eval: bool = False):
        _check_int(min_pts, "min_pts")
        _check_int(max_ctx_pts, "max_ctx_pts")
        _check_int(max_tgt_pts, "max_tgt_pts")
        if max_ctx_pts < min_pts:
            raise ValueError(f"TaskSet: max_ctx_pts={max_ctx_pts} must be >= min_pts={min_pts}.")
        if max_ctx_pts >= max_tgt_pts:
            raise ValueError(f"TaskSet: max_ctx_pts={max_ctx_pts} must be smaller than "
                             f"max_tgt_pts={max_tgt_pts}.")
        needs_total = predict_full_target or (eval and predict_full_target_during_eval)
        if total_tgt_pts is None and needs_total:
            raise ValueError("TaskSet: predict_full_target / predict_full_target_during_eval need "
                             "total_tgt_pts (the number of points of a full task).")
        if total_tgt_pts is not None:
            _check_int(total_tgt_pts, "total_tgt_pts")
            if eval and predict_full_target_during_eval and total_tgt_pts < max_ctx_pts:
                raise ValueError(f"TaskSet: total_tgt_pts={total_tgt_pts} must be >= max_ctx_pts="
                                 f"{max_ctx_pts}, since eval targets are total_tgt_pts - n_context.")
        self.min_pts = min_pts
        self.max_ctx_pts = max_ctx_pts
        self.max_tgt_pts = max_tgt_pts
        self.total_tgt_pts = total_tgt_pts
        self.eval = eval
        self.predict_full_target = predict_full_target
        self.predict_full_target_during_eval = predict_full_target_during_eval

    def sizes(self, rng: np.random.Generator) -> tuple[int, int]:
        """Draw one batch's ``(n_context, n_target)`` with 0.9.1's rules."""
        n_context = int(rng.integers(self.min_pts, self.max_ctx_pts, endpoint=True))
        if self.predict_full_target:
            n_target = self.total_tgt_pts
        elif self.eval and self.predict_full_target_during_eval:
            n_target = self.total_tgt_pts - n_context
        else:
            n_target = int(rng.integers(n_context, self.max_tgt_pts, endpoint=True))
        return n_context, n_target

    def __getitem__(self, index):
        raise TypeError(f"{type(self).__name__}[{index!r}]: a TaskSet is indexed through TaskLoader, which "
                        f"chooses n_context / n_target per batch; call __gettask__(idx, n_context, "
                        f"n_target) to build one task by hand.")

    @abc.abstractmethod
    def __gettask__(self, index, n_context, n_target):
        """Build task ``index`` with ``n_context`` context and ``n_target`` target points."""
        raise NotImplementedError


class _GetTask:
    """``sample_task(key, idx, n_ctx, n_tgt)`` that calls a TaskSet's ``__gettask__``.

    For a legacy ``__gettask__`` (no ``key`` parameter) the loader calls
    ``_start_batch(spec)`` before the tasks of each batch: it seeds the global
    generators once from the batch key (seeding all three costs about 12 µs,
    more than a light task itself).
    """

    def __init__(self, dataset: TaskSet):
        self.dataset = dataset
        params = inspect.signature(dataset.__gettask__).parameters
        self.takes_key = "key" in params
        if self.takes_key:
            self._start_batch = None

    def _start_batch(self, spec: BatchSpec) -> None:
        seed = _legacy_seed(spec.key)
        _py_random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)

    def __call__(self, key, idx, n_ctx, n_tgt):
        if self.takes_key:
            return self.dataset.__gettask__(idx, n_ctx, n_tgt, key=key)
        return self.dataset.__gettask__(idx, n_ctx, n_tgt)


def _legacy_seed(key) -> int:
    """The 32-bit seed of the global generators for the batch of ``key``."""
    hi, lo = _random.key_data(key)
    return (hi ^ lo) & 0xFFFFFFFF


class _LegacySpecs:
    """0.9.1's batch sampling as a stream of BatchSpec; iteration ``e`` is epoch ``e``."""

    def __init__(self, dataset: TaskSet, batch_size: int, shuffle: bool, n_batches, drop_last: bool,
                 seed: int):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.n_batches, self.drop_last = n_batches, drop_last
        self._k_tasks, self._k_sizes, self._k_order = _random.split(_random.key(seed), 3)
        self._epoch = 0

    def __len__(self) -> int:
        if self.n_batches is not None:
            return self.n_batches
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def spec(self, step: int, indices) -> BatchSpec:
        n_ctx, n_tgt = self.dataset.sizes(_random.numpy_rng(_random.fold_in(self._k_sizes, step)))
        return BatchSpec(step, _random.fold_in(self._k_tasks, step), tuple(indices), n_ctx, n_tgt)

    def __iter__(self):
        epoch, self._epoch = self._epoch, self._epoch + 1
        first = epoch * len(self)
        if self.n_batches is not None:  # with replacement, as 0.9.1 (duplicates allowed now)
            for b in range(self.n_batches):
                rng = _random.numpy_rng(_random.fold_in(self._k_order, first + b))
                yield self.spec(first + b, rng.integers(0, len(self.dataset), size=self.batch_size).tolist())
            return
        n = len(self.dataset)
        if self.shuffle:
            order = _random.numpy_rng(_random.fold_in(self._k_order, epoch)).permutation(n).tolist()
        else:
            order = list(range(n))
        for b in range(len(self)):
            yield self.spec(first + b, order[b * self.batch_size:(b + 1) * self.batch_size])


class TaskLoader(TaskDataLoader):
    """The 0.9.1 ``TaskLoader``, same signature, on :func:`metabatch.task_loader`.

    Batches of ``batch_size`` tasks share one ``(n_context, n_target)``. With
    ``n_batches``, each iteration draws that many batches *with replacement*
    (duplicates inside a batch are allowed); otherwise an iteration is one
    epoch over the dataset (``shuffle`` for a fresh order each epoch).

    Differences from 0.9.1: it also works with ``num_workers=0``; ``workers=``
    is accepted as an alias of ``num_workers`` (0.9.1's README used it); and
    ``seed`` fixes the whole stream, for any worker count. Without ``seed``, one
    is drawn from the OS once and kept in ``loader.seed``, so a run can be
    repeated. A user ``collate_fn`` receives the list of task outputs, as in
    0.9.1; without one the tasks are stacked into one pytree of tensors.

    Raises:
        ValueError: ``n_batches`` without ``shuffle`` (as in 0.9.1), a
            non-positive ``batch_size`` or ``n_batches``, or an empty dataset.

    Examples:
        >>> import numpy as np
        >>> from metabatch import TaskSet, TaskLoader
        >>> class Noise(TaskSet):
        ...     def __len__(self):
        ...         return 100
        ...     def __gettask__(self, idx, n_context, n_target):
        ...         return np.random.rand(n_context), np.random.rand(n_target)   # legacy global RNG
        >>> a = [x for x, _ in TaskLoader(Noise(1, 5, 10), batch_size=4, shuffle=True, n_batches=2, seed=1)]
        >>> b = [x for x, _ in TaskLoader(Noise(1, 5, 10), batch_size=4, shuffle=True, n_batches=2, seed=1)]
        >>> all(bool((x == y).all()) for x, y in zip(a, b))
        True
    """

    def __init__(self, dataset: TaskSet, batch_size: int | None = 1, shuffle: bool = False,
                 n_batches: int | None = None, num_workers: int = 0, collate_fn=None, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn=None, multiprocessing_context=None,
                 generator=None, *, prefetch_factor: int | None = 2, persistent_workers: bool = True,
                 pin_memory_device: str = "", seed: int | None = None, workers: int | None = None):
        if workers is not None:
            num_workers = workers
        if not isinstance(dataset, TaskSet):
            raise TypeError(f"TaskLoader needs a metabatch.TaskSet, got {type(dataset).__name__}; for a "
                            f"plain task function use metabatch.task_loader(sample_task, specs).")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"TaskLoader: batch_size must be a positive int, got {batch_size!r}.")
        if n_batches is not None:
            if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches <= 0:
                raise ValueError(f"TaskLoader: n_batches must be a positive int or None, got {n_batches!r}.")
            if not shuffle:
                raise ValueError("TaskLoader: n_batches draws tasks at random, so it needs shuffle=True "
                                 "(as in metabatch 0.9.1).")
        if len(dataset) <= 0:
            raise ValueError(f"TaskLoader: the dataset is empty (len {len(dataset)}).")
        if seed is None:
            seed = secrets.randbits(63)  # OS entropy, drawn once; kept so that the run can be repeated
        _random.key(seed)  # validates the seed
        self.seed = seed
        options = dict(pin_memory=pin_memory, timeout=timeout, worker_init_fn=worker_init_fn,
                       multiprocessing_context=multiprocessing_context, generator=generator)
        if num_workers > 0:
            options.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)
        if pin_memory_device:
            options["pin_memory_device"] = pin_memory_device
        specs = _LegacySpecs(dataset, batch_size, shuffle, n_batches, drop_last, self.seed)
        sample_task = _GetTask(dataset)
        _check_loader_args(sample_task, num_workers, collate_fn, options)
        super().__init__(_BatchBuilder(sample_task, collate_fn), batch_size=None, sampler=specs,
                         num_workers=num_workers, collate_fn=_identity, **options)
