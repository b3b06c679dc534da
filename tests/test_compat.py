"""metabatch 0.9.1 code runs unchanged on the compat layer."""

import hashlib
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metabatch as mb
from metabatch import TaskLoader, TaskSet

ROOT = str(pathlib.Path(__file__).resolve().parents[1])

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
    assert any(not torch.equal(a["context"], b["context"]) for a, b in zip(other, ref, strict=True))


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


# ----- metabatch 0.9.1 code as it really is ---------------------------------------------------------------

def sample_n_images(images, n):
    return images[np.random.choice(len(images), n)]


class ReadmeTaskSet(TaskSet):
    """0.9.1's README ``MyTaskSet``, its ``...`` filled in with the obvious."""

    def __init__(self, task_data, **kw):
        super().__init__(**kw)
        self.task_data = task_data

    def __len__(self):
        return len(self.task_data)

    def __gettask__(self, idx, n_context, n_target):
        data = self.task_data[idx]
        context_images = sample_n_images(data['images'], n_context)
        target_images = sample_n_images(data['images'], n_target)
        return {
            'context': context_images,
            'target': target_images
        }


class LabelledTaskSet(ReadmeTaskSet):
    """The README's task with its label kept: a string leaf ('dog')."""

    def __gettask__(self, idx, n_context, n_target):
        return {**super().__gettask__(idx, n_context, n_target), 'label': self.task_data[idx]['label']}


