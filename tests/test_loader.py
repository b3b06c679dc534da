import functools
import gc
import hashlib
import multiprocessing
import multiprocessing.resource_tracker
import os
import pickle
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import optree
import pytest
import torch

import metabatch as mb
from metabatch import _transport
from tests import tasks_for_tests as T

# Any DataLoader shutdown (not only after an error) can race torch's own index-queue feeder thread
# when the machine is loaded: it closes the queue while the thread still writes the workers' stop
# signal ("Exception in thread QueueFeederThread ... Bad file descriptor"). A torch-side message in a
# torch thread: tolerated in every test here (metabatch itself starts no thread).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception in thread QueueFeederThread:pytest.PytestUnhandledThreadExceptionWarning")


# The loader's core tests run under fork and under spawn (the default on macOS and Windows).
START_METHODS = pytest.mark.parametrize("start_method", ["fork", "spawn"])


def workers(num_workers: int, start_method: str) -> dict:
    """Loader options for ``num_workers`` workers started by ``start_method`` (none for 0 workers)."""
    return dict(num_workers=num_workers, multiprocessing_context=start_method if num_workers else None)


def digest(batches) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for leaf in optree.tree_leaves(batch):
            h.update(str((tuple(leaf.shape), leaf.dtype)).encode())
            h.update(leaf.contiguous().numpy().tobytes())
    return h.hexdigest()


def sinusoid_specs(**kw):
    args = dict(seed=0, num_tasks=1000, batch_size=16, n_ctx=(1, 5), n_tgt=(1, 10), num_batches=6)
    args.update(kw)
    return mb.batch_specs(**args)


GOLDEN_DIGEST = "e62617c9f249e7b16a9f71abc19e1c6c9e8357619f725d2e19e413c0a4edbd41"


def test_golden_first_batches():
    batches = list(mb.task_loader(T.sinusoid, sinusoid_specs()))
    assert digest(batches[:1]) == GOLDEN_DIGEST
    first = batches[0]
    assert first["context"][0].shape == (16, 3, 1)
    assert first["target"][1].shape == (16, 3, 1)
    assert first["idx"].tolist() == list(sinusoid_specs()[0].indices)


def test_task_j_is_built_from_fold_in_of_the_batch_key():
    spec = sinusoid_specs()[2]
    batch = mb.build_batch(T.sinusoid, spec)
    for j in (0, 5, 15):
        one = T.sinusoid(mb.random.fold_in(spec.key, j), spec.indices[j], spec.n_ctx, spec.n_tgt)
        assert np.array_equal(batch["target"][1][j].numpy(), one["target"][1])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core CI machine
@pytest.mark.parametrize("num_workers, start_method", [(0, None), (1, "fork"), (2, "fork"), (3, "fork"),
                                                       (1, "spawn"), (2, "spawn")])
def test_stream_is_independent_of_worker_count(num_workers, start_method):
    ref = digest(mb.task_loader(T.sinusoid, sinusoid_specs()))
    assert digest(mb.task_loader(T.sinusoid, sinusoid_specs(), **workers(num_workers, start_method))) == ref


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_stream_is_independent_of_start_method(context):
    specs = sinusoid_specs(num_batches=3)
    ref = digest(mb.task_loader(T.sinusoid, specs))
    got = digest(mb.task_loader(T.sinusoid, specs, num_workers=2, multiprocessing_context=context))
    assert got == ref


def one_buffer(batch) -> bool:
    """True when the leaves of a batch sit back to back (64-byte aligned) in one buffer."""
    spans = sorted((leaf.data_ptr(), leaf.data_ptr() + leaf.nbytes) for leaf in optree.tree_leaves(batch))
    return all(0 <= b[0] - a[1] < 64 for a, b in zip(spans, spans[1:], strict=False))


@START_METHODS
def test_large_batches_travel_in_one_shared_buffer(start_method):
    specs = mb.batch_specs(0, 50, 4, 3, 2, num_batches=4)
    ref = list(mb.task_loader(T.big_task, specs))
    got = list(mb.task_loader(T.big_task, specs, num_workers=2, multiprocessing_context=start_method))
    assert digest(got) == digest(ref)
    for x, y in got:
        assert one_buffer((x, y))
        assert x.dtype == torch.float32 and y.dtype == torch.int64


