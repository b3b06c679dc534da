"""The parallel task loader: workers build whole, uniform batches of tasks.

[`task_loader`][metabatch.task_loader] returns a [`TaskDataLoader`][metabatch.TaskDataLoader], a
`torch.utils.data.DataLoader` whose sampler is a stream of
[BatchSpec][metabatch.BatchSpec] values. For each spec, a worker

1. asks its dataset for the spec's tasks — for [`task_loader`][metabatch.task_loader], task `j`
   is `sample_task(fold_in(spec.key, spec.offset + j), spec.indices[j],
   spec.n_ctx, spec.n_tgt)` — and gets a [`Tasks`][metabatch.loader.Tasks] (the spec and the list
   of task outputs);
2. stacks the outputs into one pytree whose leaves carry a leading task
   dimension, written straight into one buffer (`_stack`), and sends that
   buffer to the main process as one message (`_transport`, which tells the
   whole journey);
3. the main process turns the buffer back into the pytree of tensors
   (zero-copy views) and yields it.

Any map-style dataset whose `dataset[spec]` returns a [`Tasks`][metabatch.loader.Tasks] can
feed a [`TaskDataLoader`][metabatch.TaskDataLoader]; the 0.9.1 compatibility layer's `TaskSet`
is one.
"""

from __future__ import annotations

import multiprocessing
import os
import pickletools
import queue
import signal
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils.data

from . import _spawn, _stack, _transport, _validate
from . import random as _random
from .sampler import BatchSpec

__all__ = ["TaskDataLoader", "Tasks", "build_batch", "stack", "task_loader"]


class Tasks(NamedTuple):
    """The task outputs of one spec, as a loader's dataset returns them.

    Attributes:
        spec: the [BatchSpec][metabatch.BatchSpec] they were built for.
        outputs: one pytree per task of `spec.indices`, in order.
    """

    spec: BatchSpec
    outputs: list


def check_spec(spec: Any) -> BatchSpec:
    """`spec` if it is a non-empty [BatchSpec][metabatch.BatchSpec], else a clear error.

    Raises:
        TypeError: `spec` is not a `BatchSpec`.
        ValueError: it holds no task index.

    Examples:
        >>> import metabatch as mb
        >>> spec = mb.batch_specs(0, num_tasks=4, batch_size=2, n_ctx=1, n_tgt=1)[0]
        >>> mb.loader.check_spec(spec) is spec
        True
    """
    if not isinstance(spec, BatchSpec):
        raise TypeError(f"the loader's sampler must yield metabatch.BatchSpec values, got {spec!r:.80}; "
                        f"pass the result of metabatch.batch_specs(...).")
    if not spec.indices:
        raise ValueError(f"step {spec.step}: the batch spec holds no task indices.")
    return spec


def _sample(sample_task: Callable, spec: BatchSpec) -> Tasks:
    """The outputs of the tasks of one spec, errors annotated with step, index and key."""
    outs, key, offset, n_ctx, n_tgt, fold_in = [], spec.key, spec.offset, spec.n_ctx, spec.n_tgt, _random.fold_in
    for j, idx in enumerate(spec.indices):
        k = fold_in(key, offset + j)
        try:
            outs.append(sample_task(k, idx, n_ctx, n_tgt))
        except Exception as err:
            _stack.add_note(err, f"metabatch: raised by sample_task at step {spec.step}, task {offset + j} of "
                                 f"the batch (index {idx}), key {k!r}, n_ctx={n_ctx}, n_tgt={n_tgt}; rerun it "
                                 f"alone with sample_task(metabatch.random.key_from_data("
                                 f"{_random.key_data(k)}), {idx}, {n_ctx}, {n_tgt}).")
            raise
    return Tasks(spec, outs)


def stack(outputs: list) -> Any:
    """Stack a list of task outputs (same pytree, same leaf shapes) into one pytree of tensors.

    Numpy leaves and numbers become tensors; every leaf gains a leading task
    dimension. This is what each loader worker does to a batch.

    Args:
        outputs: a non-empty list of pytrees of tensors, arrays or numbers.

    Returns:
        One pytree of tensors with leading dimension `len(outputs)`.

    Raises:
        ValueError: two outputs differ in structure, shape or dtype; the message
            names the first two tasks that differ.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> batch = mb.stack([{"x": np.zeros(3)}, {"x": np.ones(3)}])
        >>> batch["x"].shape, batch["x"].dtype
        (torch.Size([2, 3]), torch.float64)
    """
    if not outputs:
        raise ValueError("stack(): outputs must hold at least one task output, got an empty list.")
    return _stack.batch(list(outputs), None)


