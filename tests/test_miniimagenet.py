import pickle
import stat
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import optree
import pytest
import torch

import metabatch as mb
from metabatch.tasks import miniimagenet

Image = pytest.importorskip("PIL.Image", reason="Pillow (the omniglot extra) is not installed")

# Class labels in csv order, deliberately not sorted: the csv order is the class order.
CLASSES = ("n03400231", "n01532829", "n02110063")
PER_CLASS = 4
SIZES = [(100, 90), (84, 84), (120, 96), (64, 80)]  # (width, height) of image i of each class


# -- synthetic mini-ImageNet in the Ravi & Larochelle layout ------------------------------------------

def pixels(c: int, i: int) -> np.ndarray:
    """A smooth RGB picture (JPEG keeps it well) that tells class ``c`` and image ``i`` apart."""
    w, h = SIZES[i]
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([40 * c + xx * 100 // w, 60 * i + yy * 100 // h, np.full_like(xx, 30 * (c + i))], -1)
    return rgb.astype(np.uint8)


def name(c: int, i: int) -> str:
    return f"{CLASSES[c]}{i + 1:08d}.jpg"


def write_csv(path: Path, rows) -> None:
    path.write_text("filename,label\n" + "".join(f"{f},{label}\n" for f, label in rows))


def make_split(root: Path, split: str = "train", classes=CLASSES) -> list:
    """``root/images/*.jpg`` + ``root/<split>.csv``; returns the image paths, class by class."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for c in range(len(classes)):
        for i in range(PER_CLASS):
            path = root / "images" / name(c, i)
            Image.fromarray(pixels(c, i)).save(path, quality=95)
            rows.append((path.name, CLASSES[c]))
            paths.append(path)
    write_csv(root / f"{split}.csv", rows)
    return paths


def reference(path: Path, size, resample=Image.BILINEAR) -> np.ndarray:
    """What MAML-Pytorch feeds its net, before ToTensor: RGB, Resize((size, size)), channels first."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), resample)
        return np.asarray(im).transpose(2, 0, 1)


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test gets its own user cache folder: nothing lands in ~/.cache."""
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("METABATCH_CACHE", str(folder))
    return folder


def entry(user_cache: Path, tag: str) -> tuple:
    """The ``.npy`` and ``.json`` of the one cache entry whose name ends with ``tag``."""
    (npy,) = (user_cache / "miniimagenet").glob(f"*.{tag}.npy")
    return npy, npy.with_suffix(".json")


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "miniimagenet"
    paths = make_split(root)
    return root, paths


def listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- load ---------------------------------------------------------------------------------------------

def test_load_shapes_dtype_order_and_pixels(data_root):
    root, paths = data_root
    data = miniimagenet.load(root, "train", cache=False)
    assert isinstance(data, miniimagenet.MiniImagenet)
    assert data.images.shape == (3, PER_CLASS, 3, 84, 84) and data.images.dtype == np.uint8
    assert data.classes == CLASSES  # csv order, not sorted
    want = np.stack([reference(p, 84) for p in paths]).reshape(data.images.shape)
    assert np.array_equal(data.images, want)
    assert listing(root) == sorted(["images", "train.csv"] + [f"images/{p.name}" for p in paths])


def test_class_order_is_first_appearance_and_images_keep_csv_order(data_root):
    root, paths = data_root
    by_class = [paths[c * PER_CLASS:(c + 1) * PER_CLASS] for c in range(3)]
    rows = []  # interleaved rows, images of class 2 listed backwards
    for i in range(PER_CLASS):
        rows += [(by_class[2][PER_CLASS - 1 - i].name, CLASSES[2]), (by_class[0][i].name, CLASSES[0]),
                 (by_class[1][i].name, CLASSES[1])]
    write_csv(root / "val.csv", rows)
    data = miniimagenet.load(root, "val", size=16, cache=False)
    assert data.classes == (CLASSES[2], CLASSES[0], CLASSES[1])
    assert np.array_equal(data.images[0, 0], reference(by_class[2][-1], 16))
    assert np.array_equal(data.images[1, 3], reference(by_class[0][3], 16))


def test_resize_and_resample(data_root):
    root, paths = data_root
    small = miniimagenet.load(root, "train", size=21, cache=False).images
    assert small.shape == (3, PER_CLASS, 3, 21, 21)
    assert np.array_equal(small[2, 0], reference(paths[2 * PER_CLASS], 21))
    nearest = miniimagenet.load(root, "train", size=21, resample="nearest", cache=False).images
    assert np.array_equal(nearest[1, 2], reference(paths[PER_CLASS + 2], 21, Image.NEAREST))
    assert not np.array_equal(nearest, small)
    with pytest.raises(ValueError, match="resample must be one of"):
        miniimagenet.load(root, "train", resample="antialias", cache=False)
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        miniimagenet.load(root, "train", size=0, cache=False)
    with pytest.raises(TypeError, match="size must be an int or None"):
        miniimagenet.load(root, "train", size=84.0, cache=False)


def test_size_none_keeps_the_stored_size(tmp_path):
    root = tmp_path / "same"
    (root / "images").mkdir(parents=True)
    rows = []
    for c in range(2):
        for i in range(2):
            Image.fromarray(np.full((10, 12, 3), 50 * c + 20 * i, np.uint8)).save(root / "images" / name(c, i))
            rows.append((name(c, i), CLASSES[c]))
    write_csv(root / "test.csv", rows)
    data = miniimagenet.load(root, "test", size=None, cache=False)
    assert data.images.shape == (2, 2, 3, 10, 12)
    assert data.images[1, 1].min() == data.images[1, 1].max() == 70  # a flat colour survives JPEG
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / name(1, 1))
    with pytest.raises(ValueError, match=r"is 8x8 but earlier images are 12x10; pass size="):
        miniimagenet.load(root, "test", size=None, cache=False)


def test_grayscale_and_cmyk_images_become_rgb(data_root):
    root, paths = data_root
    Image.fromarray(np.full((50, 60), 77, np.uint8)).save(paths[0])  # an "L" JPEG, as some ImageNet files
    Image.fromarray(pixels(0, 1)).convert("CMYK").save(paths[1])
    data = miniimagenet.load(root, "train", cache=False)
    assert np.array_equal(data.images[0, 0], np.full((3, 84, 84), 77, np.uint8))
    assert np.array_equal(data.images[0, 1], reference(paths[1], 84))


# -- the cache ----------------------------------------------------------------------------------------

def test_cache_round_trip_in_the_user_cache_folder(data_root, user_cache, monkeypatch):
    root, _ = data_root
    before = listing(root)
    first = miniimagenet.load(root, "train")
    assert listing(root) == before  # nothing next to the data
    npy, meta = entry(user_cache, "train.84px-bilinear")
    assert npy.name.startswith("miniimagenet-") and meta.exists()
    assert isinstance(first.images, mb.tasks.MmapArray) and Path(first.images.filename) == npy
    cached = np.load(npy)
    assert cached.dtype == np.uint8 and np.array_equal(cached, first.images)
    assert np.array_equal(first.images, miniimagenet.load(root, "train", cache=False).images)

    def no_decoding(*args):
        raise AssertionError("decoded an image although the cache was valid")

    monkeypatch.setattr(miniimagenet, "_decode", no_decoding)
    again = miniimagenet.load(root, "train")
    assert np.array_equal(first.images, again.images) and again.classes == CLASSES
    with pytest.raises(AssertionError, match="decoded"):  # another size is another cache
        miniimagenet.load(root, "train", size=32)
    write_csv(root / "val.csv", [(name(0, i), CLASSES[0]) for i in range(PER_CLASS)])
    with pytest.raises(AssertionError, match="decoded"):  # another split is another cache
        miniimagenet.load(root, "val")


@pytest.mark.parametrize("damage", ["truncated npy", "missing npy", "garbage json", "wrong shape",
                                    "other size", "other filter"])
def test_half_written_damaged_or_mismatched_cache_is_rebuilt(data_root, user_cache, damage):
    root, _ = data_root
    good = miniimagenet.load(root, "train", size=16)
    good_images = np.array(good.images)
    npy, meta = entry(user_cache, "train.16px-bilinear")
    del good
    if damage == "truncated npy":
        npy.write_bytes(npy.read_bytes()[:200])
    elif damage == "missing npy":
        npy.unlink()
    elif damage == "garbage json":
        meta.write_text('{"format": 1, "finger')
    elif damage == "wrong shape":  # a whole, valid .npy of another array, beside the json of this one
        np.save(npy, good_images[:2])
    else:  # the entry of another request copied over this one's names
        if damage == "other size":
            miniimagenet.load(root, "train", size=12)
        else:
            miniimagenet.load(root, "train", size=16, resample="nearest")
        tag = "train.12px-bilinear" if damage == "other size" else "train.16px-nearest"
        for src, dst in zip(entry(user_cache, tag), (npy, meta), strict=True):
            dst.write_bytes(src.read_bytes())
        assert not np.array_equal(np.load(npy), good_images) or damage == "other filter"
    again = miniimagenet.load(root, "train", size=16)
    assert np.array_equal(again.images, good_images) and again.classes == CLASSES
    assert np.array_equal(np.load(npy), good_images)  # and the cache is whole again


def test_cache_is_rebuilt_when_an_image_changes(data_root):
    root, paths = data_root
    before = np.array(miniimagenet.load(root, "train", size=16).images)
    Image.fromarray(pixels(2, 0)[::-1]).save(paths[5])
    after = miniimagenet.load(root, "train", size=16)
    assert np.array_equal(after.images[1, 1], reference(paths[5], 16))
    assert not np.array_equal(before[1, 1], after.images[1, 1])


def test_an_old_cache_next_to_the_csv_files_is_read_and_its_leftovers_cleaned(data_root, tmp_path, user_cache,
                                                                               monkeypatch):
    root, _ = data_root
    made = miniimagenet.load(root, "train", size=16, cache_dir=tmp_path / "made")
    for p in Path(made.images.filename).parent.iterdir():  # what metabatch < 0.10 left beside the csv files
        if not p.name.startswith("."):
            (root / ("train.16px-bilinear" + p.suffix)).write_bytes(p.read_bytes())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    crashed = root / f".train.16px-bilinear.npy.{int(dead.stdout)}.tmp"  # a crashed old writer's leftovers
    crashed.write_bytes(b"x" * 1000)
    monkeypatch.setattr(miniimagenet, "_decode", lambda *a: pytest.fail("decoded although the old cache is valid"))
    data = miniimagenet.load(root, "train", size=16)
    assert Path(data.images.filename) == root / "train.16px-bilinear.npy"
    assert not crashed.exists() and not (user_cache / "miniimagenet").exists()


def test_the_cache_build_streams_a_chunk_at_a_time(tmp_path, monkeypatch):
    # 600 images: 12.7 MB decoded at 84x84; a build that held the split would peak above that
    root = tmp_path / "many"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for c in range(6):
        for i in range(100):
            Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(root / "images" / f"{c}_{i}.jpg")
            rows.append((f"{c}_{i}.jpg", f"n{c:08d}"))
    write_csv(root / "train.csv", rows)
    monkeypatch.setattr(mb.tasks._cache, "CHUNK_BYTES", 512 << 10, raising=False)
    tracemalloc.start()
    try:
        data = miniimagenet.load(root, "train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.images.shape == (6, 100, 3, 84, 84) and data.images.nbytes == 12_700_800
    assert peak < data.images.nbytes / 3, peak
    assert np.array_equal(data.images, miniimagenet.load(root, "train", cache=False).images)


def test_read_only_data_folder_is_left_alone(data_root, user_cache):
    root, _ = data_root
    before = listing(root)
    mode = root.stat().st_mode
    root.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        first = miniimagenet.load(root, "train", size=16)
        again = miniimagenet.load(root, "train", size=16)
    finally:
        root.chmod(mode)
    assert listing(root) == before
    cached = sorted(p.name for p in (user_cache / "miniimagenet").iterdir() if not p.name.startswith("."))
    assert len(cached) == 2 and cached[0].startswith("miniimagenet-") and cached[0].endswith(
        ".train.16px-bilinear.json")
    assert np.array_equal(first.images, again.images)


def test_cache_dir_and_no_cache(data_root, tmp_path):
    root, _ = data_root
    before = listing(root)
    miniimagenet.load(root, "train", size=8, cache=False)
    miniimagenet.load(root, "train", size=8, cache_dir=tmp_path / "mine")
    assert listing(root) == before
    assert len(list((tmp_path / "mine").glob("*.train.8px-bilinear.npy"))) == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="could not write the mini-ImageNet cache into cache_dir"):
        miniimagenet.load(root, "train", size=8, cache_dir=blocker)


def test_pillow_is_needed_only_to_decode(data_root, tmp_path, monkeypatch):
    root, _ = data_root
    cached = miniimagenet.load(root, "train", size=8, cache_dir=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow.*pip install pillow"):
        miniimagenet.load(root, "train", size=8, cache=False)
    again = miniimagenet.load(root, "train", size=8, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.images, cached.images)


# -- errors ---------------------------------------------------------------------------------------------

def test_missing_folder_csv_and_image(data_root, tmp_path):
    root, paths = data_root
    with pytest.raises(FileNotFoundError, match="no mini-ImageNet folder at .*nowhere"):
        miniimagenet.load(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=r"no test.csv in .* \(it has train.csv\); .*Ravi & Larochelle"):
        miniimagenet.load(root, "test")
    with pytest.raises(TypeError, match="split must be the name of a csv file"):
        miniimagenet.load(root, "train.csv/..")
    paths[6].unlink()
    with pytest.raises(FileNotFoundError, match=f"lists {paths[6].name}, but .*{paths[6].name} does not "
                                                 r"exist \(1 of the 12 listed images are missing\)"):
        miniimagenet.load(root, "train", cache=False)
    with pytest.raises(FileNotFoundError, match=f"lists {paths[6].name}"):  # with the cache on too
        miniimagenet.load(root, "train")


def test_malformed_csv(data_root):
    root, paths = data_root
    (root / "val.csv").write_text("image,class\nx.jpg,n01\n")
    with pytest.raises(ValueError, match="must start with the header 'filename,label'.*'image', 'class'"):
        miniimagenet.load(root, "val", cache=False)
    (root / "val.csv").write_text("filename,label\nx.jpg,n01,extra\n")
    with pytest.raises(ValueError, match="row 2: expected 'filename,label', got 'x.jpg,n01,extra'"):
        miniimagenet.load(root, "val", cache=False)
    (root / "val.csv").write_text("filename,label\n")
    with pytest.raises(ValueError, match="lists no images"):
        miniimagenet.load(root, "val", cache=False)
    write_csv(root / "val.csv", [(paths[0].name, CLASSES[0]), (paths[1].name, CLASSES[0]),
                                 (paths[0].name, CLASSES[0])])
    with pytest.raises(ValueError, match=f"{paths[0].name} is listed twice \\(rows 2 and 4\\)"):
        miniimagenet.load(root, "val", cache=False)


def test_classes_with_different_image_counts_are_named(data_root):
    root, paths = data_root
    rows = [(p.name, CLASSES[k // PER_CLASS]) for k, p in enumerate(paths)]
    del rows[5]  # class 1 has 3 images, the others 4
    write_csv(root / "train.csv", rows)
    with pytest.raises(ValueError, match=f"most have 4 and {CLASSES[1]} has 3; .*these 1 class"):
        miniimagenet.load(root, "train")


def test_unreadable_image_is_named(data_root):
    root, paths = data_root
    paths[3].write_bytes(b"this is no JPEG")
    with pytest.raises(ValueError, match=f"cannot read the image .*{paths[3].name} .*valid JPEG"):
        miniimagenet.load(root, "train", cache=False)
    paths[3].write_bytes(paths[4].read_bytes()[:300])  # truncated: the header parses, the data does not
    with pytest.raises(ValueError, match=f"cannot read the image .*{paths[3].name}"):
        miniimagenet.load(root, "train")
    assert not list(root.glob("*px-*"))  # no cache of a failed read


# -- tasks ----------------------------------------------------------------------------------------------

@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 5, 3, 8, 8), dtype=np.uint8)


def test_sampler_is_classification_then_imagenet_normalisation(images):
    key = mb.random.key(3)
    task = miniimagenet.sampler(images, ways=3, info=True)(key, 0, 2, 3)
    plain = mb.tasks.classification(images, ways=3, info=True)(key, 0, 2, 3)
    mean = np.array(miniimagenet.MEAN, np.float32)[:, None, None]
    std = np.array(miniimagenet.STD, np.float32)[:, None, None]
    for part, rows in (("context", 6), ("target", 9)):
        x, y = task[part]
        assert x.shape == (rows, 3, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
        assert y.tolist() == np.repeat(np.arange(3), rows // 3).tolist()
        assert np.array_equal(x, (plain[part][0] - mean) / std)
    assert np.array_equal(task["info"]["classes"], plain["info"]["classes"])
    # the support image of label 0 is one of the images of the class drawn first
    first = images[task["info"]["classes"][0]].astype(np.float32) / 255
    assert any(np.array_equal(task["context"][0][0], (im - mean) / std) for im in first)
    unnormalised = miniimagenet.sampler(images, ways=3, normalize=False)(key, 0, 2, 3)
    assert np.array_equal(unnormalised["target"][0], plain["target"][0])
    custom = miniimagenet.sampler(images, ways=3, normalize=((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))(key, 0, 2, 3)
    assert np.array_equal(custom["target"][0][:, 2], plain["target"][0][:, 2] - np.float32(0.5))
    assert np.array_equal(custom["target"][0][:, 0], (plain["target"][0][:, 0] - np.float32(0.5)) * 4)


def test_sampler_keys_and_inputs(images):
    sample_task = miniimagenet.sampler(miniimagenet.MiniImagenet(images, tuple("abcdef")), ways=2)
    a, b = sample_task(mb.random.key(0), 0, 1, 1), sample_task(mb.random.key(0), 0, 1, 1)
    c = sample_task(mb.random.key(1), 0, 1, 1)
    assert all(np.array_equal(u, v) for u, v in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True))
    assert not np.array_equal(a["target"][0], c["target"][0])
    copy = images.copy()
    sample_task(mb.random.key(2), 0, 2, 2)
    assert np.array_equal(images, copy)  # the class array is never written
    clone = pickle.loads(pickle.dumps(sample_task))
    assert np.array_equal(clone(mb.random.key(0), 0, 1, 1)["target"][0], a["target"][0])


def test_sampler_errors(images):
    with pytest.raises(TypeError, match="uint8 array .*got a float32 array.*classification"):
        miniimagenet.sampler(images.astype(np.float32), ways=2)
    with pytest.raises(TypeError, match="got list"):
        miniimagenet.sampler([1, 2], ways=2)
    with pytest.raises(ValueError, match=r"shape \[num_classes, images_per_class, C, H, W\], got \(6, 5, 8, 8\)"):
        miniimagenet.sampler(images[:, :, 0], ways=2)
    with pytest.raises(ValueError, match=r"ways=7 must lie in \[1, num_classes=6\]"):
        miniimagenet.sampler(images, ways=7)
    with pytest.raises(ValueError, match="mean must be 3 finite numbers"):
        miniimagenet.sampler(images, ways=2, normalize=((0.5, 0.5), (1, 1, 1)))
    with pytest.raises(ValueError, match=r"mean must be 1 finite numbers .*got \(0.485, 0.456, 0.406\); pass "
                                         r"normalize=\(mean, std\) with 1 values each, or normalize=False"):
        miniimagenet.sampler(images[:, :, :1], ways=2)  # one channel: ImageNet's statistics do not fit
    with pytest.raises(ValueError, match="std must not contain 0"):
        miniimagenet.sampler(images, ways=2, normalize=((0.5,) * 3, (1, 0, 1)))
    with pytest.raises(TypeError, match="normalize must be True"):
        miniimagenet.sampler(images, ways=2, normalize="imagenet")
    with pytest.raises(ValueError, match="but each class has only 5"):
        miniimagenet.sampler(images, ways=2)(mb.random.key(0), 0, 1, 5)


def test_tasks_from_a_loaded_split_through_workers(data_root):
    root, _ = data_root
    data = miniimagenet.load(root, "train", size=84)
    sample_task = miniimagenet.sampler(data, ways=3)
    specs = mb.batch_specs(seed=0, num_tasks=len(data.classes), batch_size=2, n_ctx=1, n_tgt=3, num_batches=2)
    ref = list(mb.task_loader(sample_task, specs))
    got = list(mb.task_loader(sample_task, specs, num_workers=2))
    (xc, yc), (xt, yt) = got[0]["context"], got[0]["target"]
    assert xc.shape == (2, 3, 3, 84, 84) and xt.shape == (2, 9, 3, 84, 84)
    assert xc.dtype == torch.float32 and yc.tolist() == [[0, 1, 2]] * 2
    assert yt.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2
    for a, b in zip(ref, got, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True))
