"""How a batch travels from a loader worker to the training loop (private).

The path of one batch, in order:

1. The DataLoader's sampler yields a `BatchSpec`; DataLoader sends it to a
   worker (an index queue), which calls `dataset[spec]`: the list of that
   spec's task outputs (`loader.Tasks`).
2. In the worker, `loader`'s collate step calls `pack`: the outputs are
   stacked (`_stack.fill`) straight into one buffer — inline bytes for a
   small batch, else a shared-memory buffer from the worker's `Sender`
   pool — and wrapped in a `Message` (a NamedTuple).
3. DataLoader pickles the message onto its result queue. `Message.__reduce__`
   makes unpickling in the main process call `receive`, in the order the
   worker sent its messages; what the main process has received once stays
   there (`REMOTES[token]`), so later messages refer to it by number:

   - a layout travels with the first batch that uses it, then as a number;
   - a pooled shared buffer (and the pool's flags array) travels once per
     buffer, as torch's file descriptor; later batches in that buffer send only
     `(slot, generation)`. torch's fd reducer would otherwise make the main
     process fetch the descriptor over a fresh connection to the worker on
     every batch, a round trip that waits for the busy worker's GIL.

4. `receive` returns a `Packed` (buffer + layout); with
   `pin_memory` DataLoader's pin thread calls `Packed.pin_memory`.
   `TaskDataLoader.__iter__` calls `Packed.unpack`: the user's pytree of
   zero-copy tensor views of the buffer. When the last view dies, the slot's
   flag is set free again and the worker reuses the buffer.

Nothing is left in `/dev/shm`, under either of torch's sharing strategies.
With the default `file_descriptor` strategy no segment has a name: torch
unlinks it at creation. With `set_sharing_strategy("file_system")` a
segment keeps its name until every process that mapped it lets go: a worker
drops its pool when it exits (`Sender.close`, from multiprocessing's exit
hooks) and the main process when the iterator dies (`forget`), so no
name outlives an epoch (or, with persistent workers, the loader); when a
process is killed, torch's shared-memory manager removes the names once all
of them are gone.
`TaskDataLoader` drops a worker's entry of `REMOTES` (`forget`) when
the DataLoader iterator that ran it dies; registering a new worker also drops
entries of workers that no longer exist. Measured against torch's own tensor
sharing (one segment per leaf) in `benchmarks/loader.py`.
"""

from __future__ import annotations

import multiprocessing.util
import os
import threading
import weakref
from typing import NamedTuple

import numpy as np
import torch

from . import _stack

__all__ = ["INLINE_BYTES", "Lost", "Message", "Packed", "Sender", "forget", "pack", "receive"]

# Batches below this many bytes travel inline in the message (a pipe copy is
# cheaper than creating and mapping a shared-memory segment); larger ones in
# one shared-memory buffer. See benchmarks/loader.py.
INLINE_BYTES = 64 * 1024

_POOL_SLOTS = 8  # reusable shared-memory buffers per worker
_FREE, _BUSY = 0, 1
_MAX_SENT_LAYOUTS = 256