def build_batch(sample_task: Callable, spec: BatchSpec) -> Any:
    """Build and stack the tasks of one spec in this process (what a worker does).

    Task `j` is `sample_task(fold_in(spec.key, spec.offset + j), spec.indices[j],
    spec.n_ctx, spec.n_tgt)`.

    Examples:
        >>> import numpy as np, metabatch as mb
        >>> def sample_task(key, idx, n_ctx, n_tgt):
        ...     x = mb.random.numpy_rng(key).uniform(size=(n_ctx + n_tgt, 1))
        ...     return x[:n_ctx], x[n_ctx:]
        >>> spec = mb.batch_specs(0, num_tasks=100, batch_size=4, n_ctx=3, n_tgt=5)[0]
        >>> ctx, tgt = mb.build_batch(sample_task, spec)
        >>> tuple(ctx.shape), tuple(tgt.shape)
        ((4, 3, 1), (4, 5, 1))
    """
    spec = check_spec(spec)
    return _stack.batch(_sample(sample_task, spec).outputs, spec)


class _SampleTasks(torch.utils.data.Dataset):
    """The dataset of `task_loader`: `dataset[spec]` calls `sample_task` for each task."""

    def __init__(self, sample_task: Callable):
        self.sample_task = sample_task

    def __getitem__(self, spec: BatchSpec) -> Tasks:
        return _sample(self.sample_task, check_spec(spec))


class _Collate:
    """The loader's collate step: a spec's `Tasks` -> the batch (packed for transport in a worker)."""

    def __init__(self, collate_fn: Callable | None = None, fallback: Callable | None = None):
        self.collate_fn, self.fallback = collate_fn, fallback
        self._sender: _transport.Sender | None = None  # made lazily, inside each worker

    def __getstate__(self):
        return {**self.__dict__, "_sender": None}

    def __call__(self, tasks: Tasks) -> Any:
        if not isinstance(tasks, Tasks):
            raise TypeError(f"a TaskDataLoader's dataset must return metabatch.loader.Tasks(spec, outputs) for "
                            f"each spec, got {type(tasks).__name__}.")
        if self.collate_fn is not None:
            return self.collate_fn(tasks.outputs)
        try:
            if torch.utils.data.get_worker_info() is None:  # num_workers=0: the batch itself
                return _stack.batch(tasks.outputs, tasks.spec)
            sender = self._sender
            if sender is None or sender.pid != os.getpid():  # (a forked copy is not this worker's)
                sender = self._sender = _transport.Sender()
            return _transport.pack(sender, tasks.outputs, tasks.spec)
        except _stack.LeafTypeError:
            if self.fallback is None:
                raise
            return self.fallback(tasks.outputs)


# DataLoader iterator -> tokens of the workers whose batches it yielded
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _seen_by(iterator) -> set:
    tokens = _SEEN.get(iterator)
    if tokens is None:
        tokens = _SEEN[iterator] = set()
        weakref.finalize(iterator, _transport.forget, tokens)
    return tokens


_NOT_OPTIONS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def _start_method(context) -> str:
    if context is None:  # the default, without fixing it (set_start_method still works afterwards)
        return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if isinstance(context, str):
        return context
    return context.get_start_method()


class _Recorded:
    """A spec stream whose iterators remember the specs they gave out lately, by position."""

    def __init__(self, specs: Sequence[BatchSpec], keep: int):
        self.specs, self.keep = specs, keep

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return _Recording(iter(self.specs), self.keep)


class _Recording:
    __slots__ = ("count", "it", "keep", "sent")

    def __init__(self, it, keep: int):
        self.it, self.keep, self.count = it, keep, 0
        self.sent: dict[int, BatchSpec] = {}

    def __iter__(self):
        return self

    def __next__(self):
        spec = next(self.it)
        sent = self.sent
        sent[self.count] = spec
        sent.pop(self.count - self.keep, None)
        self.count += 1
        return spec


