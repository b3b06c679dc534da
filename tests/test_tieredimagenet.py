"""metabatch.tasks.tieredimagenet on synthetic sets written here, in both layouts; the cache's streaming."""

import io
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import optree
import pytest
import torch

import metabatch as mb
from metabatch.tasks import _cache, tieredimagenet

from .test_examples import run_example

Image = pytest.importorskip("PIL.Image", reason="Pillow (the omniglot extra) is not installed")

# Classes of different sizes, as in tiered-ImageNet (732 to 1300 images there), in two categories.
CLASSES = ("n01530575", "n01531178", "n01532829", "n01534433")
COUNTS = (5, 3, 4, 6)
CATEGORIES = ("bird", "bird", "dog", "bird")
SIDE = 12


def picture(c: int, i: int) -> np.ndarray:
    """An RGB ``[SIDE, SIDE, 3]`` picture that tells class ``c`` and image ``i`` apart."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    return np.stack([40 * c + 3 * xx, 20 * i + 5 * yy, np.full_like(xx, 60 + 7 * (c + i))], -1).astype(np.uint8)


def expected(size=None) -> np.ndarray:
    """The images as the reader must return them: RGB, channels first, in class order."""
    images = []
    for c, n in enumerate(COUNTS):
        for i in range(n):
            im = Image.fromarray(picture(c, i))
            if size is not None:
                im = im.resize((size, size), Image.BILINEAR)
            images.append(np.asarray(im).transpose(2, 0, 1))
    return np.stack(images)


LABELS = np.repeat(np.arange(len(COUNTS)), COUNTS)


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def write_folders(root: Path, split: str = "train") -> Path:
    """``root/<split>/<wnid>/<wnid>NNNNNNNN.png``, as tiered-imagenet-tools writes them (PNG: lossless)."""
    for c, (wnid, n) in enumerate(zip(CLASSES, COUNTS, strict=True)):
        folder = root / split / wnid
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{wnid}{i + 1:08d}.png").write_bytes(png(picture(c, i)))
    return root


class Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's pickle module did (Ren et al.'s files): str as BINSTRING,
    numpy's functions under numpy.core, protocol 2."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f):
        super().__init__(f, protocol=2)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f).dump(obj)


def write_files(root: Path, split: str = "train", images: str = "png", labels=None) -> Path:
    """Ren et al.'s ``<split>_labels.pkl`` + ``<split>_images_png.pkl`` (or ``_images.npz``, BGR)."""
    root.mkdir(parents=True, exist_ok=True)
    labels = LABELS if labels is None else labels
    general = np.array([CATEGORIES.index(CATEGORIES[c]) for c in labels], np.int32)
    py2_dump({"label_specific": labels.astype(np.int32), "label_general": general,
              "label_specific_str": list(CLASSES), "label_general_str": ["bird", "bird", "dog"]},
             root / f"{split}_labels.pkl")
    rgb = [picture(c, i) for c, n in enumerate(COUNTS) for i in range(n)]
    if images == "png":
        encoded = [np.frombuffer(png(x), np.uint8).copy() for x in rgb]
        py2_dump(encoded, root / f"{split}_images_png.pkl")
    else:
        np.savez(root / f"{split}_images.npz", images=np.stack(rgb)[..., ::-1])  # OpenCV's BGR
    return root


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("METABATCH_CACHE", str(folder))
    return folder


# -- load -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["folders", "png", "npz"])
def test_every_layout_gives_the_same_split(tmp_path, layout, user_cache):
    root = write_folders(tmp_path / "t") if layout == "folders" else write_files(tmp_path / "t", images=layout)
    data = tieredimagenet.load(root, "train", size=None)
    assert isinstance(data.images, mb.tasks.MmapArray) and data.images.shape == (18, 3, SIDE, SIDE)
    assert np.array_equal(data.images, expected()) and data.labels.dtype == np.int64
    assert data.labels.tolist() == LABELS.tolist() and data.classes == CLASSES
    assert data.categories == (None if layout == "folders" else CATEGORIES)
    resized = tieredimagenet.load(root, "train", size=8)
    assert np.array_equal(resized.images, expected(8)) and resized.labels.tolist() == LABELS.tolist()
    assert np.array_equal(tieredimagenet.load(root, "train", size=8, cache=False).images, resized.images)
    assert tieredimagenet.load(root, "train").images.shape == (18, 3, 84, 84)  # size=84 by default
    assert min(p.name for p in (user_cache / "tieredimagenet").glob("*.npy")).startswith("t-")