class Sender:
    """A worker's transport state: its token, the layouts and buffers the main process already holds.

    Pooled buffers: allocating and first touching a fresh shared-memory segment
    costs milliseconds for a batch of images (`benchmarks/loader.py`); a
    pooled buffer is mapped once in each process and reused. The worker marks a
    slot busy when it fills it; the main process marks it free again when the
    last view of that batch dies. When every slot is busy (the user keeps many
    batches alive) the worker falls back to a one-off segment.

    The worker drops its pool when it exits (`close`, run by
    multiprocessing's exit hooks, since a worker ends with `os._exit` and
    never frees its objects): under `set_sharing_strategy("file_system")` a
    segment has a name in `/dev/shm` until every process that mapped it lets
    go, and a pool held until `os._exit` kept its names there until the main
    process exited.
    """

    def __init__(self):
        self.pid = os.getpid()
        self.token = int.from_bytes(os.urandom(8), "little")
        self.hello = True  # the main process has not heard of this token yet
        self.layouts: dict[_stack.Layout, int] = {}  # for layouts sent: their ids
        self.flags: torch.Tensor | None = None  # the pool's shared flags, made with the first pooled buffer
        self._flags: np.ndarray | None = None  # their numpy view
        self.flags_sent = False
        self.bufs: list[tuple[torch.Tensor, np.ndarray] | None] = [None] * _POOL_SLOTS  # (shared tensor, numpy view)
        self.gens = [0] * _POOL_SLOTS  # bumped whenever a slot gets a new buffer
        self.sent = [-1] * _POOL_SLOTS  # generation of each slot that the main process holds
        # At the worker's exit (a weak reference: a Sender made outside a worker may die first).
        multiprocessing.util.Finalize(self, _close, args=(weakref.ref(self),), exitpriority=0)

    def close(self) -> None:
        """Let go of the pool's shared buffers and flags (the main process keeps its own mappings)."""
        self.flags = self._flags = None
        self.bufs = [None] * _POOL_SLOTS
        self.gens = [g + 1 for g in self.gens]  # a later take() makes fresh buffers
        self.flags_sent = False

    def take(self, nbytes: int):
        """`(slot, generation, tensor, raw)`: a shared buffer of at least `nbytes`; slot None if one-off."""
        flags = self._flags
        if flags is None:
            self.flags = torch.zeros(_POOL_SLOTS, dtype=torch.uint8).share_memory_()
            flags = self._flags = self.flags.numpy()
        bufs, free = self.bufs, None
        for slot in range(_POOL_SLOTS):
            if flags[slot] == _FREE:
                buf = bufs[slot]
                if buf is not None and buf[1].size >= nbytes:
                    found = buf
                    break
                if free is None:
                    free = slot
        else:
            if free is None:  # every slot holds a live batch
                tensor = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
                return None, 0, tensor, tensor.numpy()
            slot = free
            tensor = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8).share_memory_()  # n_ctx/n_tgt vary
            found = bufs[slot] = tensor, tensor.numpy()
            self.gens[slot] += 1
        flags[slot] = _BUSY
        return (slot, self.gens[slot]) + found

    def release(self, slot: int) -> None:
        if self._flags is not None:
            self._flags[slot] = _FREE

    def message(self, layout: _stack.Layout, slot, gen: int, data) -> Message:
        hello = os.getpid() if self.hello else None
        self.hello = False
        layout_id = self.layouts.get(layout)
        new_layout = layout_id is None
        if layout_id is None:
            if len(self.layouts) >= _MAX_SENT_LAYOUTS:
                self.layouts.clear()  # the main process drops its copies when it sees id 0 again
            layout_id = self.layouts[layout] = len(self.layouts)
        flags = buf = None
        if slot is not None:
            if not self.flags_sent:
                flags, self.flags_sent = self.flags, True
            pooled = self.bufs[slot]
            if self.sent[slot] != gen and pooled is not None:
                buf, self.sent[slot] = pooled[0], gen
        return Message(self.token, hello, flags, layout_id, layout if new_layout else None, slot, gen, buf,
                       data)


def _close(ref) -> None:
    sender = ref()
    if sender is not None:
        sender.close()


class Message(NamedTuple):
    """What a worker returns for one spec; unpickled in the main process by `receive`.

    Attributes:
        token: the sending worker's random id (a new one whenever a worker starts).
        hello: the worker's pid on its first message, else `None`.
        flags: the pool's shared flags tensor, on the first pooled batch only.
        layout_id: the number of this batch's layout.
        layout: the `_stack.Layout` itself the first time it is used, else `None`.
        slot: the pool slot holding the batch, or `None` (inline bytes or a one-off buffer).
        gen: the generation of the buffer in `slot`.
        buf: the slot's shared tensor the first time it crosses, else `None`.
        data: inline bytes or a one-off shared tensor (`slot` is `None`), else `None`.
    """

    token: int
    hello: int | None
    flags: torch.Tensor | None
    layout_id: int
    layout: _stack.Layout | None
    slot: int | None
    gen: int
    buf: torch.Tensor | None
    data: bytearray | torch.Tensor | None

    def __reduce__(self):
        return receive, tuple(self)


class Remote:
    """The main process's copy of one worker's layouts, flags and pooled buffers."""

    __slots__ = ("bufs", "flags", "layouts", "pid")

    def __init__(self, pid: int):
        self.pid, self.flags = pid, None
        self.layouts: dict[int, _stack.Layout] = {}
        self.bufs: dict[int, tuple] = {}


