"""metabatch.tasks.mmap_array / MmapArray: memory-mapped arrays that pickle by reference."""

import dataclasses
import os
import pickle

import numpy as np
import optree
import pytest
import torch

import metabatch as mb
from metabatch.tasks import MmapArray, mmap_array

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
                   for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))


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
        assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))
    probes = list(mb.task_loader(Probe(images), specs, num_workers=2, multiprocessing_context=method))
    assert all(bool(p["mapped"].all()) for p in probes)
    assert {int(pid) for p in probes for pid in p["pid"]} - {os.getpid()}  # built in the workers
