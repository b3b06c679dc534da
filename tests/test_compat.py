"""metabatch 0.9.1 code runs unchanged on the compat layer."""

import hashlib
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metabatch as mb
from metabatch import TaskLoader, TaskSet

# Any DataLoader shutdown (not only after an error) can race torch's own index-queue feeder thread
# when the machine is loaded: it closes the queue while the thread still writes the workers' stop
# signal ("Exception in thread QueueFeederThread ... Bad file descriptor"). A torch-side message in a
# torch thread: tolerated in every test here (metabatch itself starts no thread).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception in thread QueueFeederThread:pytest.PytestUnhandledThreadExceptionWarning")


class MyTaskSet(TaskSet):
    """The 0.9.1 README pattern: a TaskSet over task_data, legacy global RNG inside."""

    def __init__(self, task_data, *args, **kw):
        super().__init__(*args, **kw)
        self.task_data = task_data

    def __len__(self):
        return len(self.task_data)

    def __gettask__(self, idx, n_context, n_target):
        images = self.task_data[idx]["images"]
        ctx = images[np.random.choice(len(images), n_context)]
        tgt = images[[random.randrange(len(images)) for _ in range(n_target)]]
        return {"context": ctx, "target": tgt, "label": torch.tensor(idx)}


class KeyedTaskSet(MyTaskSet):
    """A migrated TaskSet: takes the task key, touches no global RNG."""

    def __gettask__(self, idx, n_context, n_target, key):
        rng = mb.random.numpy_rng(key)
        images = self.task_data[idx]["images"]
        return {"context": images[rng.choice(len(images), n_context)],
                "target": images[rng.choice(len(images), n_target)]}


def conformity_collate(tasks):
    """0.9.1's own conformity check: every task of a batch has the same shapes."""
    shapes = {(t["context"].shape, t["target"].shape) for t in tasks}
    if len(shapes) != 1:
        raise AssertionError(f"non-uniform batch: {shapes}")
    return torch.utils.data.default_collate(tasks)


TASK_DATA = [{"images": np.arange(20 * 4, dtype=np.float32).reshape(20, 4) + 100 * i, "label": i}
             for i in range(37)]


def readme_set(**kw):
    return MyTaskSet(TASK_DATA, min_pts=1, max_ctx_pts=5, max_tgt_pts=10, **kw)


def as_list(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_readme_pattern_with_conformity_check(num_workers):
    loader = TaskLoader(readme_set(), batch_size=16, num_workers=num_workers, collate_fn=conformity_collate,
                        seed=0)
    batches = as_list(loader)
    assert len(batches) == len(loader) == 3  # 37 tasks: 16 + 16 + 5 (drop_last=False)
    assert [b["context"].shape[0] for b in batches] == [16, 16, 5]
    for b in batches:
        n_ctx, n_tgt = b["context"].shape[1], b["target"].shape[1]
        assert 1 <= n_ctx <= 5 and n_ctx <= n_tgt <= 10
    assert sorted(i for b in batches for i in b["label"].tolist()) == list(range(37))


def test_workers_alias_and_stacking_without_collate():
    batches = as_list(TaskLoader(readme_set(), batch_size=8, workers=2, shuffle=True, seed=3))
    ref = as_list(TaskLoader(readme_set(), batch_size=8, num_workers=0, shuffle=True, seed=3))
    for a, b in zip(batches, ref, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", [MyTaskSet, KeyedTaskSet])
def test_seeded_stream_is_reproducible_and_worker_count_independent(cls):
    def run(num_workers, seed=7):
        ts = cls(TASK_DATA, 1, 5, 10)
        return as_list(TaskLoader(ts, batch_size=6, shuffle=True, n_batches=5, num_workers=num_workers,
                                  seed=seed))
    ref = run(0)
    for got in (run(1), run(2)):
        for a, b in zip(got, ref, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    other = run(0, seed=8)
    assert any(not torch.equal(a["context"], b["context"]) for a, b in zip(other, ref))


def test_seed_is_drawn_once_and_exposed():
    loader = TaskLoader(readme_set(), batch_size=4, shuffle=True, n_batches=3)
    assert isinstance(loader.seed, int)
    again = TaskLoader(readme_set(), batch_size=4, shuffle=True, n_batches=3, seed=loader.seed)
    for a, b in zip(as_list(loader), as_list(again), strict=True):
        assert torch.equal(a["context"], b["context"])


def test_n_batches_samples_with_replacement_and_epochs_differ():
    loader = TaskLoader(readme_set(), batch_size=30, shuffle=True, n_batches=4, seed=0)
    first, second = as_list(loader), as_list(loader)
    assert len(first) == 4 == len(loader)
    labels = [b["label"].tolist() for b in first]
    assert any(len(set(batch)) < len(batch) for batch in labels)  # duplicates allowed now
    assert labels != [b["label"].tolist() for b in second]


def test_sequential_epoch_and_drop_last():
    loader = TaskLoader(readme_set(), batch_size=16, drop_last=True, seed=0)
    batches = as_list(loader)
    assert len(batches) == 2 == len(loader)
    assert [b["label"].tolist() for b in batches] == [list(range(16)), list(range(16, 32))]


@given(st.integers(0, 5), st.integers(0, 4), st.integers(1, 6), st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_size_semantics_over_many_batches(min_pts, extra_ctx, extra_tgt, seed):
    max_ctx = min_pts + extra_ctx
    max_tgt = max_ctx + extra_tgt
    ts = MyTaskSet(TASK_DATA, min_pts, max_ctx, max_tgt, total_tgt_pts=max_tgt + 3)
    specs = TaskLoader(ts, batch_size=2, shuffle=True, n_batches=30, seed=seed).specs
    for spec in specs:
        assert min_pts <= spec.n_ctx <= max_ctx and spec.n_ctx <= spec.n_tgt <= max_tgt
    full = MyTaskSet(TASK_DATA, min_pts, max_ctx, max_tgt, total_tgt_pts=max_tgt + 3, predict_full_target=True)
    assert {s.n_tgt for s in TaskLoader(full, batch_size=2, shuffle=True, n_batches=10, seed=seed).specs} == \
        {max_tgt + 3}
    ev = MyTaskSet(TASK_DATA, min_pts, max_ctx, max_tgt, total_tgt_pts=max_tgt + 3, eval=True,
                   predict_full_target_during_eval=True)
    for spec in TaskLoader(ev, batch_size=2, shuffle=True, n_batches=10, seed=seed).specs:
        assert spec.n_tgt == max_tgt + 3 - spec.n_ctx


def test_all_context_sizes_are_drawn():
    specs = TaskLoader(readme_set(), batch_size=2, shuffle=True, n_batches=400, seed=0).specs
    pairs = {(s.n_ctx, s.n_tgt) for s in specs}
    assert {c for c, _ in pairs} == {1, 2, 3, 4, 5}
    assert {t for c, t in pairs if c == 5} == {5, 6, 7, 8, 9, 10}


@pytest.mark.parametrize("args, match", [
    ((3, 2, 10), "max_ctx_pts=2 must be >= min_pts=3"),
    ((1, 10, 10), "max_ctx_pts=10 must be smaller than max_tgt_pts=10"),
    ((1, 5, 10, None, False, True), "total_tgt_pts"),
    ((-1, 5, 10), "min_pts"),
])
def test_taskset_validates_like_091(args, match):
    with pytest.raises(ValueError, match=match):
        MyTaskSet(TASK_DATA, *args)


def test_six_positional_arguments_work():  # 0.9.1's own CNP example passes six and crashed
    ts = MyTaskSet(TASK_DATA, 1, 5, 10, 12, False)
    assert ts.predict_full_target is False and ts.total_tgt_pts == 12


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=0), "batch_size"), (dict(n_batches=3), "shuffle"),
    (dict(n_batches=0, shuffle=True), "n_batches"), (dict(seed=-2), "seed"),
])
def test_loader_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        TaskLoader(readme_set(), **kw)


