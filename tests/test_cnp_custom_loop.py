"""examples/cnp.py and examples/custom_loop.py: smoke runs, reproducibility, variable context, resume."""

import json
import re
import runpy

import pytest
import torch

import metabatch as mb
from tests.test_examples import ROOT, run_example

CNP_SMALL = ("--steps", 6, "--meta-batch", 4, "--hidden", 16, "--eval-tasks", 12, "--eval-batch", 4,
             "--no-progress")


def final_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("final:")]


def test_cnp_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    metrics = run_example("cnp.py", *CNP_SMALL, "--num-workers", 0, "--threads", 2, "--out", tmp_path)
    assert torch.get_num_threads() == threads          # --threads is restored when main() returns
    final = final_lines(capsys)
    assert len(final) == 1
    assert re.fullmatch(r"final: target log-likelihood -?\d+\.\d{3} ± \d+\.\d{3} per point \(12 tasks\)", final[0])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["target_loglik"] == pytest.approx(metrics["target_loglik"])
    assert saved["target_loglik"]["tasks"] == 12
    assert len(saved["train_nll"]) == 6
    for name in ("context_loglik", "trivial_loglik", "gp_posterior_loglik"):
        assert set(saved[name]) == {"mean", "ci95"}
    # the references: the GP prior ignores the context, the exact posterior uses it
    assert saved["gp_posterior_loglik"]["mean"] > saved["trivial_loglik"]["mean"]
    assert (tmp_path / "predictions.png").stat().st_size > 10_000


def test_cnp_is_reproducible_for_any_worker_count(tmp_path):
    a = run_example("cnp.py", *CNP_SMALL, "--num-workers", 0, "--out", tmp_path / "a")
    b = run_example("cnp.py", *CNP_SMALL, "--num-workers", 2, "--out", tmp_path / "b")
    for name in ("train_nll", "n_ctx_per_step", "target_loglik", "context_loglik", "eval_by_batch"):
        assert a[name] == b[name], name
    c = run_example("cnp.py", *CNP_SMALL, "--num-workers", 0, "--seed", 1, "--out", tmp_path / "c")
    assert c["train_nll"] != a["train_nll"]


def test_cnp_context_size_varies_per_batch(tmp_path):
    steps = 12
    m = run_example("cnp.py", "--steps", steps, "--meta-batch", 2, "--hidden", 8, "--eval-tasks", 8,
                    "--eval-batch", 2, "--num-workers", 0, "--no-progress", "--out", tmp_path)
    # the sizes the model actually received are those that batch_specs drew for each step
    specs = mb.batch_specs(0, num_tasks=10**6, batch_size=2, n_ctx=(3, 50), n_tgt=50)
    assert m["n_ctx_per_step"] == [specs[s].n_ctx for s in range(steps)]
    assert len(set(m["n_ctx_per_step"])) > 1
    assert all(3 <= n <= 50 for n in m["n_ctx_per_step"])
    assert len(set(m["eval_by_batch"]["n_ctx"])) > 1


def test_cnp_resume_continues_the_same_run(tmp_path, capsys):
    small = (*CNP_SMALL[2:], "--threads", 1)  # without "--steps", 6; one thread in every run
    straight = run_example("cnp.py", "--steps", 6, *small, "--num-workers", 0, "--out", tmp_path / "a")
    run_example("cnp.py", "--steps", 4, *small, "--num-workers", 0, "--out", tmp_path / "b",
                "--checkpoint-every", 2)
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert saved["step"] == 4 and len(saved["train_nll"]) == 4
    resumed = run_example("cnp.py", "--steps", 6, *small, "--num-workers", 2, "--out", tmp_path / "c",
                          "--resume", tmp_path / "b" / "last.pt")
    assert "resumed from" in capsys.readouterr().out
    for name in ("train_nll", "n_ctx_per_step", "target_loglik", "eval_by_batch"):
        assert resumed[name] == straight[name], name
    with pytest.raises(SystemExit, match="another run.*seed"):
        run_example("cnp.py", "--steps", 6, *small, "--seed", 1, "--out", tmp_path / "d",
                    "--resume", tmp_path / "b" / "last.pt")


def test_cnp_old_flag_names_still_work(tmp_path):
    new = run_example("cnp.py", *CNP_SMALL, "--meta-lr", 2e-3, "--num-workers", 0, "--out", tmp_path / "a")
    old_names = [a if a != "--meta-batch" else "--batch-size" for a in CNP_SMALL]
    old = run_example("cnp.py", *old_names, "--lr", 2e-3, "--num-workers", 0, "--out", tmp_path / "b")
    assert old["train_nll"] == new["train_nll"]
    assert old["args"]["meta_lr"] == 2e-3 and old["args"]["meta_batch"] == 4


def test_gp_posterior_refuses_scales_drawn_per_task():
    gp_posterior = runpy.run_path(str(ROOT / "examples" / "cnp.py"), run_name="__not_main__")["gp_posterior"]
    x = torch.linspace(-1, 1, 4).reshape(1, 4, 1)
    mean, std = gp_posterior(mb.tasks.gp(), x, torch.sin(x), x)
    assert mean.shape == std.shape == (1, 4, 1) and torch.all(std > 0.019)  # the 0.02 noise stays
    assert torch.allclose(mean, torch.sin(x), atol=0.01)  # at the context points: nearly the data
    with pytest.raises(ValueError, match="draws its scales per task"):
        gp_posterior(mb.tasks.gp(length_scale=(0.3, 1.0)), x, torch.sin(x), x)


def test_cnp_rejects_bad_ranges(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_example("cnp.py", "--min-ctx", 10, "--max-ctx", 5, "--out", tmp_path)
    assert "--min-ctx <= --max-ctx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_example("cnp.py", "--eval-tasks", 10, "--eval-batch", 3, "--out", tmp_path)
    assert "must divide --eval-tasks" in capsys.readouterr().err


def test_custom_loop_is_at_most_65_lines():
    lines = (ROOT / "examples" / "custom_loop.py").read_text().splitlines()
    assert len(lines) <= 65, len(lines)


def test_custom_loop_smoke(capsys):
    losses = run_example("custom_loop.py", "--steps", 5, "--num-workers", 0)
    assert len(losses) == 5 and all(loss > 0 for loss in losses)
    final = final_lines(capsys)
    assert len(final) == 1 and final[0].startswith("final: meta-loss ")


def test_custom_loop_is_reproducible_for_any_worker_count():
    a = run_example("custom_loop.py", "--steps", 6, "--num-workers", 0)
    b = run_example("custom_loop.py", "--steps", 6, "--num-workers", 2)
    assert a == b
    assert run_example("custom_loop.py", "--steps", 6, "--num-workers", 0, "--seed", 1) != a


def test_custom_loop_resume_continues_the_same_run(tmp_path):
    threads = torch.get_num_threads()
    straight = run_example("custom_loop.py", "--steps", 8, "--num-workers", 0, "--threads", 1)
    assert torch.get_num_threads() == threads  # put back when main() returns
    first = run_example("custom_loop.py", "--steps", 4, "--num-workers", 0, "--threads", 1, "--out", tmp_path)
    second = run_example("custom_loop.py", "--steps", 8, "--num-workers", 2, "--threads", 1, "--resume",
                         tmp_path / "last.pt")
    assert first + second == straight