def _how_it_ended(exitcode) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = {"SIGKILL": " (the out-of-memory killer sends it: see `dmesg`)",
               "SIGSEGV": " (a crash in native code: an extension, a corrupt file, a C library)",
               "SIGBUS": " (a crash reading memory: often /dev/shm too small in a container, see --shm-size)",
               }.get(name, "")
        return f"was killed by {name}{why}"
    if exitcode == 0:
        return ("exited with code 0 before sending its batch (a KeyboardInterrupt or sys.exit(0) inside the "
                "task function ends a worker quietly)")
    return f"exited with code {exitcode} (sys.exit({exitcode}) or os._exit({exitcode}) inside the task function?)"


def _spec_text(spec) -> str:
    if not isinstance(spec, BatchSpec):
        return f"the batch {spec!r:.200}"
    key = _random.key_data(spec.key)
    return (f"the batch of step {spec.step} (task indices {spec.indices!r:.200}, n_ctx={spec.n_ctx}, "
            f"n_tgt={spec.n_tgt}); rebuild it in this process to see what happens: "
            f"loader.collate_fn(loader.dataset[spec]) with spec = metabatch.BatchSpec({spec.step}, "
            f"metabatch.random.key_from_data({key}), {spec.indices!r:.200}, {spec.n_ctx}, {spec.n_tgt}, "
            f"{spec.offset})")


def _first_int(raw: bytes):
    """The first int of a pickle, read without unpickling: the send index of DataLoader's `(idx, data)`."""
    for op, arg, _ in pickletools.genops(raw):
        if op.name in ("BININT", "BININT1", "BININT2", "LONG1", "INT"):
            return arg
        if op.name not in ("PROTO", "FRAME"):
            return None
    return None


def _arrived(iterator) -> set:
    """Send indices whose results already wait in the iterator's queue (after a worker died).

    A worker processes its specs in order, so the batch it died on is its
    oldest outstanding one whose result is not in the queue. The queue is read
    without unpickling (a dead worker's shared buffers can no longer be
    fetched); what is read is dropped, as the iterator ends with the error.
    """
    got = set()
    q = iterator._data_queue
    try:
        if q is iterator._worker_result_queue:  # no pin-memory thread: read the pipe
            reader = q._reader
            while reader.poll(0):
                idx = _first_int(reader.recv_bytes())
                if idx is not None:
                    got.add(idx)
        else:  # the pin-memory thread's queue.Queue
            while True:
                got.add(q.get_nowait()[0])
    except (queue.Empty, OSError, EOFError, ValueError, TypeError, IndexError):
        pass
    return got


def _worker_fault(iterator, err: RuntimeError) -> RuntimeError | None:
    """DataLoader's error for a dead or silent worker, said with the batch that worker was building.

    `None` when `err` is something else (a task's own RuntimeError) or the
    iterator lacks what is needed (DataLoader internals: `_task_info` maps a
    send index to `(worker_id,)` while its batch is outstanding).
    """
    text = str(err)
    died = "exited unexpectedly" in text or "killed by signal" in text
    hung = text.startswith("DataLoader timed out")
    try:
        info, sent, workers = iterator._task_info, iterator._sampler_iter.sent, iterator._workers
        if hung:
            idx = iterator._rcvd_idx
            wid = info[idx][0]
            return RuntimeError(
                f"metabatch: loader worker {wid} (pid {workers[wid].pid}) sent nothing for timeout="
                f"{iterator._timeout} s while building {_spec_text(sent.get(idx))}. A task function that hangs "
                f"(a lock, a network read, a deadlock after fork) or one slower than the timeout; raise timeout= "
                f"if it is only slow.")
        if not died:
            return None
        lines, arrived = [], _arrived(iterator)
        for wid, w in enumerate(workers):
            if w.exitcode is None:
                continue
            mine = sorted(i for i, v in info.items() if len(v) == 1 and v[0] == wid and i not in arrived)
            how = f"loader worker {wid} (pid {w.pid}) {_how_it_ended(w.exitcode)}"
            if not mine:
                lines.append(f"{how} with no batch outstanding")
            elif len(mine) == 1:
                lines.append(f"{how} while building (or sending) {_spec_text(sent.get(mine[0]))}")
            else:  # (a result still in the worker's send buffer when it died is lost too)
                lines.append(f"{how} before delivering {len(mine)} batches, one of which it was building: "
                             + "; ".join(_spec_text(sent.get(i)) for i in mine))
        if not lines:
            return None
        return RuntimeError("metabatch: " + "; ".join(lines) + ".")
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


class TaskDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over batch specs whose workers build, stack and ship whole batches of tasks.

    [`task_loader`][metabatch.task_loader] makes one from a `sample_task` function. Build one
    yourself to feed batches from any map-style dataset whose `dataset[spec]`
    returns the [`Tasks`][metabatch.loader.Tasks] of a [BatchSpec][metabatch.BatchSpec]: workers
    stack those outputs into one buffer, and iteration yields the batch pytree
    of tensors (zero-copy views of that buffer). `loader.specs` is the spec
    stream; `loader.sample_task` the task function (for [`task_loader`][metabatch.task_loader]).

    Args:
        dataset: `dataset[spec] -> Tasks`.
        specs: the batch-spec stream, usually [metabatch.batch_specs][].
        num_workers: worker processes; 0 builds batches in the calling process.
        collate_fn: optional `collate_fn(list_of_task_outputs) -> batch`, run in
            the worker instead of the built-in stacking.
        fallback_collate: optional `fallback_collate(list_of_task_outputs) -> batch`
            for batches whose outputs hold leaves the built-in stacking refuses
            (strings, arbitrary objects), e.g. `torch.utils.data.default_collate`,
            which turns them into lists. `None`: such a batch is a `TypeError`
            that names the leaf.
        **dataloader_options: passed to `torch.utils.data.DataLoader`.

    Raises:
        TypeError: a batch option (`batch_size`, `shuffle`, `sampler`...)
            was passed; `dataset` or `collate_fn` cannot be pickled for
            `spawn`/`forkserver` workers.
        ValueError: `num_workers < 0`; `timeout > 0` with `num_workers=0`.
        RuntimeError: (while iterating) a worker died or sent nothing for
            `timeout` seconds; the message names the step, task indices and
            key of the batch it was building, torch's message is the cause.

    Examples:
        >>> import numpy as np, torch, metabatch as mb
        >>> class Squares(torch.utils.data.Dataset):
        ...     def __getitem__(self, spec):
        ...         return mb.loader.Tasks(spec, [np.full(spec.n_ctx, i * i) for i in spec.indices])
        >>> specs = mb.batch_specs(0, num_tasks=4, batch_size=2, n_ctx=3, n_tgt=0, shuffle=False,
        ...                        num_batches=2)
        >>> [batch[:, 0].tolist() for batch in mb.TaskDataLoader(Squares(), specs)]
        [[0, 1], [4, 9]]
    """

    def __init__(self, dataset: Any, specs: Iterable[BatchSpec], *, num_workers: int = 0,
                 collate_fn: Callable | None = None, fallback_collate: Callable | None = None,
                 **dataloader_options: Any):
        fn = "task_loader" if isinstance(dataset, _SampleTasks) else type(self).__name__
        num_workers = _validate.integer(num_workers, "num_workers", fn, low=0)
        if "timeout" in dataloader_options:
            timeout = _validate.number(dataloader_options["timeout"], "timeout", fn, low=0.0)
            if timeout > 0 and num_workers == 0:
                raise ValueError(f"{fn}(): timeout={dataloader_options['timeout']!r} needs worker processes, but "
                                 f"num_workers=0 builds batches in this process, where nothing can time out; "
                                 f"pass num_workers>=1 or drop timeout.")
        for name, f in (("collate_fn", collate_fn), ("fallback_collate", fallback_collate)):
            if f is not None:
                _validate.callable_(f, name, fn)
        bad = [k for k in _NOT_OPTIONS if k in dataloader_options]
        if bad:
            raise TypeError(f"{fn}(): {', '.join(bad)} cannot be set here: batches come from the specs; set "
                            f"batch_size and shuffle in metabatch.batch_specs(...).")
        if num_workers:
            method = _start_method(dataloader_options.get("multiprocessing_context"))
            if method != "fork":  # what the workers unpickle must be importable there
                if isinstance(dataset, _SampleTasks):
                    _spawn.check_importable("sample_task", dataset.sample_task, method, fn)
                _spawn.check_importable("dataset", dataset, method, fn)
                others = (("collate_fn", collate_fn), ("fallback_collate", fallback_collate),
                          ("worker_init_fn", dataloader_options.get("worker_init_fn")))
                for name, value in others:
                    if value is not None:
                        _spawn.check_importable(name, value, method, fn)
                _spawn.check_main(method, fn)
        super().__init__(dataset, batch_size=None, sampler=specs, num_workers=num_workers,
                         collate_fn=_Collate(collate_fn, fallback_collate),  # type: ignore[arg-type]  # takes Tasks
                         **dataloader_options)

    def __iter__(self):
        if self.num_workers:  # not where spawned workers would run this loop again
            _spawn.check_iteration(_start_method(self.multiprocessing_context), type(self).__name__)
        iterator = super().__iter__()
        if self.num_workers == 0:
            yield from iterator
            return
        # What the main process holds of the workers (their pooled buffers stay mapped,
        # layouts received once) lives as long as the iterator that runs them.
        seen = _seen_by(iterator)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as err:
                better = _worker_fault(iterator, err)
                if better is None:
                    raise
                raise better from err
            if type(batch) is _transport.Packed or type(batch) is _transport.Lost:
                seen.add(batch.token)
                batch = batch.unpack()
            yield batch

    @property
    def _index_sampler(self):
        # What DataLoader's iterator draws its indices (our specs) from: the same stream,
        # remembering which spec went out under which send index, so that the error of a
        # worker that died or hung can name the batch it was building (_worker_fault).
        return _Recorded(self.sampler, 4 * self.num_workers * (self.prefetch_factor or 2) + 16)

    @property
    def specs(self):
        """The batch-spec stream (the DataLoader's sampler)."""
        return self.sampler

    @property
    def sample_task(self):
        """The task function of a [`task_loader`][metabatch.task_loader] (`None` for other datasets)."""
        return getattr(self.dataset, "sample_task", None)


def task_loader(sample_task: Callable, specs: Iterable[BatchSpec], *, num_workers: int = 0,
                collate_fn: Callable | None = None, **dataloader_options: Any) -> TaskDataLoader:
    """A DataLoader whose workers build whole, stacked batches of tasks.

    Args:
        sample_task: `sample_task(key, idx, n_ctx, n_tgt) -> pytree` of tensors,
            numpy arrays or numbers. It must take all randomness from `key`
            (e.g. [metabatch.random.numpy_rng][]) and, for `spawn` /
            `forkserver` workers, be picklable: a module-level function or a
            `functools.partial` of one.
        specs: the batch-spec stream, usually [metabatch.batch_specs][].
        num_workers: worker processes; 0 builds batches in the calling process.
            The stream is identical for every value.
        collate_fn: optional `collate_fn(list_of_task_outputs) -> batch`, run
            in the worker instead of the built-in stacking (as in metabatch 0.9.1).
        **dataloader_options: passed to `torch.utils.data.DataLoader`:
            `multiprocessing_context`, `timeout`, `pin_memory`,
            `prefetch_factor`, `persistent_workers`, `worker_init_fn`...

    Returns:
        A [TaskDataLoader][metabatch.TaskDataLoader] yielding one pytree per spec,
        every leaf a tensor with leading dimension `len(spec.indices)`.

    Raises:
        TypeError: `sample_task` is not callable, or cannot be pickled for a
            `spawn`/`forkserver` worker; a batch option was passed.
        ValueError: `num_workers < 0`; `timeout > 0` with `num_workers=0`.

    Examples:
        >>> import metabatch as mb
        >>> def sample_task(key, idx, n_ctx, n_tgt):
        ...     x = mb.random.numpy_rng(key).uniform(-5, 5, size=(n_ctx + n_tgt, 1))
        ...     return {"context": x[:n_ctx], "target": x[n_ctx:]}
        >>> specs = mb.batch_specs(seed=0, num_tasks=100, batch_size=8, n_ctx=(1, 5), n_tgt=10,
        ...                        num_batches=2)
        >>> for batch in mb.task_loader(sample_task, specs):
        ...     assert batch["target"].shape == (8, 10, 1)
    """
    _validate.callable_(sample_task, "sample_task", "task_loader")
    return TaskDataLoader(_SampleTasks(sample_task), specs, num_workers=num_workers, collate_fn=collate_fn,
                          **dataloader_options)