@START_METHODS
def test_pooled_buffers_are_reused_only_after_the_batch_dies(start_method):
    specs = mb.batch_specs(0, 50, 4, 3, 2, num_batches=30)
    ref = [digest([b]) for b in mb.task_loader(T.big_task, specs)]
    kept = list(mb.task_loader(T.big_task, specs, **workers(2, start_method)))  # more alive than slots
    assert [digest([b]) for b in kept] == ref
    ptrs, got = [], []
    for batch in mb.task_loader(T.big_task, specs, **workers(2, start_method)):  # each dies before the next
        ptrs.append(batch[0].data_ptr())
        got.append(digest([batch]))
        del batch
    assert got == ref
    assert len(set(ptrs)) < len(ptrs)  # buffers came back and were reused


class pretend_worker:
    """Run a builder's __getitem__ as a loader worker would (it then returns messages)."""

    def __enter__(self):
        self.real = torch.utils.data.get_worker_info
        torch.utils.data.get_worker_info = lambda: type("Info", (), {"id": 0})()

    def __exit__(self, *exc):
        torch.utils.data.get_worker_info = self.real


def work(task_loader, spec):
    """What a worker of ``task_loader`` returns for ``spec``."""
    return task_loader.collate_fn(task_loader.dataset[spec])


def send(message) -> bytes:
    return bytes(ForkingPickler.dumps(message))


def test_worker_sends_buffers_and_layouts_once():
    specs = mb.batch_specs(0, 50, 4, 3, 2, num_batches=3)
    big = mb.task_loader(T.big_task, specs)
    small = mb.task_loader(T.sinusoid, sinusoid_specs())
    spec = sinusoid_specs()[0]
    with pretend_worker():
        first, again = send(work(big, specs[0])), None
        small_first, small_again = send(work(small, spec)), send(work(small, spec))
    # The first pooled batch carries its shared buffer (as a file descriptor) and its layout.
    assert b"rebuild_storage_fd" in first and b"Layout" in first
    batch = pickle.loads(first)
    assert isinstance(batch, _transport.Packed) and batch.buf.is_shared()
    assert digest([batch.unpack()]) == digest([mb.build_batch(T.big_task, specs[0])])
    del batch
    gc.collect()  # the views are gone: the slot is free again
    with pretend_worker():
        again = send(work(big, specs[1]))
    # The next batch reuses the buffer the main process already holds: a few bytes, no descriptor.
    assert b"rebuild_storage_fd" not in again and b"Layout" not in again and len(again) < 300
    assert digest([pickle.loads(again).unpack()]) == digest([mb.build_batch(T.big_task, specs[1])])
    # Small batches travel inline; a repeated layout travels as a number.
    assert b"Layout" in small_first and b"Layout" not in small_again
    assert len(small_again) < len(small_first) - 100
    for message in (small_first, small_again):
        got = pickle.loads(message)
        assert isinstance(got.buf, bytearray)  # inline bytes: no shared-memory segment
        assert digest([got.unpack()]) == digest([mb.build_batch(T.sinusoid, spec)])
    _transport.forget({got.token, pickle.loads(again).token})


def test_a_batch_dropped_unpacked_hands_its_buffer_back():
    specs = mb.batch_specs(0, 50, 4, 3, 2, num_batches=20)
    big = mb.task_loader(T.big_task, specs)
    with pretend_worker():
        messages = [send(work(big, specs[i])) for i in range(3)]  # three slots busy
    flags = big.collate_fn._sender._flags
    assert flags.sum() == 3
    got = [pickle.loads(m) for m in messages]
    del got  # never unpacked (e.g. discarded when an epoch is cut short)
    assert flags.sum() == 0
    with pretend_worker():
        for spec in list(specs)[3:]:  # 17 more batches, each dropped: no new buffer is needed
            pickle.loads(send(work(big, spec)))
    assert sum(buf is not None for buf in big.collate_fn._sender.bufs) == 3  # the three of the first batches
    _transport.forget({big.collate_fn._sender.token})


def test_pin_memory_copies_out_and_hands_the_buffer_back(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, device=None: self.clone())  # CPU-only torch
    specs = mb.batch_specs(0, 50, 4, 3, 2, num_batches=2)
    big = mb.task_loader(T.big_task, specs)
    small = mb.task_loader(T.sinusoid, sinusoid_specs())
    with pretend_worker():
        received = pickle.loads(send(work(big, specs[0])))
        inline = pickle.loads(send(work(small, sinusoid_specs()[0])))
    pinned = received.pin_memory()
    assert big.collate_fn._sender._flags.sum() == 0  # copied out: the worker may reuse its buffer at once
    assert digest([pinned.unpack()]) == digest([mb.build_batch(T.big_task, specs[0])])
    assert digest([inline.pin_memory().unpack()]) == digest([mb.build_batch(T.sinusoid, sinusoid_specs()[0])])
    _transport.forget({received.token, inline.token})


