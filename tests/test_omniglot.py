import hashlib
import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import optree
import pytest
import torch

import metabatch as mb
from metabatch.tasks import omniglot

Image = pytest.importorskip("PIL.Image", reason="Pillow (the omniglot extra) is not installed")

SMALL1, SMALL2 = "images_background_small1.zip", "images_background_small2.zip"


# -- synthetic Omniglot in the official layout ------------------------------------------------------

def ink(c: int, d: int, side: int = 105) -> np.ndarray:
    """The ink mask of class ``c``, drawer ``d``: a bar whose place tells both apart."""
    mask = np.zeros((side, side), bool)
    mask[4 * c:4 * c + 20, 8 * d:8 * d + 30] = True
    return mask


def write_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(~mask).save(path)  # mode "1": paper white, ink black, as in the official files


def make_tree(root: Path, alphabets=(("Greek", 2), ("Latin", 3)), drawers: int = 3) -> list:
    """``root/<alphabet>/characterNN/<id>_<drawer>.png``; returns the ink masks per class."""
    masks, c = [], 0
    for alphabet, n_chars in alphabets:
        for ch in range(1, n_chars + 1):
            for d in range(1, drawers + 1):
                write_png(root / alphabet / f"character{ch:02d}" / f"{c + 1:04d}_{d:02d}.png", ink(c, d))
            masks.append([ink(c, d) for d in range(1, drawers + 1)])
            c += 1
    return masks


def zip_folder(folder: Path, dest: Path, top: str) -> Path:
    """Zip ``folder`` as ``top/...`` with directory entries, like the official zips."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(top + "/", b"")
        for p in sorted(folder.rglob("*")):
            name = f"{top}/{p.relative_to(folder).as_posix()}"
            z.writestr(name + "/", b"") if p.is_dir() else z.write(p, name)
    return dest


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Every test gets its own user cache folder: nothing lands in ~/.cache."""
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("METABATCH_CACHE", str(folder))
    return folder


