"""The metabatch 0.9.1 interface, `TaskSet` and `TaskLoader`, on the new core.

Code written for 0.9.1 runs unchanged:

```python
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
```

Underneath, `TaskLoader` is a [TaskDataLoader][metabatch.TaskDataLoader] whose
dataset is your `TaskSet` itself (`loader.dataset`), indexed by
[BatchSpec][metabatch.BatchSpec] values: no Manager process, no per-task IPC,
one message per batch, and every batch reproducible from `loader.seed`.

Randomness. Each batch's indices and sizes come from `loader.seed`
(without `seed=`, it is drawn once from the global `numpy.random` and
`torch` generators, so that a script that seeds them — as 0.9.1 scripts do —
gets the same stream on every run). Legacy `__gettask__` code draws from the
global `random`, `numpy.random` and `torch` generators; so that its
output is reproducible too and independent of the worker count, the compat
layer seeds those three generators from the batch key right before the first
`__gettask__` call of each batch, with `seed = (hi ^ lo) & 0xFFFFFFFF` of
`key_data(spec.key)`; the tasks of a batch are then built in order, in one
process, so task `j` draws right after tasks `0..j-1` of its batch,
whatever the number of workers. With `num_workers=0` the generators' states
are restored after each batch, so the training loop's own randomness (dropout,
`torch.rand`) still follows the user's seed. To rebuild one batch by hand,
`loader.collate_fn(loader.dataset[spec])` does what a worker does. Code that
migrates declares a `key` parameter, `__gettask__(self, idx, n_context,
n_target, key)`, and draws from [metabatch.random.numpy_rng][] instead; then
nothing global is touched and each task depends on its own key only.

Tasks whose outputs hold strings or other non-numeric leaves (0.9.1's README
has `'label': 'dog'`) are collated as `torch.utils.data.default_collate`
does (a list of strings); numeric batches travel in one shared buffer.

This module is the only place in metabatch that uses inheritance.
"""

from __future__ import annotations

import abc
import inspect
import random as _py_random
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.utils.data

from . import _stack, _validate
from . import random as _random
from .loader import TaskDataLoader, Tasks, check_spec
from .sampler import BatchSpec

__all__ = ["TaskSet", "TaskLoader"]