REMOTES: dict = {}  # worker token -> Remote
_REMOTES_LOCK = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def receive(token, hello, flags, layout_id, layout, slot, gen, buf, data):
    """Unpickle a worker's message in the main process (in the order that worker sent them)."""
    remote = REMOTES.get(token)
    if hello is not None:
        with _REMOTES_LOCK:
            for old in [t for t, r in REMOTES.items() if not _alive(r.pid)]:
                del REMOTES[old]
            remote = REMOTES[token] = Remote(hello)
    if remote is None:  # cannot happen while the messages of a worker arrive in order
        return Lost(token)
    if flags is not None:
        remote.flags = flags.numpy()  # keeps the tensor, hence its mapping, alive
    if layout is not None:
        if layout_id == 0:
            remote.layouts.clear()
        remote.layouts[layout_id] = layout
    else:
        layout = remote.layouts[layout_id]
    if slot is None:
        return Packed(token, data, layout)
    if buf is not None:
        remote.bufs[slot] = gen, buf
    held_gen, buf = remote.bufs[slot]
    if held_gen != gen:
        return Lost(token)
    return Packed(token, buf, layout, (remote.flags, slot))


def _release(flags: np.ndarray, slot: int) -> None:
    flags[slot] = _FREE


class Packed:
    """One batch in the main process: a flat buffer plus its layout.

    `buf` is a bytearray (inline), a one-off shared tensor, or a pooled shared
    tensor, in which case `lease` is `(flags, slot)`: the slot is handed
    back to its worker once the batch's views are gone (or at once, if this
    object dies unpacked).
    """

    __slots__ = ("buf", "layout", "lease", "token")

    def __init__(self, token, buf, layout, lease=None):
        self.token, self.buf, self.layout, self.lease = token, buf, layout, lease

    def __del__(self):
        if self.lease is not None:  # dropped unpacked (e.g. an epoch cut short): hand the slot back
            flags, slot = self.lease
            flags[slot] = _FREE

    def pin_memory(self, device=None):  # called by DataLoader's pin-memory thread
        buf = self.buf
        if isinstance(buf, bytearray):
            buf = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
        pinned = buf.pin_memory() if device is None else buf.pin_memory(device)
        lease, self.lease = self.lease, None
        if lease is not None:  # copied out: the worker may reuse its buffer
            _release(*lease)
        return Packed(self.token, pinned, self.layout)

    def unpack(self):
        buf, layout = self.buf, self.layout
        if isinstance(buf, bytearray):
            return _stack.unflatten(layout, layout.tensors(np.frombuffer(buf, dtype=np.uint8)))
        if buf.device.type != "cpu" or buf.is_pinned():
            return _stack.unflatten(layout, layout.torch_views(buf))
        raw = buf.numpy()  # a fresh handle: every view of this batch keeps it alive
        lease, self.lease = self.lease, None
        if lease is not None:
            weakref.finalize(raw, _release, *lease)
        return _stack.unflatten(layout, layout.tensors(raw))


class Lost:
    """Stands for a batch whose shared buffer the main process no longer holds (a bug if ever seen)."""

    __slots__ = ("token",)

    def __init__(self, token):
        self.token = token

    def pin_memory(self, device=None):
        return self

    def unpack(self):
        raise RuntimeError(f"metabatch: a batch from loader worker {self.token:#x} refers to a shared buffer "
                           f"that this process does not hold; please report this bug.")


def forget(tokens: set) -> None:
    """Drop what the main process holds of these workers (they died with their iterator)."""
    with _REMOTES_LOCK:
        for token in tokens:
            REMOTES.pop(token, None)


def _clear_after_fork() -> None:  # a forked worker keeps none of its parent's buffers
    REMOTES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_clear_after_fork)


def pack(sender: Sender, outs: list, spec) -> Message:
    """Stack one spec's task outputs into `sender`'s buffers: the message a worker returns."""
    got: list = []

    def alloc(nbytes):
        if nbytes < INLINE_BYTES:  # small: a pipe copy beats mapping a segment
            got.append(bytearray(nbytes))
            return np.frombuffer(got[0], dtype=np.uint8)
        got[:] = sender.take(nbytes)
        return got[3]

    try:
        layout, _ = _stack.fill(outs, spec, alloc)
    except BaseException:
        if len(got) == 4 and got[0] is not None:  # hand the pooled slot back
            sender.release(got[0])
        raise
    if len(got) == 1:
        return sender.message(layout, None, 0, got[0])
    slot, gen, tensor, _ = got
    return sender.message(layout, slot, gen, tensor if slot is None else None)