def test_cache_is_read_without_decoding_and_rebuilt_when_an_image_changes(tmp_path, monkeypatch):
    root = write_folders(tmp_path / "t")
    first = np.array(tieredimagenet.load(root, "train", size=None).images)
    with monkeypatch.context() as m:
        m.setattr(tieredimagenet._common, "rgb", lambda *a: pytest.fail("decoded although the cache is valid"))
        again = tieredimagenet.load(root, "train", size=None)
    assert np.array_equal(again.images, first)
    target = root / "train" / CLASSES[2] / f"{CLASSES[2]}00000002.png"
    target.write_bytes(png(picture(0, 0)))
    os.utime(target, ns=(1, 1))
    after = tieredimagenet.load(root, "train", size=None)
    assert np.array_equal(after.images[9], expected()[0]) and not np.array_equal(after.images[9], first[9])


def test_unsorted_labels_in_the_files(tmp_path):
    order = np.array([3, 0, 2, 1, 0, 3, 3, 2, 1, 0, 2, 3, 3, 0, 1, 2, 3, 0])  # counts 5, 3, 4, 6 again
    root = write_files(tmp_path / "t", labels=order)
    data = tieredimagenet.load(root, "train", size=None)
    assert data.labels.tolist() == order.tolist()  # file order kept; the label of each image
    sample = tieredimagenet.sampler(data, ways=4, normalize=False, info=True)
    task = sample(mb.random.key(0), 0, 1, 2)
    x, y = task["context"]
    for row, label in zip(x, y.tolist(), strict=True):
        cls = task["info"]["classes"][label]
        assert any(np.array_equal(row, data.images[i] / np.float32(255)) for i in np.flatnonzero(order == cls))


def test_sampler_and_loader(tmp_path):
    data = tieredimagenet.load(write_folders(tmp_path / "t"), "train", size=None)
    sample = tieredimagenet.sampler(data, ways=3, info=True)
    plain = mb.tasks.classification(data.images, 3, labels=data.labels, info=True)
    key = mb.random.key(5)
    task, ref = sample(key, 0, 1, 2), plain(key, 0, 1, 2)
    mean = np.array(mb.tasks.miniimagenet.MEAN, np.float32)[:, None, None]
    std = np.array(mb.tasks.miniimagenet.STD, np.float32)[:, None, None]
    assert np.array_equal(task["target"][0], (ref["target"][0] - mean) / std)
    assert np.array_equal(task["info"]["classes"], ref["info"]["classes"])
    specs = mb.batch_specs(seed=0, num_tasks=len(data.classes), batch_size=2, n_ctx=1, n_tgt=2, num_batches=3)
    inline = list(mb.task_loader(sample, specs))
    workers = list(mb.task_loader(sample, specs, num_workers=2))
    for a, b in zip(inline, workers, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True))
    assert inline[0]["context"][0].shape == (2, 3, 3, SIDE, SIDE)
    with pytest.raises(ValueError, match=r"2 \+ 2 = 4 examples per class, but class 1 has only 3"):
        sample(key, 0, 2, 2)
    with pytest.raises(TypeError, match="data must be the TieredImagenet"):
        tieredimagenet.sampler(data.images, ways=2)


# -- pickles: never run, streamed ------------------------------------------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["labels", "images"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, which):
    root = write_files(tmp_path / "t")
    marker = tmp_path / "ran"
    target = root / ("train_labels.pkl" if which == "labels" else "train_images_png.pkl")
    with open(target, "wb") as f:
        pickle.dump([Payload(marker)] if which == "images" else {"label_specific": Payload(marker)}, f, protocol=2)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match=r"asks to load (posix|os|nt)\.system; metabatch reads only "
                                                     r"numpy arrays"):
        tieredimagenet.load(root, "train", size=None)
    assert not marker.exists()


