"""examples/lightning_maml.py: a tiny fit runs, and a resumed fit continues the same task stream."""

import csv
import math
import pathlib
import runpy

import pytest
import torch

pytest.importorskip("lightning", reason="PyTorch Lightning is not installed (pip install lightning, or "
                                        "pip install 'metabatch[lightning]')")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = runpy.run_path(str(ROOT / "examples" / "lightning_maml.py"), run_name="__not_main__")

# Lightning 2.6 on torch 2.13 warns about a deprecated torch pytree API inside Lightning itself.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")

TINY = ["--steps", 6, "--meta-batch", 3, "--eval-tasks", 6, "--test-steps", 2, "--val-every", 3,
        "--checkpoint-every", 3, "--no-progress"]


def run(*args):
    return EXAMPLE["main"]([str(a) for a in args])


def params(module):
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def test_tiny_fit_validates_tests_and_checkpoints(tmp_path, capsys):
    module, trainer, result = run(*TINY, "--out", tmp_path)
    assert trainer.global_step == 6 and module.start == 0
    assert [step for step, _, _ in module.trace] == [0, 1, 2, 3, 4, 5]
    assert [indices for _, indices, _ in module.trace] == [module.train_specs()[s].indices for s in range(6)]
    assert math.isfinite(result["test_loss"])
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [2, 5]  # validated after steps 3 and 6
    assert [int(r["step"]) for r in rows if r["train_loss"]] == [2, 5]
    assert [float(r["test_loss"]) for r in rows if r["test_loss"]] == [pytest.approx(result["test_loss"])]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=3.ckpt", "step=6.ckpt"]
    saved = torch.load(tmp_path / "checkpoints" / "step=3.ckpt", weights_only=False)
    assert saved["metabatch"] == {"step": 3, "seed": 0, "batch_size": 3, "n_ctx": (10, 10), "n_tgt": (10, 10)}
    assert saved["global_step"] == 3
    out = capsys.readouterr().out
    assert "trained steps 0..5; test loss" in out and "(6 tasks, 2 inner steps)" in out


# ModelCheckpoint notes that a run resumed into another folder forgets its best-k bookkeeping.
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_continues_the_same_task_stream(tmp_path):
    full, _, full_result = run(*TINY, "--out", tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "step=3.ckpt"
    resumed, trainer, result = run(*TINY, "--out", tmp_path / "resumed", "--resume", ckpt,
                                   "--num-workers", 2)
    assert resumed.start == 3 and trainer.global_step == 6
    assert resumed.trace == full.trace[3:]  # same steps, same task indices, same batch contents
    a, b = params(full), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the same model after step 5
    assert result == full_result


def test_resume_refuses_another_stream(tmp_path):
    run(*TINY, "--out", tmp_path / "a")
    with pytest.raises(ValueError, match=r"task stream differs from this run's: \{'seed': \(0, 1\)\}"):
        run(*TINY, "--out", tmp_path / "b", "--seed", 1, "--resume", tmp_path / "a" / "checkpoints" / "last.ckpt")


def test_maml_pytorch_flag_names_are_aliases():
    args = EXAMPLE["parse_args"](["--n_way", "3", "--k_spt", "2", "--k_qry", "4", "--imgsz", "14",
                                  "--task_num", "8", "--meta_lr", "0.5", "--update_lr", "0.25",
                                  "--update_step", "2", "--update_step_test", "7"])
    assert (args.ways, args.shots, args.query, args.image_size, args.meta_batch) == (3, 2, 4, 14, 8)
    assert (args.meta_lr, args.inner_lr, args.inner_steps, args.test_steps) == (0.5, 0.25, 2, 7)


def test_eval_tasks_round_down_to_whole_meta_batches(tmp_path, capsys):
    assert EXAMPLE["MAML"](eval_tasks=10, meta_batch=4).eval_batches() == 2
    assert EXAMPLE["MAML"](eval_tasks=3, meta_batch=4).eval_batches() == 1
    run("--steps", 1, "--meta-batch", 4, "--eval-tasks", 10, "--test-steps", 1, "--val-every", 1,
        "--checkpoint-every", 1, "--no-progress", "--out", tmp_path)
    assert "(8 tasks, 1 inner steps)" in capsys.readouterr().out


def test_omniglot_tiny_fit(omniglot_dir, tmp_path):
    module, trainer, result = run(
        "--task", "omniglot", "--data", omniglot_dir / "images_background_small1.zip", "--hidden", 8,
        "--steps", 2, "--meta-batch", 2, "--eval-tasks", 2, "--test-steps", 1, "--val-every", 2,
        "--checkpoint-every", 2, "--no-progress", "--out", tmp_path)
    assert trainer.global_step == 2 and 0.0 <= result["test_acc"] <= 1.0
    # small1 has 136 characters and no --eval-data: the last fifth is held out for validation and test
    assert module._tasks["train"].classes.shape == (109, 20, 28, 28)
    assert module._tasks["eval"].classes.shape == (27, 20, 28, 28)
    with pytest.raises(ValueError, match="needs --data"):
        EXAMPLE["MAML"](task="omniglot")
