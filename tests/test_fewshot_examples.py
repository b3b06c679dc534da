"""examples/maml_omniglot.py and examples/maml_miniimagenet.py: smoke runs, flag aliases, exact resume, errors."""

import json
import pathlib
import runpy

import numpy as np
import pytest
import torch

import metabatch as mb

from .test_examples import ROOT, run_example

Image = pytest.importorskip("PIL.Image", reason="Pillow (the omniglot extra) is not installed")

# Tiny settings: a few steps of a narrow net, so that each run takes seconds.
TINY = ("--channels", 8, "--meta-batch", 2, "--query", 2, "--eval-query", 2, "--test-steps", 1, "--val-tasks", 4,
        "--eval-tasks", 6, "--eval-batch", 4, "--num-workers", 0, "--no-progress", "--threads", 1)


def module(name):
    return runpy.run_path(str(ROOT / "examples" / name), run_name="__not_main__")


def final_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("final:")]


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """Data-set caches go to a temporary folder, not ~/.cache; the scripts' --threads does not leak."""
    monkeypatch.setenv("METABATCH_CACHE", str(tmp_path_factory.getbasetemp() / "metabatch-cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_omniglot(root: pathlib.Path, alphabets, drawers=6, side=28) -> pathlib.Path:
    """A synthetic Omniglot folder: ``root/<alphabet>/characterNN/<id>_<drawer>.png``, one random blob per class."""
    rng = np.random.default_rng(len(alphabets))
    for a, (alphabet, n_chars) in enumerate(alphabets):
        for ch in range(1, n_chars + 1):
            base = rng.random((side, side)) < 0.2
            for d in range(1, drawers + 1):
                noisy = base ^ (rng.random((side, side)) < 0.02)
                path = root / alphabet / f"character{ch:02d}" / f"{a:02d}{ch:02d}_{d:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(~noisy).save(path)  # paper white, ink black, as in the official files
    return root


@pytest.fixture(scope="module")
def tiny_omniglot(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    train = write_omniglot(root / "background", [("Greek", 6), ("Latin", 6)])
    held = write_omniglot(root / "evaluation", [("Latin", 6), ("Tagalog", 6)])
    return train, held


def write_runs(root: pathlib.Path, ways=5, num_runs=2, side=28) -> pathlib.Path:
    """Lake et al.'s run layout: runNN/training/classNN.png, runNN/test/itemNN.png, runNN/class_labels.txt."""
    rng = np.random.default_rng(0)
    for r in range(1, num_runs + 1):
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        answer = rng.permutation(ways) + 1
        lines = []
        for i in range(1, ways + 1):
            Image.fromarray(~(rng.random((side, side)) < 0.2)).save(run / "training" / f"class{i:02d}.png")
            Image.fromarray(~(rng.random((side, side)) < 0.2)).save(run / "test" / f"item{i:02d}.png")
            lines.append(f"run{r:02d}/test/item{i:02d}.png run{r:02d}/training/class{answer[i - 1]:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def write_miniimagenet(root: pathlib.Path, splits=(("train", 6), ("val", 5), ("test", 5)), per_class=8, side=20):
    """The Ravi & Larochelle layout: images/*.jpg and train/val/test.csv with 'filename,label' rows."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    n = 0
    for split, classes in splits:
        rows = ["filename,label"]
        for _ in range(classes):
            label = f"n{n:08d}"
            n += 1
            color = rng.integers(0, 256, 3)
            for i in range(per_class):
                pixels = np.clip(color + rng.normal(0, 30, (side, side, 3)), 0, 255).astype(np.uint8)
                name = f"{label}{i:08d}.jpg"
                Image.fromarray(pixels).save(root / "images" / name)
                rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


# -- Omniglot --------------------------------------------------------------------------------------


def test_omniglot_on_the_small_subsets(omniglot_dir, tmp_path, capsys):
    metrics = run_example("maml_omniglot.py", "--train", omniglot_dir / "images_background_small1.zip",
                          "--eval", omniglot_dir / "images_background_small2.zip", *TINY, "--steps", 4,
                          "--val-every", 2, "--first-order-steps", 1, "--shift", 1, "--flip", "--out", tmp_path)
    out = capsys.readouterr().out
    assert "evaluation: 106 characters of Japanese_(katakana), Sanskrit, Tagalog" in out
    assert "training: 116 characters of 5 alphabets" in out
    final = [line for line in out.splitlines() if line.startswith("final:")]
    assert len(final) == 1 and final[0].startswith("final: 5-way 1-shot accuracy ")
    assert final[0].endswith("% (6 tasks)")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["tasks"] == 6 and saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert saved["test"]["on"] == "held-out alphabets: Japanese_(katakana), Sanskrit, Tagalog"
    assert [v["step"] for v in saved["validation"]] == [2, 4]
    assert saved["steps"] == 4 and len(metrics["train_loss"]) == 4
    assert {"tasks_per_s", "images_per_s", "ms_per_step", "load_average"} <= set(saved)
    assert (tmp_path / "learning_curve.png").stat().st_size > 10_000
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["step"] == saved["best"]["step"] and best["val_acc"] == saved["best"]["val_accuracy"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["step"] == 4 and last["seed"] == last["args"]["seed"] == 0 and "opt" in last and "model" in last
    assert last["args"]["meta_batch"] == 2 and last["loss"] == metrics["train_loss"]


def test_omniglot_resume_continues_the_exact_stream(tiny_omniglot, tmp_path):
    train, _ = tiny_omniglot
    common = ("--train", train, "--val-classes", 5, *TINY, "--val-every", 3, "--first-order-steps", 2,
              "--shift", 1, "--lr-schedule", "cosine", "--steps", 6)
    whole = run_example("maml_omniglot.py", *common, "--out", tmp_path / "whole")
    run_example("maml_omniglot.py", *common, "--out", tmp_path / "cut", "--time-budget", 1e-9)  # stops at step 1
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert cut["step"] == 1
    resumed = run_example("maml_omniglot.py", *common, "--out", tmp_path / "cut", "--num-workers", 2,
                          "--resume", tmp_path / "cut" / "last.pt")
    assert resumed["start_step"] == 1 and resumed["steps"] == 6
    assert resumed["train_loss"] == whole["train_loss"]  # bit for bit, steps 0..5, whatever the workers
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["opt"]["state"][0], b["opt"]["state"][0]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_other_settings(tiny_omniglot, tmp_path):
    train, _ = tiny_omniglot
    common = ("--train", train, "--val-classes", 5, *TINY, "--steps", 2, "--out", tmp_path)
    run_example("maml_omniglot.py", *common)
    with pytest.raises(SystemExit, match=r"differ from the checkpoint's .*'seed': \(0, 1\)"):
        run_example("maml_omniglot.py", *common, "--seed", 1, "--resume", tmp_path / "last.pt")
    with pytest.raises(SystemExit, match="holds no optimizer state"):
        run_example("maml_omniglot.py", *common, "--resume", tmp_path / "best.pt")


def test_omniglot_one_shot_runs(tiny_omniglot, tmp_path, capsys):
    train, held = tiny_omniglot
    runs = write_runs(tmp_path / "runs", ways=5)
    metrics = run_example("maml_omniglot.py", "--train", train, "--val-classes", 5, "--eval", held, "--eval-runs",
                          runs, *TINY, "--steps", 2, "--out", tmp_path / "out")
    lines = final_lines(capsys)
    assert lines[0].startswith("final: 5-way 1-shot accuracy ") and lines[0].endswith("(6 tasks)")
    assert lines[1] == f"final: 5-way one-shot error {metrics['one_shot_runs']['mean_error']:.2f}%"
    assert len(metrics["one_shot_runs"]["errors"]) == 2
    assert metrics["test"]["on"] == "held-out alphabets: Tagalog"  # Latin is in the training data


@pytest.mark.parametrize("script", ["maml_omniglot.py", "protonet_omniglot.py"])
def test_threads_default_and_the_callers_count_comes_back(tiny_omniglot, tmp_path, script):
    """No --threads: metabatch.runtime.default_threads(--num-workers), applied while the run lasts."""
    assert TINY[-2:] == ("--threads", 1)
    train, _ = tiny_omniglot
    flags = list(TINY[:-2])
    if script.startswith("protonet"):  # no inner loop: no --test-steps; fewer classes per training episode
        del flags[flags.index("--test-steps"):flags.index("--test-steps") + 2]
        flags += ["--train-ways", 4]
    torch.set_num_threads(3)  # the caller's count: neither the default nor torch's own here
    metrics = run_example(script, "--train", train, "--val-classes", 5, *flags, "--steps", 1, "--out", tmp_path)
    assert metrics["threads"] == metrics["args"]["threads"] == mb.runtime.default_threads(0)
    assert torch.get_num_threads() == 3


def test_omniglot_without_eval_reports_validation(tiny_omniglot, tmp_path, capsys):
    train, _ = tiny_omniglot
    metrics = run_example("maml_omniglot.py", "--train", train, "--val-classes", 5, *TINY, "--steps", 1,
                          "--out", tmp_path)
    assert metrics["test"]["on"] == "validation characters"
    assert len(final_lines(capsys)) == 1


@pytest.mark.parametrize("flags, message", [
    (("--ways", 1), "argument --ways/--n_way: must be >= 2, got 1"),
    (("--n_way", "five"), "argument --ways/--n_way: expected an int >= 2, got 'five'"),
    (("--meta-lr", -1), "argument --meta-lr/--meta_lr: must be a finite number > 0, got -1"),
    (("--update_lr", "nan"), "argument --inner-lr/--update_lr: must be a finite number > 0, got nan"),
    (("--shots", 3, "--query", 4), ("--shots 3 + --query 4 = 7 images per class, but every class has 6; "
                                    "lower --query or --shots.")),
    (("--ways", 6, "--val-classes", 5), ("--val-classes 5 cannot make 6-way validation tasks; raise it to at "
                                         "least 6.")),
    (("--val-classes", 12), "--val-classes 12 leaves no training class out of 12; lower it."),
    (("--eval-runs", "RUNS"), "--eval-runs: the runs are 5-way one-shot; train with --ways 5 (got --ways 3)."),
])
def test_omniglot_bad_flags(tiny_omniglot, tmp_path, capsys, flags, message):
    train, _ = tiny_omniglot
    flags = [tmp_path / "runs" if f == "RUNS" else f for f in flags]
    if "--eval-runs" in flags:
        write_runs(tmp_path / "runs", ways=5)
        flags += ["--ways", 3]
    with pytest.raises(SystemExit) as err:
        run_example("maml_omniglot.py", "--train", train, "--val-classes", 5, *TINY, "--steps", 1, *flags,
                    "--out", tmp_path / "out")
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_omniglot_eval_must_hold_new_alphabets(tiny_omniglot, tmp_path, capsys):
    train, _ = tiny_omniglot
    with pytest.raises(SystemExit):
        run_example("maml_omniglot.py", "--train", train, "--eval", train, "--val-classes", 5, *TINY,
                    "--out", tmp_path)
    assert "every alphabet of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_example("maml_omniglot.py", "--train", tmp_path / "nothing.zip", *TINY, "--out", tmp_path)
    assert "nothing.zip does not exist" in capsys.readouterr().err


# -- flags shared with MAML-Pytorch ----------------------------------------------------------------

ALIASES = [("--ways", "--n_way", "3"), ("--shots", "--k_spt", "2"), ("--query", "--k_qry", "4"),
           ("--image-size", "--imgsz", "32"), ("--meta-batch", "--task_num", "6"), ("--meta-lr", "--meta_lr", "0.002"),
           ("--inner-lr", "--update_lr", "0.05"), ("--inner-steps", "--update_step", "3"),
           ("--test-steps", "--update_step_test", "7")]


@pytest.mark.parametrize("script, required", [("maml_omniglot.py", ["--train", "x.zip"]),
                                              ("maml_miniimagenet.py", ["--data", "mini"])])
def test_maml_pytorch_flag_names_are_aliases(script, required):
    parse = module(script)["parse_args"]
    ours = parse(required + [x for long, _, v in ALIASES for x in (long, v)])
    theirs = parse(required + [x for _, alias, v in ALIASES for x in (alias, v)])
    assert vars(ours) == vars(theirs)
    assert (ours.ways, ours.shots, ours.query, ours.image_size, ours.meta_batch, ours.meta_lr, ours.inner_lr,
            ours.inner_steps, ours.test_steps) == (3, 2, 4, 32, 6, 0.002, 0.05, 3, 7)
    defaults = vars(parse(required))
    assert vars(parse(required + ["--n_way", str(defaults["ways"])])) == defaults


def test_help_lists_maml_pytorch_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help to the terminal width
    for script, their_batch in (("maml_omniglot.py", 32), ("maml_miniimagenet.py", 4)):
        with pytest.raises(SystemExit):
            module(script)["parse_args"](["--help"])
        out = capsys.readouterr().out
        assert f"MAML-Pytorch --task_num default {their_batch}" in out
        assert "--update_step_test" in out and "--k_qry" in out


# -- mini-ImageNet ---------------------------------------------------------------------------------


def test_miniimagenet_smoke_with_maml_pytorch_flags(tmp_path, capsys):
    pytest.importorskip("metabatch.tasks.miniimagenet", reason="metabatch.tasks.miniimagenet is not there yet")
    data = write_miniimagenet(tmp_path / "mini")
    metrics = run_example("maml_miniimagenet.py", "--data", data, "--n_way", 3, "--k_spt", 1, "--k_qry", 2,
                          "--imgsz", 16, "--task_num", 2, "--update_step", 2, "--update_step_test", 2, "--channels", 4,
                          "--eval-query", 3, "--val-tasks", 4, "--eval-tasks", 6, "--val-every", 2, "--steps", 4,
                          "--num-workers", 1, "--threads", 1, "--no-progress", "--out", tmp_path / "out")
    out = capsys.readouterr().out
    assert "train: 6 classes x 8 images of (3, 16, 16)" in out
    final = [line for line in out.splitlines() if line.startswith("final:")]
    assert len(final) == 1 and final[0].startswith("final: 3-way 1-shot accuracy ") and final[0].endswith("(6 tasks)")
    assert metrics["test"]["on"] == "test split (5 classes)" and metrics["device"] == "cpu"
    assert metrics["args"]["inner_steps"] == 2 and [v["step"] for v in metrics["validation"]] == [2, 4]
    assert (tmp_path / "out" / "best.pt").exists() and (tmp_path / "out" / "learning_curve.png").exists()
    # the run continues from its last checkpoint on the same stream
    more = run_example("maml_miniimagenet.py", "--data", data, "--n_way", 3, "--k_spt", 1, "--k_qry", 2,
                       "--imgsz", 16, "--task_num", 2, "--update_step", 2, "--update_step_test", 2, "--channels", 4,
                       "--eval-query", 3, "--val-tasks", 4, "--eval-tasks", 6, "--val-every", 2, "--steps", 5,
                       "--num-workers", 0, "--threads", 1, "--no-progress", "--out", tmp_path / "out",
                       "--resume", tmp_path / "out" / "last.pt")
    assert more["train_loss"][:4] == metrics["train_loss"] and len(more["train_loss"]) == 5


def test_miniimagenet_errors(tmp_path, capsys):
    pytest.importorskip("metabatch.tasks.miniimagenet", reason="metabatch.tasks.miniimagenet is not there yet")
    with pytest.raises(SystemExit):
        run_example("maml_miniimagenet.py", "--data", tmp_path, "--steps", 1)
    assert "no train.csv there" in capsys.readouterr().err
    data = write_miniimagenet(tmp_path / "mini")
    with pytest.raises(SystemExit):
        run_example("maml_miniimagenet.py", "--data", data, "--imgsz", 16, "--steps", 1, "--out", tmp_path / "out")
    assert ("--shots 1 + --query 15 = 16 images per class, but every class has 8; lower --query or --shots."
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        run_example("maml_miniimagenet.py", "--data", data, "--ways", 6, "--query", 2, "--eval-query", 2,
                    "--imgsz", 16, "--steps", 1, "--out", tmp_path / "out")
    assert "the val split has 5 classes, fewer than --ways 6; lower --ways." in capsys.readouterr().err


# -- augmentations -------------------------------------------------------------------------------


def moved(x, y, p):
    """Whether image y is image x moved by some (dy, dx) in [-p, p]^2 (zero fill)."""
    padded = np.pad(x, [(0, 0), (p, p), (p, p)])
    side = x.shape[-1]
    return any(np.array_equal(y, padded[:, i:i + side, j:j + side]) for i in range(2 * p + 1)
               for j in range(2 * p + 1))


def test_augmented_flips_classes_and_shifts_images():
    fewshot = module("maml_omniglot.py")["_fewshot"]
    images = np.random.default_rng(0).integers(0, 256, size=(6, 4, 9, 9), dtype=np.uint8)
    plain = mb.tasks.classification(images, 3)
    key = mb.random.key(3)
    a = plain(key, 0, 1, 2)
    flipped = fewshot.Augmented(plain, flip=True)(key, 0, 1, 2)
    mirrored = set()
    for part in ("context", "target"):
        assert np.array_equal(a[part][1], flipped[part][1])
        for x, y, label in zip(a[part][0], flipped[part][0], a[part][1], strict=True):
            assert np.array_equal(y, x) or np.array_equal(y, x[..., ::-1])
            if not np.array_equal(y, x):
                mirrored.add(int(label))
    for part in ("context", "target"):  # a class is mirrored in all its support and query images
        for x, y, label in zip(a[part][0], flipped[part][0], a[part][1], strict=True):
            assert np.array_equal(y, x[..., ::-1] if int(label) in mirrored else x)
    assert 0 < len(mirrored) < 3  # for this key
    shifted = fewshot.Augmented(plain, shift=2)
    b = shifted(key, 0, 1, 2)
    assert all(moved(x, y, 2) for part in ("context", "target") for x, y in zip(a[part][0], b[part][0], strict=True))
    assert b["target"][0].dtype == np.float32 and b["target"][0].flags.c_contiguous
    assert all(np.array_equal(u, v) for u, v in zip(shifted(key, 0, 1, 2)["target"], b["target"], strict=True))
    assert not np.array_equal(shifted(mb.random.key(4), 0, 1, 2)["target"][0], b["target"][0])