def test_direct_indexing_explains():
    with pytest.raises(TypeError, match="__gettask__"):
        readme_set()[0]
    with pytest.raises(TypeError, match="TaskSet"):
        TaskLoader([1, 2, 3])


def digest(batches) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            h.update(name.encode() + str(tuple(batch[name].shape)).encode())
            h.update(batch[name].contiguous().numpy().tobytes())
    return h.hexdigest()


# The legacy stream: global generators seeded once per batch from the batch key (see compat's docstring).
GOLDEN_LEGACY = "2028d87e793902309a0ba7680f6bf0a4f246ffea54d0d0474094130f43ea93a8"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_legacy_stream_is_pinned(num_workers):
    loader = TaskLoader(readme_set(), batch_size=8, shuffle=True, n_batches=3, num_workers=num_workers, seed=11)
    assert digest(as_list(loader)) == GOLDEN_LEGACY


def test_global_generators_are_seeded_once_per_batch_from_its_key():
    loader = TaskLoader(readme_set(), batch_size=5, shuffle=True, n_batches=2, seed=4)
    specs = list(TaskLoader(readme_set(), batch_size=5, shuffle=True, n_batches=2, seed=4).specs)
    for spec, batch in zip(specs, as_list(loader), strict=True):
        hi, lo = mb.random.key_data(spec.key)
        random.seed((hi ^ lo) & 0xFFFFFFFF)
        np.random.seed((hi ^ lo) & 0xFFFFFFFF)
        torch.manual_seed((hi ^ lo) & 0xFFFFFFFF)
        by_hand = [readme_set().__gettask__(i, spec.n_ctx, spec.n_tgt) for i in spec.indices]  # in order
        assert all(np.array_equal(batch["context"][j], t["context"]) for j, t in enumerate(by_hand))
        assert all(np.array_equal(batch["target"][j], t["target"]) for j, t in enumerate(by_hand))
        assert digest([loader.collate_fn(loader.dataset[spec])]) == digest([batch])  # what a worker does


def test_keyed_taskset_leaves_the_global_generators_alone():
    np.random.seed(5)
    random.seed(5)
    expected = np.random.rand(), random.random()
    np.random.seed(5)
    random.seed(5)
    as_list(TaskLoader(KeyedTaskSet(TASK_DATA, 1, 5, 10), batch_size=4, shuffle=True, n_batches=3, seed=0))
    assert (np.random.rand(), random.random()) == expected


class FailingTaskSet(MyTaskSet):
    def __gettask__(self, idx, n_context, n_target):
        if idx == 3:
            raise KeyError("no task 3")
        return super().__gettask__(idx, n_context, n_target)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("num_workers", [0, 1])
def test_legacy_errors_say_how_to_rebuild_the_batch(num_workers):
    loader = TaskLoader(FailingTaskSet(TASK_DATA, 1, 5, 10), batch_size=8, num_workers=num_workers, seed=0)
    with pytest.raises(KeyError, match="no task 3") as info:
        list(loader)
    text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "__gettask__(3, " in text and "step 0, task 3 of the batch" in text and "loader.dataset[spec]" in text