def test_file_faults_are_named(tmp_path):
    root = write_files(tmp_path / "t")
    py2_dump({"label_specific": np.append(LABELS, 3).astype(np.int32), "label_specific_str": list(CLASSES)},
             root / "train_labels.pkl")
    with pytest.raises(ValueError, match="holds 18 images but its labels file has 19 labels"):
        tieredimagenet.load(root, "train", size=None)
    encoded = [np.frombuffer(png(picture(c, i)), np.uint8).copy() for c, n in enumerate(COUNTS) for i in range(n)]
    encoded[7] = encoded[7][:40]  # a truncated PNG
    py2_dump(encoded, root / "train_images_png.pkl")
    write_files(tmp_path / "u")
    (root / "train_labels.pkl").write_bytes((tmp_path / "u" / "train_labels.pkl").read_bytes())
    with pytest.raises(ValueError, match=r"cannot read the image number 7 in .*train_images_png.pkl"):
        tieredimagenet.load(root, "train", size=None)
    with pytest.raises(FileNotFoundError, match=r"no tiered-ImageNet split 'val' .*val_labels.pkl"):
        tieredimagenet.load(root, "val")
    with pytest.raises(FileNotFoundError, match="no tiered-ImageNet folder"):
        tieredimagenet.load(tmp_path / "nowhere", "train")
    npz = write_files(tmp_path / "v", images="npz") / "train_images.npz"
    npz.write_bytes(npz.read_bytes()[:300])
    with pytest.raises(ValueError, match="train_images.npz is not a valid .npz file"):
        tieredimagenet.load(tmp_path / "v", "train")
    (write_folders(tmp_path / "w") / "train" / "n09999999").mkdir()
    with pytest.raises(ValueError, match="n09999999 holds no image"):
        tieredimagenet.load(tmp_path / "w", "train")


def test_the_png_pickle_is_streamed_not_loaded(tmp_path, monkeypatch):
    # 1 500 noise images of 48x48: 10 MB of PNGs, 10 MB decoded; a pickle.load would hold all of it at once
    rng = np.random.default_rng(0)
    n, side = 1500, 48
    root = tmp_path / "big"
    root.mkdir()
    py2_dump({"label_specific": np.repeat(np.arange(15), 100).astype(np.int32),
              "label_specific_str": [f"c{c}" for c in range(15)]}, root / "train_labels.pkl")
    encoded = [np.frombuffer(png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), np.uint8)
               for _ in range(n)]
    py2_dump(encoded, root / "train_images_png.pkl")
    size = (root / "train_images_png.pkl").stat().st_size
    del encoded
    monkeypatch.setattr(_cache, "CHUNK_BYTES", 256 << 10)
    tracemalloc.start()
    try:
        data = tieredimagenet.load(root, "train", size=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.images.shape == (n, 3, side, side) and size > 9_000_000
    assert peak < size / 3, (peak, size)


# -- the example --------------------------------------------------------------------------------------------

def test_example_takes_tiered_imagenet_with_a_flag(tmp_path, capsys):
    root = tmp_path / "tiered"
    for split in ("train", "val", "test"):
        write_folders(root, split)
    threads = torch.get_num_threads()
    try:
        metrics = run_example("maml_miniimagenet.py", "--dataset", "tieredimagenet", "--data", root, "--ways", 3,
                              "--shots", 1, "--query", 2, "--eval-query", 2, "--image-size", 16, "--meta-batch", 2,
                              "--steps", 2, "--inner-steps", 1, "--test-steps", 1, "--val-tasks", 2,
                              "--val-every", 1, "--eval-tasks", 4, "--channels", 4, "--num-workers", 1,
                              "--threads", 1, "--no-progress", "--out", tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "train: 4 classes, 18 images of (3, 16, 16) (tiered-ImageNet, 3-6 per class)" in out
    assert metrics["example"] == "MAML tiered-ImageNet" and metrics["test"]["on"] == "test split (4 classes)"
    assert metrics["test"]["tasks"] == 4 and metrics["steps"] == 2
    with pytest.raises(SystemExit):
        run_example("maml_miniimagenet.py", "--dataset", "tieredimagenet", "--data", tmp_path / "run",
                    "--steps", 1)
    assert "no tiered-ImageNet split 'train'" in capsys.readouterr().err
