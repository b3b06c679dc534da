"""metabatch.tasks.mmap_array / MmapArray: memory-mapped arrays that pickle by reference."""

import dataclasses
import mmap
import os
import pickle

import numpy as np
import optree
import pytest
import torch

import metabatch as mb
from metabatch.tasks import MmapArray, mapped, mmap_array

_RNG = np.random.default_rng(0)
DATA = _RNG.integers(0, 256, size=(20, 6, 8, 8), dtype=np.uint8)  # 20 classes x 6 examples of 8x8


@pytest.fixture
def images(tmp_path):
    return mmap_array(tmp_path / "images.npy", DATA)


def test_writes_then_maps_read_only(images, tmp_path):
    assert isinstance(images, MmapArray) and isinstance(images, np.memmap)
    assert np.array_equal(images, DATA) and images.dtype == np.uint8
    assert images.filename == str(tmp_path / "images.npy") and not images.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0, 0] = 1
    assert np.array_equal(np.load(tmp_path / "images.npy"), DATA)  # an ordinary .npy
    assert [p.name for p in tmp_path.iterdir()] == ["images.npy"]  # no temporary left
    again = mmap_array(tmp_path / "images.npy")
    assert np.array_equal(again, DATA)


@pytest.mark.parametrize("view", [
    lambda a: a, lambda a: a[3], lambda a: a[2:9:3, ::-1, 1:], lambda a: a.T, lambda a: a[..., ::-2],
    lambda a: a.view(np.int8), lambda a: a.reshape(120, 64)[5:], lambda a: a[4, 2, 3:4, 5:6],
])
def test_views_pickle_as_references(images, view):
    v = view(images)
    blob = pickle.dumps(v)
    assert len(blob) < 600  # a reference: path, identity, dtype, shape, strides, offset
    for clone in (pickle.loads(blob), pickle.loads(pickle.dumps(v, protocol=5))):
        assert type(clone) is MmapArray and clone.dtype == v.dtype and clone.strides == v.strides
        assert np.array_equal(clone, view(DATA)) and not clone.flags.writeable
        assert np.array_equal(pickle.loads(pickle.dumps(clone)), view(DATA))  # and again


def test_copies_are_plain_arrays_that_pickle_their_values(images):
    for copy in (images[[0, 3]], images[images > 100], images + 1, images.astype(np.float32) / 255):
        assert type(copy) is np.ndarray
    fancy = images[[0, 3]]
    assert type(fancy) is np.ndarray and fancy.flags.writeable
    assert type(images + 1) is np.ndarray and type(images.sum()) is np.uint64
    assert images.max() == DATA.max() and float(images.mean()) == float(DATA.mean())
    cast = images.astype(np.int16)  # numpy keeps the subclass for astype; it pickles its values
    clone = pickle.loads(pickle.dumps(cast))
    assert type(clone) is np.ndarray and np.array_equal(clone, DATA.astype(np.int16))


def test_a_changed_or_deleted_file_is_an_error_not_other_data(images, tmp_path):
    blob = pickle.dumps(images[1:])
    mmap_array(tmp_path / "images.npy", DATA[::-1].copy())  # written again: a new file under the name
    assert np.array_equal(images, DATA)  # the open map still shows what it mapped
    with pytest.raises(OSError, match=r"images.npy changed after the array was opened .*open it again"):
        pickle.loads(blob)
    os.unlink(tmp_path / "images.npy")
    with pytest.raises(FileNotFoundError, match="images.npy is gone"):
        pickle.loads(blob)