def shared_memory_state():
    """(open fds, mapped shared-memory segments, workers held) of this process."""
    with open("/proc/self/maps") as f:
        mapped = sum("/dev/shm/" in line for line in f)
    return len(os.listdir("/proc/self/fd")), mapped, len(_transport.REMOTES)


def holders() -> str:
    """Who holds the shared tensors still alive in this process (for a failing leak check)."""
    alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_shared()]
    refs = [type(r).__name__ for o in alive for r in gc.get_referrers(o)]
    return f"{len(alive)} shared tensors alive, held by {refs}; workers held: {_transport.REMOTES}"


def settles_to(state, seconds=5.0) -> bool:
    """True once shared_memory_state() == state (worker shutdown can trail the loader's death)."""
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        if shared_memory_state() == state:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def worker_segments() -> list:
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids.update(f.read().split())
    assert pids
    return [name for name in os.listdir("/dev/shm") if any(f"_{pid}_" in name for pid in pids)]


@START_METHODS
@pytest.mark.parametrize("persistent_workers", [False, True])
def test_no_shared_memory_leaks(persistent_workers, start_method):
    if start_method != "fork":  # spawn's resource tracker: started once per process, kept open (not a leak)
        multiprocessing.resource_tracker.ensure_running()
    gc.collect()
    before = shared_memory_state()
    specs = mb.batch_specs(0, 50, 4, (1, 3), 2, num_batches=150)
    ref = digest([mb.build_batch(T.big_task, specs[i]) for i in range(40)])
    dl = mb.task_loader(T.big_task, specs, **workers(2, start_method), persistent_workers=persistent_workers)
    for _epoch in range(3):
        states = []
        for step, batch in enumerate(dl):
            if step == 0:
                kept = []
            if step < 40:
                kept.append(batch)  # 40 batches alive at once: more than the pools hold
            if step == 39:
                assert digest(kept) == ref
                kept = None
            if step in (60, 149):
                states.append(shared_memory_state())
                assert worker_segments() == []  # no named segment left behind in /dev/shm
        assert states[0] == states[1]  # nothing grows from batch to batch
        assert states[1][2] <= 2
    del dl, batch
    # Everything unmapped and closed with the loader.
    assert settles_to(before), f"{shared_memory_state()} != {before}: {holders()}"


@START_METHODS
def test_cut_short_epochs_with_persistent_workers(start_method):
    specs = mb.batch_specs(0, 50, 4, (1, 3), 2, num_batches=12)
    ref = [digest([mb.build_batch(T.big_task, spec)]) for spec in specs]
    dl = mb.task_loader(T.big_task, specs, **workers(2, start_method), persistent_workers=True)
    for cut in (3, 7, 12, 1, 12):
        got = []
        for step, batch in enumerate(dl):
            got.append(digest([batch]))
            if step + 1 == cut:
                break
        assert got == ref[:cut]
    del dl, batch
    gc.collect()
    assert _transport.REMOTES == {}


@START_METHODS
def test_small_batches_travel_inline_as_one_buffer(start_method):
    for batch in mb.task_loader(T.sinusoid, sinusoid_specs(num_batches=2), **workers(1, start_method)):
        assert one_buffer(batch)


@START_METHODS
def test_torch_leaves_and_pin_memory_option(start_method):
    specs = mb.batch_specs(3, 20, 4, (2, 3), 5, num_batches=3)
    ref = list(mb.task_loader(T.torch_task, specs))
    got = list(mb.task_loader(T.torch_task, specs, **workers(2, start_method), prefetch_factor=1,
                              persistent_workers=True, timeout=30))
    assert digest(got) == digest(ref)
    x, y = ref[0]
    assert x.shape == (4, specs[0].n_ctx, 3) and y.shape == (4, 5)


@START_METHODS
def test_resume_from_start_reproduces_the_tail(start_method):
    full = list(mb.task_loader(T.sinusoid, sinusoid_specs(), **workers(2, start_method)))
    tail = list(mb.task_loader(T.sinusoid, sinusoid_specs(start=4), **workers(2, start_method)))
    assert digest(tail) == digest(full[4:])


def test_ranks_union_is_the_single_process_batch():
    single = list(mb.task_loader(T.sinusoid, sinusoid_specs(num_batches=3)))
    ranks = [list(mb.task_loader(T.sinusoid, sinusoid_specs(num_batches=3, rank=r, world_size=4),
                                 num_workers=r % 2)) for r in range(4)]
    for step in range(3):
        joined = optree.tree_map(lambda *xs: torch.cat(xs), *[r[step] for r in ranks])
        assert digest([joined]) == digest([single[step]])