def entries(folder: Path) -> list:
    """The visible files of a cache folder (the hidden lock files aside)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data" / "images_background"
    masks = make_tree(root)
    zipped = zip_folder(root, tmp_path / "data" / "images_background.zip", "images_background")
    return root, zipped, masks


def listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- load ---------------------------------------------------------------------------------------------

def test_load_folder_and_zip_agree(tree):
    folder, zipped, masks = tree
    a = omniglot.load(folder, size=None, cache=False)
    b = omniglot.load(zipped, size=None, cache=False)
    assert a.images.shape == (5, 3, 105, 105) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a[1:] == b[1:]
    assert a.alphabets == ("Greek", "Greek", "Latin", "Latin", "Latin")
    assert a.characters == ("character01", "character02", "character01", "character02", "character03")
    assert np.array_equal(a.images, np.array(masks, np.uint8) * 255)  # ink 255 on paper 0
    parent = omniglot.load(folder.parent, size=None, cache=False)     # one level above works too
    assert np.array_equal(parent.images, a.images)


def test_resize(tree):
    folder, _, masks = tree
    data = omniglot.load(folder, cache=False)
    assert data.images.shape == (5, 3, 28, 28)
    want = np.asarray(Image.fromarray(masks[1][2].astype(np.uint8) * 255).resize((28, 28), Image.LANCZOS))
    assert np.array_equal(data.images[1, 2], want)
    box = omniglot.load(folder, size=15, resample="box", cache=False).images
    assert box.shape == (5, 3, 15, 15) and box.max() == 255  # a 7x7 box filled with ink
    with pytest.raises(ValueError, match="resample must be one of"):
        omniglot.load(folder, resample="antialias", cache=False)
    with pytest.raises(ValueError, match="size must be >= 1"):
        omniglot.load(folder, size=0, cache=False)
    with pytest.raises(TypeError, match="size must be an int or None"):
        omniglot.load(folder, size=28.0, cache=False)


def test_cache_is_written_then_read_without_decoding(tree, tmp_path, monkeypatch):
    _, zipped, _ = tree
    cache = tmp_path / "cache"
    first = omniglot.load(zipped, cache_dir=cache)
    files = entries(cache)
    assert len(files) == 2 and files[0].endswith(".28px-lanczos.json") and files[1].endswith(".npy")
    assert np.load(cache / files[1]).dtype == np.uint8

    def no_decoding(*args):
        raise AssertionError("decoded a PNG although the cache was valid")

    monkeypatch.setattr(omniglot, "_decode", no_decoding)
    again = omniglot.load(zipped, cache_dir=cache)
    assert np.array_equal(first.images, again.images) and first[1:] == again[1:]
    with pytest.raises(AssertionError, match="decoded"):  # another size is another cache
        omniglot.load(zipped, size=14, cache_dir=cache)


def test_cached_images_are_a_read_only_memory_map_that_pickles_by_reference(tree, tmp_path):
    _, zipped, _ = tree
    data = omniglot.load(zipped, cache_dir=tmp_path / "cache")
    assert isinstance(data.images, np.memmap) and isinstance(data.images, mb.tasks.MmapArray)
    assert not data.images.flags.writeable
    assert Path(data.images.filename).parent == tmp_path / "cache"
    blob = pickle.dumps(mb.tasks.classification(data.images, ways=2))
    assert len(blob) < 2000 < data.images.nbytes   # a reference to the file, not the pixels
    clone = pickle.loads(blob)
    assert isinstance(clone.classes, mb.tasks.MmapArray) and np.array_equal(clone.classes, data.images)
    assert isinstance(omniglot.load(zipped, cache=False).images, np.ndarray)


def test_cache_is_rebuilt_when_the_source_changes(tree, tmp_path):
    folder, zipped, _ = tree
    cache = tmp_path / "cache"
    before = np.array(omniglot.load(zipped, cache_dir=cache).images)
    write_png(folder / "Latin" / "character03" / "0005_01.png", ink(0, 0))
    zip_folder(folder, zipped, "images_background")
    after = omniglot.load(zipped, cache_dir=cache)
    assert not np.array_equal(before[4, 0], after.images[4, 0])
    assert np.array_equal(after.images[4, 0], omniglot.load(zipped, cache=False).images[4, 0])


def test_an_entry_of_another_size_copied_over_the_names_is_rebuilt(tree, tmp_path):
    # the fault matrix: a 20 px pair copied over the 28 px names was returned for size=28
    _, zipped, _ = tree
    cache = tmp_path / "cache"
    omniglot.load(zipped, size=20, cache_dir=cache)
    small = [cache / n for n in entries(cache)]
    big = [p.with_name(p.name.replace("20px", "28px")) for p in small]
    for a, b in zip(small, big, strict=True):
        shutil.copy(a, b)
    data = omniglot.load(zipped, size=28, cache_dir=cache)
    assert data.images.shape == (5, 3, 28, 28)
    assert np.array_equal(data.images, omniglot.load(zipped, size=28, cache=False).images)
    assert json.loads(big[0].read_text())["size"] == 28 and np.load(big[1]).shape == (5, 3, 28, 28)


def test_default_cache_is_the_user_cache_folder_not_the_data_folder(tree, user_cache, monkeypatch, caplog):
    _, zipped, _ = tree
    before = listing(zipped.parent)
    with caplog.at_level(logging.INFO, logger="metabatch.tasks"):
        omniglot.load(zipped)
        omniglot.load(zipped)
    assert listing(zipped.parent) == before  # a writable data folder is left alone
    assert len(entries(user_cache / "omniglot")) == 2
    said = [r.getMessage() for r in caplog.records if "cache lives in" in r.getMessage()]
    assert said == [(f"metabatch.tasks: the Omniglot cache lives in {user_cache / 'omniglot'} (set "
                     f"METABATCH_CACHE or pass cache_dir= to move it)")]  # once
    # without METABATCH_CACHE: $XDG_CACHE_HOME/metabatch, else ~/.cache/metabatch
    monkeypatch.delenv("METABATCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_cache.parent / "xdg"))
    omniglot.load(zipped, size=12)
    assert len(entries(user_cache.parent / "xdg" / "metabatch" / "omniglot")) == 2
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(user_cache.parent / "home"))
    omniglot.load(zipped, size=13)
    assert len(entries(user_cache.parent / "home" / ".cache" / "metabatch" / "omniglot")) == 2
    assert listing(zipped.parent) == before


def test_cache_dir_pointing_at_the_data_folder_writes_there(tree):
    _, zipped, _ = tree
    omniglot.load(zipped, cache_dir=zipped.parent)
    assert len(list(zipped.parent.glob("images_background-*.28px-lanczos.npy"))) == 1


def test_an_old_cache_next_to_the_data_is_still_read_but_never_written(tree, tmp_path, user_cache, monkeypatch):
    _, zipped, _ = tree
    omniglot.load(zipped, cache_dir=tmp_path / "made")
    for p in (tmp_path / "made").iterdir():  # what metabatch < 0.10 left beside the zip
        if not p.name.startswith("."):
            shutil.copy(p, zipped.parent / ("images_background.28px-lanczos" + p.suffix))
    monkeypatch.setattr(omniglot, "_decode", lambda *a: pytest.fail("decoded although the old cache is valid"))
    data = omniglot.load(zipped)
    assert Path(data.images.filename) == zipped.parent / "images_background.28px-lanczos.npy"
    assert entries(user_cache / "omniglot") == []
    monkeypatch.undo()
    monkeypatch.setenv("METABATCH_CACHE", str(user_cache))
    old = zipped.parent / "images_background.28px-lanczos.json"  # stale now: another source
    old.write_text(old.read_text().replace('"fingerprint": "', '"fingerprint": "0'))
    before = listing(zipped.parent)
    data = omniglot.load(zipped)
    assert Path(data.images.filename).parent == user_cache / "omniglot" and listing(zipped.parent) == before


def test_read_only_data_folder_is_left_alone(tree, user_cache):
    _, zipped, _ = tree
    data_dir = zipped.parent
    before = listing(data_dir)
    mode = data_dir.stat().st_mode
    data_dir.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        first = omniglot.load(zipped)
        again = omniglot.load(zipped)
    finally:
        data_dir.chmod(mode)
    assert listing(data_dir) == before
    cached = entries(user_cache / "omniglot")
    assert len(cached) == 2 and cached[0].startswith("images_background-")
    assert np.array_equal(first.images, again.images)


def _sleep_forever():
    time.sleep(600)


def test_stale_temporaries_of_crashed_builds_are_removed_live_ones_kept(tree, tmp_path, monkeypatch):
    _, zipped, _ = tree
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    live = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
    live.start()
    try:
        host = omniglot._cache._host()
        stem = "images_background-0123456789.28px-lanczos"
        files = {
            "dead": cache / f".{stem}.npy.{dead_pid}@{host}.tmp",         # its process is gone
            "dead-old-name": cache / f".{stem}.json.{dead_pid}.tmp",      # metabatch < 0.10's name
            "live": cache / f".{stem}.npy.{live.pid}@{host}.tmp",         # a build in progress
            "elsewhere": cache / f".{stem}.npy.{dead_pid}@another-host.tmp",  # can't tell: recent, kept
            "old": cache / f".{stem}.npy.{live.pid}@another-host.tmp",    # untouched for two days
            "user": cache / "notes.tmp",                                  # not ours
        }
        for path in files.values():
            path.write_bytes(b"x" * 100)
        two_days = time.time() - 2 * 86400
        os.utime(files["old"], (two_days, two_days))
        omniglot.load(zipped, cache_dir=cache)
        left = {k for k, p in files.items() if p.exists()}
        assert left == {"live", "elsewhere", "user"}
    finally:
        live.kill()
        live.join()


def _load_in_child(zipped, cache, barrier, out):
    omniglot._decode.__globals__["_decode"] = _slow(omniglot._decode)
    barrier.wait()
    data = omniglot.load(zipped, cache_dir=cache)
    out.put((data.images._ident, pickle.dumps(data.images), np.asarray(data.images).tobytes()))


def _slow(decode):
    def slowly(*args):
        time.sleep(0.02)
        return decode(*args)
    return slowly


def test_concurrent_builds_share_one_intact_entry(tree, tmp_path):
    _, zipped, _ = tree
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(zipped, cache, barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(entries(cache)) == 2 and not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    final = cache / entries(cache)[1]
    expected = omniglot.load(zipped, cache=False).images.tobytes()
    for ident, blob, pixels in results:
        assert pixels == expected
        assert ident[0] == final.stat().st_ino   # all three map the one entry that stayed...
        assert pickle.loads(blob).tobytes() == expected  # ...so their references open here too


def test_an_unwritable_user_cache_folder_warns_and_loads_into_memory(tree, tmp_path, monkeypatch):
    _, zipped, _ = tree
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("METABATCH_CACHE", str(blocker))
    with pytest.warns(RuntimeWarning, match=f"could not cache .*images_background.zip in {blocker}/omniglot"):
        data = omniglot.load(zipped)
    assert type(data.images) is np.ndarray
    assert np.array_equal(data.images, omniglot.load(zipped, cache=False).images)


def test_cache_dir_must_be_writable(tree, tmp_path):
    _, zipped, _ = tree
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="could not write the Omniglot cache"):
        omniglot.load(zipped, cache_dir=blocker)


def test_no_cache_writes_nothing(tree):
    _, zipped, _ = tree
    before = listing(zipped.parent)
    omniglot.load(zipped, cache=False)
    assert listing(zipped.parent) == before


def test_pillow_is_needed_only_to_decode(tree, tmp_path, monkeypatch):
    _, zipped, _ = tree
    cached = omniglot.load(zipped, cache_dir=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow.*pip install pillow"):
        omniglot.load(zipped, cache=False)
    assert np.array_equal(omniglot.load(zipped, cache_dir=tmp_path / "cache").images, cached.images)


def test_zip_members_with_dot_dot_or_absolute_names_write_nothing_outside_the_cache(tmp_path, user_cache):
    root = tmp_path / "data"
    zipped = root / "evil.zip"
    root.mkdir()
    png = io.BytesIO()
    Image.fromarray(~ink(0, 1)).save(png, format="PNG")
    with zipfile.ZipFile(zipped, "w") as z:
        for i in range(2):
            z.writestr(f"evil/../../Greek/character01/{i}.png", png.getvalue())
            z.writestr(f"/abs/Latin/character01/{i}.png", png.getvalue())
    before = listing(tmp_path)
    data = omniglot.load(zipped)
    assert data.images.shape == (1, 2, 28, 28) and data.alphabets == ("Latin",)  # '..' parts count as hidden
    after = set(listing(tmp_path)) - set(before)
    assert after and all(p.startswith("user-cache") for p in after)


def test_damaged_zip_named_with_the_cache_on(tree, tmp_path):
    _, zipped, _ = tree
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(zipped.read_bytes()[: zipped.stat().st_size // 2])
    for cache in (True, False):  # the cache's fingerprint read the zip first and raised a bare BadZipFile
        with pytest.raises(ValueError, match=f"{truncated} is neither a folder nor a valid zip file.*truncated"):
            omniglot.load(truncated, cache=cache)
    damaged = tmp_path / "damaged.zip"  # a member's bytes flipped: its CRC fails
    raw = bytearray(zipped.read_bytes())
    with zipfile.ZipFile(zipped) as z:
        info = z.getinfo("images_background/Latin/character03/0005_02.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 10] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{damaged}: cannot read the member "
                                         f"images_background/Latin/character03/0005_02.png"):
        omniglot.load(damaged)


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_unreadable_png_names_the_zip_member(tree, tmp_path, damage):
    folder, _, _ = tree
    png = folder / "Greek" / "character02" / "0002_03.png"
    png.write_bytes(b"not a png at all" if damage == "junk" else png.read_bytes()[:60])
    zipped = zip_folder(folder, tmp_path / f"{damage}.zip", "images_background")
    member = "images_background/Greek/character02/0002_03.png"
    with pytest.raises(ValueError, match=f"cannot read the image {member} in {zipped} "
                                         f"\\((UnidentifiedImageError|OSError|SyntaxError)"):
        omniglot.load(zipped)
    with pytest.raises(ValueError, match=f"cannot read the image {png}"):
        omniglot.load(folder, cache=False)
    assert entries(tmp_path / "user-cache" / "omniglot") == []  # no cache of a failed read


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True to fetch it from https://github.com/"):
        omniglot.load(tmp_path / "images_evaluation.zip")
    with pytest.raises(FileNotFoundError, match="no Omniglot zip or folder"):
        omniglot.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no PNG files"):
        omniglot.load(tmp_path / "empty", cache=False)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="neither a folder nor a valid zip"):
        omniglot.load(tmp_path / "bad.zip", cache=False)
    ragged = tmp_path / "ragged"
    make_tree(ragged)
    (ragged / "Latin" / "character02" / "0004_03.png").unlink()
    with pytest.raises(ValueError, match="Latin/character02 has 2 images but most have 3"):
        omniglot.load(ragged, cache=False)


def test_select_and_concat(tree):
    folder, _, _ = tree
    data = omniglot.load(folder, size=8, cache=False)
    latin = omniglot.select(data, ["Latin"])
    assert latin.alphabets == ("Latin",) * 3 and np.array_equal(latin.images, data.images[2:])
    greek = omniglot.select(data, exclude=["Latin", "Klingon"])
    assert greek.characters == ("character01", "character02")
    joined = omniglot.concat(greek, latin)
    assert np.array_equal(joined.images, data.images) and joined[1:] == data[1:]
    with pytest.raises(ValueError, match=r"no alphabet \['Klingon'\]"):
        omniglot.select(data, ["Klingon"])
    with pytest.raises(ValueError, match="no class left"):
        omniglot.select(data, exclude=data.alphabets)
    with pytest.raises(TypeError, match="wrap one name in a list"):
        omniglot.select(data, "Latin")
    with pytest.raises(ValueError, match="appear twice, e.g. Latin/character01"):
        omniglot.concat(data, latin)
    with pytest.raises(ValueError, match="same size="):
        omniglot.concat(data, omniglot.load(folder, size=9, cache=False))


# -- the official subsets ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")  # shared by this module: decode each zip once


def test_background_small1(omniglot_dir, cache_dir):
    before = listing(omniglot_dir)
    data = omniglot.load(omniglot_dir / SMALL1, cache_dir=cache_dir)
    assert data.images.shape == (136, 20, 28, 28) and data.images.dtype == np.uint8
    counts = {a: data.alphabets.count(a) for a in set(data.alphabets)}
    assert counts == {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40, "Latin": 26}
    assert data.characters[:2] == ("character01", "character02")
    assert data.images.max() == 255 and data.images.mean() < 40  # thin ink on empty paper
    assert listing(omniglot_dir) == before


def test_alphabets_of_small2_that_small1_lacks(omniglot_dir, cache_dir):
    small1 = omniglot.load(omniglot_dir / SMALL1, cache_dir=cache_dir)
    small2 = omniglot.load(omniglot_dir / SMALL2, cache_dir=cache_dir)
    assert small2.images.shape == (156, 20, 28, 28)
    held_out = omniglot.select(small2, exclude=small1.alphabets)
    assert len(held_out.images) == 106
    assert set(held_out.alphabets) == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    shared = ["Greek", "Latin"]  # the two subsets hold the very same images of these
    assert np.array_equal(omniglot.select(small1, shared).images, omniglot.select(small2, shared).images)
    with pytest.raises(ValueError, match="appear twice"):
        omniglot.concat(small1, small2)
    assert len(omniglot.concat(small1, held_out).images) == 136 + 106


def test_omniglot_tasks_through_workers(omniglot_dir, cache_dir):
    data = omniglot.load(omniglot_dir / SMALL1, cache_dir=cache_dir)
    sample_task = mb.tasks.classification(data.images, ways=5, rotate=True)
    specs = mb.batch_specs(seed=0, num_tasks=len(data.images), batch_size=8, n_ctx=1, n_tgt=15, num_batches=2)
    ref = list(mb.task_loader(sample_task, specs))
    got = list(mb.task_loader(sample_task, specs, num_workers=2))
    (xc, yc), (xt, _) = got[0]["context"], got[0]["target"]
    assert xc.shape == (8, 5, 1, 28, 28) and xt.shape == (8, 75, 1, 28, 28)
    assert xc.dtype == torch.float32 and yc.dtype == torch.int64 and float(xt.max()) == 1.0
    for a, b in zip(ref, got, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True))


# -- download -----------------------------------------------------------------------------------------

def serve(monkeypatch, files: dict) -> list:
    """Make ``omniglot._urlopen`` serve local files by URL; returns the URLs asked for."""
    asked = []

    def urlopen(url, timeout=None):
        asked.append(url)
        return io.BytesIO(Path(files[url]).read_bytes())

    monkeypatch.setattr(omniglot, "_urlopen", urlopen)
    return asked


def test_download_checks_the_official_checksum(omniglot_dir, tmp_path, monkeypatch):
    url = omniglot.SOURCES[SMALL1].url
    assert url == "https://github.com/brendenlake/omniglot/raw/master/python/images_background_small1.zip"
    asked = serve(monkeypatch, {url: omniglot_dir / SMALL1})
    path = omniglot.download(SMALL1, tmp_path / "dl")
    assert path == tmp_path / "dl" / SMALL1 and asked == [url]
    assert path.read_bytes() == (omniglot_dir / SMALL1).read_bytes()
    assert omniglot.download(SMALL1, tmp_path / "dl") == path and asked == [url]  # present: only checked


def test_download_rejects_a_checksum_mismatch(omniglot_dir, tmp_path, monkeypatch):
    # small2's bytes served for small1's URL: right kind of file, wrong content.
    serve(monkeypatch, {omniglot.SOURCES[SMALL1].url: omniglot_dir / SMALL2})
    with pytest.raises(ValueError, match="gave 1580917 bytes, expected 1319022; nothing was kept"):
        omniglot.download(SMALL1, tmp_path)
    monkeypatch.setitem(omniglot.SOURCES, SMALL1, omniglot.SOURCES[SMALL1]._replace(size=None))
    with pytest.raises(ValueError, match="has sha256 3ccaa407.*expected f38eb80f.*nothing was kept"):
        omniglot.download(SMALL1, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_with_download(omniglot_dir, tmp_path, monkeypatch):
    asked = serve(monkeypatch, {omniglot.SOURCES[SMALL2].url: omniglot_dir / SMALL2})
    data = omniglot.load(tmp_path / SMALL2, download=True, size=10, cache_dir=tmp_path / "cache")
    assert data.images.shape == (156, 20, 10, 10) and len(asked) == 1


def test_download_logic_offline(tmp_path, monkeypatch):
    payload = tmp_path / "served.zip"
    payload.write_bytes(b"pretend runs")
    digest = hashlib.sha256(b"pretend runs").hexdigest()
    serve(monkeypatch, {omniglot.SOURCES["all_runs.zip"].url: payload})
    with pytest.raises(ValueError, match=f"has sha256 {digest}, expected {'0' * 64}"):
        omniglot.download("all_runs.zip", tmp_path / "dl", sha256="0" * 64)
    assert list((tmp_path / "dl").iterdir()) == []
    path = omniglot.download("all_runs.zip", tmp_path / "dl", sha256=digest)
    assert path.read_bytes() == b"pretend runs"
    path.write_bytes(b"corrupted")
    with pytest.raises(ValueError, match="exists but its sha256 is .* delete it"):
        omniglot.download("all_runs.zip", tmp_path / "dl", sha256=digest)
    with pytest.raises(ValueError, match="unknown Omniglot file 'omniglot.zip'"):
        omniglot.download("omniglot.zip", tmp_path)


def test_all_runs_zip_has_the_official_checksum(tmp_path, monkeypatch):
    assert omniglot.SOURCES["all_runs.zip"].sha256 == (
        "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325")
    payload = tmp_path / "served.zip"
    payload.write_bytes(b"not the runs")
    serve(monkeypatch, {omniglot.SOURCES["all_runs.zip"].url: payload})
    with pytest.raises(ValueError, match="expected 437c1eea.*nothing was kept"):
        omniglot.load_runs(tmp_path / "dl" / "all_runs.zip", download=True)
    assert list((tmp_path / "dl").iterdir()) == []
    (tmp_path / "all_runs.zip").write_bytes(b"a damaged copy")  # already there: checked with download=True
    with pytest.raises(ValueError, match="exists but its sha256 is .*not 437c1eea"):
        omniglot.load_runs(tmp_path / "all_runs.zip", download=True)


def test_load_with_download_checks_a_zip_already_there(omniglot_dir, tmp_path, monkeypatch):
    asked = serve(monkeypatch, {})
    good = tmp_path / SMALL1
    shutil.copy(omniglot_dir / SMALL1, good)
    assert omniglot.load(good, download=True, size=8).images.shape == (136, 20, 8, 8) and asked == []
    bad = tmp_path / "bad" / SMALL1
    bad.parent.mkdir()
    bad.write_bytes((omniglot_dir / SMALL2).read_bytes())  # a valid zip, but not the official small1
    with pytest.raises(ValueError, match=f"{bad} exists but its sha256 is 3ccaa407.*not f38eb80f"):
        omniglot.load(bad, download=True)
    assert omniglot.load(bad, size=8).images.shape == (156, 20, 8, 8)  # without download=True: not checked


def test_offline_download_names_the_url(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(omniglot, "_urlopen", offline)
    url = omniglot.SOURCES[SMALL2].url
    with pytest.raises(OSError, match=f"could not fetch {url} \\(URLError: .*name resolution\\); nothing was "
                                      f"kept. Check the network"):
        omniglot.load(tmp_path / SMALL2, download=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise OSError("no network")

    monkeypatch.setattr(omniglot, "_urlopen", offline)
    with pytest.raises(OSError, match="no network"):
        omniglot.download("images_evaluation.zip", tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- one-shot runs ---------------------------------------------------------------------------------

ANSWERS = {"run01": [3, 1, 4, 2], "run02": [2, 2, 1, 4]}  # the training class of item01..item04


def make_runs(root: Path) -> Path:
    """Lake's all_runs layout: runXX/{training/classNN.png, test/itemNN.png, class_labels.txt}."""
    for r, (run, answers) in enumerate(ANSWERS.items()):
        for k in range(1, 5):
            write_png(root / run / "training" / f"class{k:02d}.png", ink(4 * r + k, 1))
        lines = []
        for i, k in enumerate(answers, start=1):
            write_png(root / run / "test" / f"item{i:02d}.png", ink(4 * r + k, 2))  # another drawer
            lines.append(f"{run}/test/item{i:02d}.png {run}/training/class{k:02d}.png")
        lines.reverse()  # the order of the lines must not matter
        (root / run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def nearest(support, query):
    return -((query[:, None] - support[None]) ** 2).sum(axis=(2, 3, 4))


def test_load_runs_folder_zip_and_single_run(tmp_path):
    root = make_runs(tmp_path / "all_runs")
    runs = omniglot.load_runs(root)
    assert [r.name for r in runs] == ["run01", "run02"]
    assert runs[0].training.shape == (4, 28, 28) and runs[0].test.shape == (4, 28, 28)
    assert runs[0].labels.tolist() == [2, 0, 3, 1] and runs[1].labels.tolist() == [1, 1, 0, 3]
    assert runs[0].labels.dtype == np.int64
    assert np.array_equal(omniglot.load_runs(root, size=None)[1].training[0], ink(5, 1) * np.uint8(255))
    zipped = zip_folder(root, tmp_path / "all_runs.zip", "all_runs")
    for a, b in zip(runs, omniglot.load_runs(zipped), strict=True):
        assert a.name == b.name and np.array_equal(a.test, b.test) and np.array_equal(a.labels, b.labels)
    single = omniglot.load_runs(root / "run02")
    assert len(single) == 1 and np.array_equal(single[0].training, runs[1].training)


def test_score_runs(tmp_path):
    runs = omniglot.load_runs(make_runs(tmp_path / "all_runs"))
    perfect = omniglot.score_runs(runs, nearest)
    assert perfect.errors.tolist() == [0.0, 0.0] and perfect.mean_error == 0.0
    seen = []

    def always_first(support, query):
        seen.append((support.shape, support.dtype, float(support.max())))
        return np.zeros(len(query), np.int64)

    score = omniglot.score_runs(runs, always_first)  # right only where the answer is class01
    assert score.errors.tolist() == [75.0, 75.0] and score.mean_error == 75.0
    assert seen[0] == ((4, 1, 28, 28), np.float32, 1.0)
    as_tensor = omniglot.score_runs(runs, lambda s, q: torch.from_numpy(nearest(s, q)))
    assert as_tensor.mean_error == 0.0
    flat = omniglot.score_runs(runs, lambda s, q: nearest(s[:, None], q[:, None]), channel_dim=False)
    assert flat.mean_error == 0.0
    with pytest.raises(ValueError, match=r"classify returned shape \(3,\)"):
        omniglot.score_runs(runs, lambda s, q: np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="at least one run"):
        omniglot.score_runs([], nearest)


def test_load_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True fetches"):
        omniglot.load_runs(tmp_path / "all_runs.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class_labels.txt"):
        omniglot.load_runs(tmp_path / "empty")
    root = make_runs(tmp_path / "all_runs")
    (root / "run01" / "class_labels.txt").write_text("run01/test/item01.png\n")
    with pytest.raises(ValueError, match="must hold lines"):
        omniglot.load_runs(root)