ANIMALS = ['dog', 'cat', 'cow', 'owl']
README_DATA = [{'images': np.arange(12 * 6, dtype=np.float32).reshape(12, 6) + 100 * i,
                'label': ANIMALS[i % 4]} for i in range(40)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the README's 8 workers on 2 cores
def test_091_readme_program_runs_unchanged():
    dataset = ReadmeTaskSet(README_DATA, min_pts=1, max_ctx_pts=5, max_tgt_pts=10)
    dataloader = TaskLoader(dataset, batch_size=16, workers=8)
    sizes = []
    for batch in dataloader:
        sizes.append(batch['context'].shape[0])
        assert batch['context'].shape[2:] == batch['target'].shape[2:] == (6,)
    assert sizes == [16, 16, 8]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_string_leaves_collate_as_default_collate_does(num_workers):
    def make():
        taskset = LabelledTaskSet(README_DATA, min_pts=1, max_ctx_pts=5, max_tgt_pts=10)
        return TaskLoader(taskset, batch_size=16, num_workers=num_workers, seed=0)
    loader = make()
    batches = list(loader)
    labels = [[d['label'] for d in README_DATA[s:s + 16]] for s in (0, 16, 32)]
    assert [b['label'] for b in batches] == labels
    assert batches[0]['label'][:5] == ['dog', 'cat', 'cow', 'owl', 'dog']
    for spec, batch in zip(make().specs, batches, strict=True):  # a twin's first epoch
        assert isinstance(batch['context'], torch.Tensor)
        assert batch['context'].shape == (len(spec.indices), spec.n_ctx, 6)
        # exactly torch's default_collate of the tasks, built as a worker builds them
        expected = torch.utils.data.default_collate(loader.dataset[spec].outputs)
        assert expected['label'] == batch['label'] and torch.equal(expected['context'], batch['context'])


class Curriculum(TaskSet):
    def __init__(self):
        super().__init__(1, 2, 3)
        self.level = 0

    def __len__(self):
        return 8

    def __gettask__(self, idx, n_context, n_target):
        return np.full(n_context, self.level)


def test_workers_are_not_persistent_so_a_changed_taskset_reaches_them():
    taskset = Curriculum()
    loader = TaskLoader(taskset, batch_size=4, num_workers=2, seed=0)
    assert loader.persistent_workers is False
    first = [b.unique().tolist() for b in loader]
    taskset.level = 1  # the next curriculum level, between epochs
    second = [b.unique().tolist() for b in loader]
    assert first == [[0], [0]] and second == [[1], [1]]


def test_dataset_is_the_users_taskset():
    taskset = readme_set()
    loader = TaskLoader(taskset, batch_size=4, num_workers=2, seed=0)
    assert loader.dataset is taskset


def seeded_globally(seed: int, torch_seed: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed if torch_seed is None else torch_seed)


def test_without_seed_the_stream_follows_the_global_generators():
    def run(num_workers, seed=0, torch_seed=None):
        seeded_globally(seed, torch_seed)
        loader = TaskLoader(readme_set(), batch_size=6, shuffle=True, n_batches=4, num_workers=num_workers)
        return loader.seed, digest(as_list(loader))

    ref = run(0)
    hi = int(np.random.RandomState(0).randint(0, 2**32, dtype=np.int64))
    lo = int(torch.randint(0, 2**32, (), dtype=torch.int64, generator=torch.Generator().manual_seed(0)))
    assert ref[0] == hi << 32 | lo  # drawn once from numpy's, then torch's global generator
    assert run(0) == ref and run(2) == ref  # the same on every run, for any worker count
    assert run(0, seed=1)[0] != ref[0] and run(0, torch_seed=1)[0] != ref[0]  # both generators count
    assert run(0, seed=1)[1] != ref[1]


def test_num_workers_0_leaves_the_training_loops_randomness_to_the_users_seed():
    def draws(cls, seed=3):
        seeded_globally(seed)
        loader = TaskLoader(cls(TASK_DATA, 1, 5, 10), batch_size=4, shuffle=True, n_batches=3, seed=0)
        out = []
        for _ in loader:
            mask = torch.nn.functional.dropout(torch.ones(8), 0.5)  # the loop's own randomness
            out.append((mask.tolist(), torch.rand(()).item(), np.random.rand(), random.random()))
        return out

    # A legacy TaskSet draws from the global generators inside each batch; the loop around it sees exactly
    # what it sees next to a keyed TaskSet, which touches no global generator (DataLoader itself draws
    # one number from torch's per epoch, for both).
    ref = draws(KeyedTaskSet)
    assert draws(MyTaskSet) == ref
    assert draws(MyTaskSet, seed=4) != ref


def test_eval_options_are_checked_per_batch():
    taskset = readme_set(predict_full_target_during_eval=True)  # fine while eval is False
    loader = TaskLoader(taskset, batch_size=4, seed=0)
    taskset.eval = True  # 0.9.1 code switches modes on the dataset
    with pytest.raises(ValueError, match=r"predict_full_target_during_eval \(eval=True\) need total_tgt_pts"):
        list(loader)
    short = readme_set(total_tgt_pts=3, predict_full_target_during_eval=True)
    short.eval = True
    with pytest.raises(ValueError, match="no target point is left"):
        list(TaskLoader(short, batch_size=4, shuffle=True, n_batches=40, seed=0))


@pytest.mark.parametrize("args, name", [((1.5, 5, 10), "min_pts"), ((1, "5", 10), "max_ctx_pts"),
                                        ((1, 5, 10, 12.0), "total_tgt_pts")])
def test_taskset_sizes_must_be_ints(args, name):
    with pytest.raises(TypeError, match=f"TaskSet\\(\\): {name} must be an int"):
        MyTaskSet(TASK_DATA, *args)


def test_loader_ints_must_be_ints():
    with pytest.raises(TypeError, match=r"TaskLoader\(\): batch_size must be an int"):
        TaskLoader(readme_set(), batch_size=4.0)
    with pytest.raises(TypeError, match=r"TaskLoader\(\): num_workers must be an int"):
        TaskLoader(readme_set(), num_workers="2")


@pytest.mark.slow
def test_091_neural_process_program_is_reproducible_and_worker_count_independent():
    program = pathlib.Path(__file__).with_name("legacy_neural_process.py")

    def run(*flags):
        out = subprocess.run([sys.executable, str(program), *flags], capture_output=True, text=True,
                             cwd=program.parents[1], timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.splitlines()

    first = run()
    assert len(first) == 2 and all(line.endswith("batches 5") for line in first)
    assert run() == first  # globally seeded, as 0.9.1 scripts are: the same on every run
    assert run("-w", "0") == first  # and for any number of workers