class TaskSet(abc.ABC, torch.utils.data.Dataset):
    """The 0.9.1 task dataset: implement `__gettask__(idx, n_context, n_target)` and `__len__`.

    Per batch, `n_context ~ U{min_pts..max_ctx_pts}` and `n_target ~
    U{n_context..max_tgt_pts}`; with `predict_full_target`, `n_target =
    total_tgt_pts`; in `eval` with `predict_full_target_during_eval`,
    `n_target = total_tgt_pts - n_context`.

    Args:
        min_pts: the fewest context points.
        max_ctx_pts: the most context points (`>= min_pts`).
        max_tgt_pts: the most target points (`> max_ctx_pts`).
        total_tgt_pts: the number of points of a full task (needed by the two
            `predict_full_target` options).
        eval: evaluation mode (see `predict_full_target_during_eval`).
        predict_full_target: always ask for `total_tgt_pts` targets.
        predict_full_target_during_eval: in eval, ask for the points the
            context leaves: `total_tgt_pts - n_context`.

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
        min_pts = _validate.integer(min_pts, "min_pts", "TaskSet", low=0)
        max_ctx_pts = _validate.integer(max_ctx_pts, "max_ctx_pts", "TaskSet", low=0)
        max_tgt_pts = _validate.integer(max_tgt_pts, "max_tgt_pts", "TaskSet", low=0)
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
            total_tgt_pts = _validate.integer(total_tgt_pts, "total_tgt_pts", "TaskSet", low=0)
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
        """Draw one batch's `(n_context, n_target)` with 0.9.1's rules.

        The options are read when the batch is drawn, so `taskset.eval = True`
        set after construction (0.9.1 code does) takes effect for later batches.

        Raises:
            ValueError: the options as they are now ask for no target point, or for
                `total_tgt_pts` that was never given.
        """
        n_context = int(rng.integers(self.min_pts, self.max_ctx_pts, endpoint=True))
        full = self.predict_full_target or (self.eval and self.predict_full_target_during_eval)
        if full:
            total = self.total_tgt_pts
            if total is None:
                raise ValueError(f"{type(self).__name__}: predict_full_target / predict_full_target_during_eval "
                                 f"(eval={self.eval}) need total_tgt_pts, the number of points of a full task; "
                                 f"pass total_tgt_pts=... to TaskSet.__init__.")
            n_target = total if self.predict_full_target else total - n_context
            if not self.predict_full_target and n_target < 1:
                raise ValueError(f"{type(self).__name__}: in eval with predict_full_target_during_eval, n_target "
                                 f"= total_tgt_pts - n_context = {total} - {n_context} = {n_target}: "
                                 f"no target point is left. Make total_tgt_pts larger than max_ctx_pts="
                                 f"{self.max_ctx_pts}.")
        else:
            n_target = int(rng.integers(n_context, self.max_tgt_pts, endpoint=True))
        return n_context, n_target

    def __getitem__(self, spec):
        """The [`Tasks`][metabatch.loader.Tasks] of a batch spec: what a `TaskLoader` worker builds.

        `__gettask__(idx, n_context, n_target)` is called for every index of the
        spec, in order, after the global generators are seeded from the spec's key
        (restored afterwards in the main process); a `__gettask__` that takes a
        `key` gets each task's own key instead and nothing global is touched.
        """
        if not isinstance(spec, BatchSpec):
            raise TypeError(f"{type(self).__name__}[{spec!r:.60}]: a TaskSet is indexed by the batch specs of "
                            f"its TaskLoader, which choose n_context / n_target per batch; call "
                            f"__gettask__(idx, n_context, n_target) to build one task by hand.")
        return _build(self, check_spec(spec))

    @abc.abstractmethod
    def __gettask__(self, index, n_context, n_target):
        """Build task `index` with `n_context` context and `n_target` target points."""
        raise NotImplementedError

    if TYPE_CHECKING:  # subclasses define it, as in 0.9.1 (nothing at run time: len() names a missing one)
        def __len__(self) -> int: ...


_TAKES_KEY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # TaskSet class -> takes a key


def _takes_key(taskset: TaskSet) -> bool:
    cls = type(taskset)
    takes = _TAKES_KEY.get(cls)
    if takes is None:
        takes = _TAKES_KEY[cls] = "key" in inspect.signature(taskset.__gettask__).parameters
    return takes


def _legacy_seed(key) -> int:
    """The 32-bit seed of the global generators for the batch of `key`."""
    hi, lo = _random.key_data(key)
    return (hi ^ lo) & 0xFFFFFFFF


def _note(err: BaseException, spec: BatchSpec, j: int, idx, how: str) -> None:
    _stack.add_note(err, f"metabatch: raised by __gettask__({idx}, {spec.n_ctx}, {spec.n_tgt}) at step "
                         f"{spec.step}, task {j} of the batch; {how}")


def _build(taskset: TaskSet, spec: BatchSpec) -> Tasks:
    n_ctx, n_tgt = spec.n_ctx, spec.n_tgt
    if _takes_key(taskset):
        outs = []
        for j, (k, idx) in enumerate(zip(spec.task_keys(), spec.indices, strict=True)):
            try:
                outs.append(taskset.__gettask__(idx, n_ctx, n_tgt, key=k))  # type: ignore[call-arg]
            except Exception as err:
                _note(err, spec, j, idx, f"its key is metabatch.random.key_from_data({_random.key_data(k)}).")
                raise
        return Tasks(spec, outs)
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker:  # the training loop's generators: put back as they were after the batch
        saved = _py_random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    seed = _legacy_seed(spec.key)
    _py_random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        outs = []
        for j, idx in enumerate(spec.indices):
            try:
                outs.append(taskset.__gettask__(idx, n_ctx, n_tgt))
            except Exception as err:
                _note(err, spec, j, idx, "its tasks draw from the global generators, seeded once per batch: "
                                         "rebuild the whole batch with loader.dataset[spec] for the spec of "
                                         f"step {spec.step}.")
                raise
        return Tasks(spec, outs)
    finally:
        if not in_worker:
            _py_random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


class _LegacySpecs:
    """0.9.1's batch sampling as a stream of BatchSpec; iteration `e` is epoch `e`."""

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
    """The 0.9.1 `TaskLoader`, same signature and defaults, on [metabatch.TaskDataLoader][].

    Batches of `batch_size` tasks share one `(n_context, n_target)`. With
    `n_batches`, each iteration draws that many batches *with replacement*
    (duplicates inside a batch are allowed); otherwise an iteration is one
    epoch over the dataset (`shuffle` for a fresh order each epoch).
    `loader.dataset` is your `TaskSet`; without persistent workers (the
    default, as in 0.9.1) each epoch's workers get it afresh, so a change made
    between epochs (a curriculum level) reaches them.

    Differences from 0.9.1: it also works with `num_workers=0`; `workers=`
    is accepted as an alias of `num_workers` (0.9.1's README used it); and
    `seed` fixes the whole stream, for any worker count. Without `seed`, one
    is drawn from the global `numpy.random` and `torch` generators and kept
    in `loader.seed`: a script that seeds them gets the same stream on every
    run. A user `collate_fn` receives the list of task outputs, as in 0.9.1;
    without one the tasks are stacked into one pytree of tensors (leaves that
    are not numbers or numeric arrays, such as strings, collate as
    `torch.utils.data.default_collate` does).

    Raises:
        TypeError: `dataset` is not a `TaskSet`; an int argument is not an int.
        ValueError: `n_batches` without `shuffle` (as in 0.9.1), a
            non-positive `batch_size` or `n_batches`, or an empty dataset.

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
                 generator=None, *, prefetch_factor: int | None = 2, persistent_workers: bool = False,
                 pin_memory_device: str = "", seed: int | None = None, workers: int | None = None):
        if workers is not None:
            num_workers = _validate.integer(workers, "workers", "TaskLoader", low=0)
        num_workers = _validate.integer(num_workers, "num_workers", "TaskLoader", low=0)
        if not isinstance(dataset, TaskSet):
            raise TypeError(f"TaskLoader(): dataset must be a metabatch.TaskSet, got {type(dataset).__name__}; "
                            f"for a plain task function use metabatch.task_loader(sample_task, specs).")
        batch_size = _validate.integer(batch_size, "batch_size", "TaskLoader", low=1)
        if n_batches is not None:
            n_batches = _validate.integer(n_batches, "n_batches", "TaskLoader", low=1)
            if not shuffle:
                raise ValueError("TaskLoader(): n_batches draws tasks at random, so it needs shuffle=True "
                                 "(as in metabatch 0.9.1).")
        if len(dataset) <= 0:
            raise ValueError(f"TaskLoader(): the dataset is empty (len {len(dataset)}).")
        if seed is None:
            # From the global generators: a script that seeds them (as 0.9.1 scripts do) repeats its stream.
            hi = int(np.random.randint(0, 2**32, dtype=np.int64))
            lo = int(torch.randint(0, 2**32, (), dtype=torch.int64))
            seed = hi << 32 | lo
        _random.key(seed)  # validates the seed
        self.seed = seed
        options = dict(pin_memory=pin_memory, timeout=timeout, worker_init_fn=worker_init_fn,
                       multiprocessing_context=multiprocessing_context, generator=generator)
        if num_workers > 0:
            options.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)
        if pin_memory_device:
            options["pin_memory_device"] = pin_memory_device
        specs = _LegacySpecs(dataset, batch_size, shuffle, n_batches, drop_last, self.seed)
        super().__init__(dataset, specs, num_workers=num_workers, collate_fn=collate_fn,
                         fallback_collate=torch.utils.data.default_collate, **options)