def test_inputs_and_errors(tmp_path):
    from_tensor = mmap_array(tmp_path / "t.npy", torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert from_tensor.dtype == np.float32 and from_tensor.tolist() == [[0, 1, 2], [3, 4, 5]]
    fortran = mmap_array(tmp_path / "f.npy", np.asfortranarray(DATA[:, :, 0]))
    assert np.array_equal(pickle.loads(pickle.dumps(fortran[2:])), DATA[2:, :, 0])
    empty = mmap_array(tmp_path / "e.npy", np.zeros((0, 3), np.float32))
    assert empty.shape == (0, 3) and not empty.flags.writeable
    with pytest.raises(FileNotFoundError, match="no file at .*nothing.npy; pass data="):
        mmap_array(tmp_path / "nothing.npy")
    with pytest.raises(TypeError, match="dtype object; only arrays of numbers"):
        mmap_array(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(TypeError, match="numpy array or a CPU tensor, got list"):
        mmap_array(tmp_path / "l.npy", [1, 2, 3])
    np.save(tmp_path / "objects.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects .* only arrays of numbers can be memory-mapped"):
        mmap_array(tmp_path / "objects.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="junk.npy is not a .npy file"):
        mmap_array(tmp_path / "junk.npy")
    np.save(tmp_path / "cut.npy", DATA)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut.npy is truncated"):
        mmap_array(tmp_path / "cut.npy")


def test_classification_over_a_mapped_array_keeps_the_reference(images, key):
    sample = mb.tasks.classification(images, ways=5, rotate=True, info=True)
    assert isinstance(sample.classes, MmapArray)
    blob = pickle.dumps(sample)
    assert len(blob) < 1500 < DATA.nbytes
    plain = mb.tasks.classification(DATA, ways=5, rotate=True, info=True)
    for k in range(5):
        a, b = sample(mb.random.fold_in(key, k), 0, 2, 3), plain(mb.random.fold_in(key, k), 0, 2, 3)
        assert all(np.array_equal(x, y) and x.dtype == y.dtype and type(x) is np.ndarray
                   for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True))


@dataclasses.dataclass(frozen=True)
class Probe:
    """A sample_task that reports whether the array it holds is a live map of the file."""

    array: np.ndarray

    def __call__(self, key, idx, n_ctx, n_tgt):
        mapped = isinstance(self.array, MmapArray) and self.array._mmap is not None
        return {"x": np.asarray(self.array[idx % len(self.array), :n_ctx + n_tgt], np.float32),
                "mapped": np.array(mapped), "pid": np.array(os.getpid())}


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_loader_workers_map_the_file_under_every_start_method(images, method):
    specs = mb.batch_specs(seed=0, num_tasks=len(DATA), batch_size=4, n_ctx=1, n_tgt=2, num_batches=4)
    sample = mb.tasks.classification(images, ways=5, rotate=True)
    ref = list(mb.task_loader(sample, specs))
    got = list(mb.task_loader(sample, specs, num_workers=2, multiprocessing_context=method))
    for a, b in zip(ref, got, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True))
    probes = list(mb.task_loader(Probe(images), specs, num_workers=2, multiprocessing_context=method))
    assert all(bool(p["mapped"].all()) for p in probes)
    assert {int(pid) for p in probes for pid in p["pid"]} - {os.getpid()}  # built in the workers


# ----------------------------------------------------------------------------------------------------
# Bounded footprint: what indexing maps of the file is released (madvise DONTNEED) past release_every.


MiB = 2**20
BIG = (64, 16, 256, 256)  # 64 classes x 16 examples of 64 KiB: 64 MiB on disk


def mapped_kb(path) -> int:
    """KiB of `path` mapped into this process (Rss of its mappings in /proc/self/smaps)."""
    total, inside, name = 0, False, str(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ... path"
                inside = line.rstrip("\n").endswith(" " + name)
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


needs_smaps = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"),
                                 reason="needs /proc/self/smaps (Linux) to read what a process has mapped")
needs_release = pytest.mark.skipif(not mapped.CAN_RELEASE,
                                   reason="mappings are released with madvise(MADV_DONTNEED) on Linux only")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A 64 MiB .npy whose example (c, k) holds the value (c * 16 + k) % 251 everywhere."""
    path = tmp_path_factory.mktemp("big") / "big.npy"
    values = (np.arange(BIG[0] * BIG[1]) % 251).astype(np.uint8).reshape(BIG[:2] + (1, 1))
    mmap_array(path, np.broadcast_to(values, BIG).copy())
    return path


def touch_everything(images) -> int:
    """Read every example through indexing (copies and views, as tasks do); the sum of what was read."""
    total = 0
    for c in range(BIG[0]):
        total += int(images[[c], [0, 5, 9, 13]].sum(dtype=np.int64))                   # a gather: a copy
        total += int(np.asarray(images[c, 1:5]).sum(dtype=np.int64))                   # a view, read at once
        rest = [k for k in range(BIG[1]) if k not in (0, 1, 2, 3, 4, 5, 9, 13)]
        total += int(sum(images[c, k].sum(dtype=np.int64) for k in rest))
    return total


EXPECTED_SUM = int(((np.arange(BIG[0] * BIG[1]) % 251) * (BIG[2] * BIG[3])).sum())


@needs_smaps
@needs_release
@pytest.mark.parametrize("every", [8 * MiB, 20 * MiB])
def test_indexing_keeps_what_a_process_maps_of_the_file_below_release_every(big_file, every):
    images = mmap_array(big_file, release_every=every)
    assert touch_everything(images) == EXPECTED_SUM
    # one call charges at most 2 granules per 64 KiB block; 5 blocks (the widest call): 10 granules
    slack = 10 * mapped._GRANULE
    assert mapped_kb(big_file) * 1024 <= every + slack < BIG[0] * BIG[1] * BIG[2] * BIG[3]
    assert images._pager.releases >= (64 * MiB) // (every + slack)
    kept = mmap_array(big_file, release_every=None)  # never released: the whole file stays mapped
    assert touch_everything(kept) == EXPECTED_SUM and kept._pager.releases == 0
    assert mapped_kb(big_file) * 1024 >= 64 * MiB
    del kept
    assert mapped_kb(big_file) * 1024 <= every + slack


@needs_release
def test_views_and_data_stay_valid_after_a_release(big_file):
    images = mmap_array(big_file, release_every=4 * MiB)
    view, row = images[7, 2:4], images[63]
    expected = (7 * 16 + 2) % 251
    assert int(view[0, 0, 0]) == expected
    before = images._pager.releases
    images._pager.release()
    assert images._pager.pending == 0 and images._pager.releases == before + 1
    assert np.all(np.asarray(view[0]) == expected) and np.all(np.asarray(view[1]) == expected + 1)
    assert np.all(row[15] == (63 * 16 + 15) % 251)
    clone = pickle.loads(pickle.dumps(view))  # a release changes nothing about the reference
    assert np.array_equal(clone, view) and clone._pager.every == 4 * MiB


def test_release_every_travels_with_views_and_pickles(images, tmp_path):
    assert images._pager.every == mapped.RELEASE_EVERY == 64 * MiB
    small = mmap_array(tmp_path / "images.npy", release_every=3 * MiB)
    for v in (small[2:], small[1, ::2], small.T):
        assert v._pager is small._pager
        assert pickle.loads(pickle.dumps(v))._pager.every == 3 * MiB
    never = mmap_array(tmp_path / "images.npy", release_every=None)
    assert pickle.loads(pickle.dumps(never[1:]))._pager.every is None
    assert pickle.loads(pickle.dumps(never[1:]))._pager.on is False
    with pytest.raises(ValueError, match=r"mmap_array\(\): release_every must be >= 0, got -1"):
        mmap_array(tmp_path / "images.npy", release_every=-1)
    with pytest.raises(TypeError, match=r"mmap_array\(\): release_every must be an int, got 1.5"):
        mmap_array(tmp_path / "images.npy", release_every=1.5)
    with pytest.raises(TypeError, match=r"release_every must be an int, got True"):
        mmap_array(tmp_path / "images.npy", release_every=True)


def test_charges_count_granules_views_before_and_copies_after(monkeypatch):
    monkeypatch.setattr(mapped, "_GRANULE", 4096)
    # [5, 16] gathered examples of 3x84x84 bytes: 80 blocks of 21168 bytes, each spanning <= 6 + 1 pages
    assert mapped._pages((5, 16, 3, 84, 84), (None, None, 7056, 84, 1), 1) == 80 * 7 * 4096
    assert mapped._pages((16, 3, 84, 84), (21168, 7056, 84, 1), 1) == (83 + 1) * 4096  # one contiguous block
    assert mapped._pages((4, 3), (24, 8), 8) == 1 * 2 * 4096  # 96 contiguous bytes: one block
    assert mapped._pages((4, 3), (48, 8), 8) == 4 * 2 * 4096  # every other row of 3 float64: 4 blocks
    assert mapped._pages((0, 3), (24, 8), 8) == 0

    class FakeMap:
        closed = False
        calls = 0

        def __len__(self):
            return 100 * 4096

        def madvise(self, option):
            assert option == mmap.MADV_DONTNEED
            FakeMap.calls += 1

    monkeypatch.setattr(mapped, "CAN_RELEASE", True)
    pager = mapped._Pager(FakeMap(), 10 * 4096)
    pager.charge(6 * 4096, read=True)
    assert (pager.pending, FakeMap.calls) == (6 * 4096, 0)
    pager.charge(5 * 4096, read=True)  # read: past every -> released after
    assert (pager.pending, FakeMap.calls, pager.releases) == (0, 1, 1)
    pager.charge(6 * 4096, read=False)
    pager.charge(5 * 4096, read=False)  # a view to be read: released first, its pages stay counted
    assert (pager.pending, FakeMap.calls) == (5 * 4096, 2)
    pager.charge(10**9, read=True)      # capped at the mapping's size
    assert (pager.pending, FakeMap.calls) == (0, 3)
    whole = mapped._Pager(FakeMap(), 100 * 4096)  # nothing maps more than the file: never released
    for _ in range(50):
        whole.charge(7 * 4096, read=True)
        whole.charge(7 * 4096, read=False)
    assert (whole.pending, whole.releases, FakeMap.calls) == (100 * 4096, 0, 3)


def test_no_release_where_the_platform_cannot(monkeypatch, tmp_path):
    monkeypatch.setattr(mapped, "CAN_RELEASE", False)  # macOS, Windows: map as usual, count nothing
    images = mmap_array(tmp_path / "x.npy", DATA, release_every=0)
    assert not images._pager.on and images._pager.every == 0
    assert np.array_equal(images[[1, 2]], DATA[[1, 2]]) and images._pager.releases == 0

    class Refusing:
        closed = False

        def __len__(self):
            return 4096

        def madvise(self, option):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mapped, "CAN_RELEASE", True)
    pager = mapped._Pager(Refusing(), 0)
    pager.charge(4096, read=True)  # refused: turned off, no error
    assert not pager.on and pager.releases == 0 and pager.every == 0


@dataclasses.dataclass(frozen=True)
class MappedProbe:
    """A sample_task that reads 8 examples of a class and says how much of the file its process has mapped."""

    array: np.ndarray

    def __call__(self, key, idx, n_ctx, n_tgt):
        x = self.array[[idx % BIG[0]], [0, 5, 9, 13]]      # a gather (a copy)
        y = np.asarray(self.array[idx % BIG[0], 1:5])       # a view, read at once
        return {"sum": np.array(int(x.sum(dtype=np.int64)) + int(y.sum(dtype=np.int64))),
                "pid": np.array(os.getpid()),
                "mapped_kb": np.array(mapped_kb(self.array.filename))}


@needs_smaps
@needs_release
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_loader_workers_release_what_they_map(big_file, method):
    every = 8 * MiB
    specs = mb.batch_specs(seed=0, num_tasks=BIG[0], batch_size=8, n_ctx=1, n_tgt=1, num_batches=16)
    got = list(mb.task_loader(MappedProbe(mmap_array(big_file, release_every=every)), specs, num_workers=1,
                              multiprocessing_context=method))
    assert {int(p) for b in got for p in b["pid"]} != {os.getpid()}
    assert int(max(b["mapped_kb"].max() for b in got)) * 1024 <= every + 4 * 2 * mapped._GRANULE
    kept = list(mb.task_loader(MappedProbe(mmap_array(big_file, release_every=None)), specs, num_workers=1,
                               multiprocessing_context=method))
    assert int(kept[-1]["mapped_kb"].max()) * 1024 > every + 4 * 2 * mapped._GRANULE  # the test can fail
    assert all(torch.equal(a["sum"], b["sum"]) for a, b in zip(got, kept, strict=True))