def test_stack_and_numbers():
    out = mb.stack([{"a": 1.0, "b": np.int32(2), "c": torch.zeros(2)}, {"a": 2.0, "b": np.int32(3),
                                                                        "c": torch.ones(2)}])
    assert out["a"].tolist() == [1.0, 2.0] and out["a"].dtype == torch.float32
    assert out["b"].dtype == torch.int32 and out["c"].shape == (2, 2)


def test_user_collate_fn_gets_the_list_of_task_outputs():
    def count(outputs):
        return len(outputs)
    assert list(mb.task_loader(T.sinusoid, sinusoid_specs(num_batches=2), collate_fn=count)) == [16, 16]


def test_inputs_are_not_mutated():
    arr = np.arange(6.0)
    spec = mb.batch_specs(0, 5, 2, 1, 1)[0]
    mb.build_batch(lambda k, i, c, t: arr, spec)
    assert arr.tolist() == list(np.arange(6.0))


# ----- bad input: clear errors, nothing hangs ----------------------------------------------------

# When a worker's error ends an iteration, DataLoader's shutdown can race its own index-queue
# feeder thread ("Exception in thread QueueFeederThread ... Bad file descriptor"): a harmless
# torch-side message, not ours (likewise a connection closed twice in that teardown). The error
# tests below tolerate both.
def tolerate_feeder_race(test):
    test = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")(test)
    return pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")(test)


def bad_specs():
    return mb.batch_specs(0, num_tasks=10, batch_size=10, n_ctx=3, n_tgt=3, shuffle=False, num_batches=1)


# One spawn worker: with two, the error can end the epoch while the other one is still starting, and torch
# then reports that worker's death from the iterator's __del__, after the test.
@tolerate_feeder_race
@pytest.mark.parametrize("num_workers, start_method", [(0, None), (2, "fork"), (1, "spawn")])
@pytest.mark.parametrize("task, what", [
    (T.ragged, r"leaf \['x'\] has shape \(3, 2\) vs \(4, 2\)"),
    (T.restructured, "pytree structure"),
    (T.retyped, "dtype torch.float32 vs torch.float64"),
])
def test_mismatched_tasks_name_both_tasks_and_the_step(task, what, num_workers, start_method):
    with pytest.raises(ValueError, match=what) as info:
        list(mb.task_loader(task, bad_specs(), **workers(num_workers, start_method)))
    assert "step 0: task 0 (index 0) and task 7 (index 7)" in str(info.value)


@tolerate_feeder_race
@pytest.mark.parametrize("num_workers, start_method", [(0, None), (2, "fork"), (1, "spawn")])
def test_task_errors_keep_type_and_carry_step_index_key(num_workers, start_method):
    with pytest.raises(KeyError, match="no such character: 7") as info:
        list(mb.task_loader(T.failing, bad_specs(), **workers(num_workers, start_method)))
    text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    spec = bad_specs()[0]
    assert "step 0, task 7 of the batch (index 7)" in text
    assert repr(mb.random.fold_in(spec.key, 7)) in text


def test_unsupported_leaf_is_named():
    with pytest.raises(TypeError, match=r"leaf \['name'\].*str"):
        list(mb.task_loader(T.string_leaf, bad_specs()))


@tolerate_feeder_race
def test_killed_worker_raises_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?i)worker"):
        list(mb.task_loader(T.killer, bad_specs(), num_workers=1, timeout=20))
    assert time.monotonic() - start < 20


def test_unpicklable_task_with_spawn_says_why():
    with pytest.raises(TypeError, match="module level"):
        mb.task_loader(lambda k, i, c, t: 0, bad_specs(), num_workers=1, multiprocessing_context="spawn")
    # a partial of a module-level function is fine
    mb.task_loader(functools.partial(T.sinusoid), bad_specs(), num_workers=1, multiprocessing_context="spawn")


@pytest.mark.parametrize("kw, err, match", [
    (dict(num_workers=-1), ValueError, "num_workers"),
    (dict(batch_size=4), TypeError, "batch_size"),
    (dict(shuffle=True), TypeError, "shuffle"),
])
def test_bad_loader_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        mb.task_loader(T.sinusoid, bad_specs(), **kw)


def test_not_callable_and_bad_sampler():
    with pytest.raises(TypeError, match="callable"):
        mb.task_loader(3, bad_specs())
    with pytest.raises(TypeError, match="BatchSpec"):
        list(mb.task_loader(T.sinusoid, [1, 2]))


def test_loader_exposes_specs_and_task():
    loader = mb.task_loader(T.sinusoid, bad_specs())
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert loader.specs is not None and loader.sample_task is T.sinusoid
    assert len(loader) == 1
