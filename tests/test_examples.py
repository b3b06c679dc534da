"""Every example runs for a few steps, so that none of them rots."""

import json
import pathlib
import runpy
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name, *args):
    argv = sys.argv
    sys.argv = [name, *map(str, args)]
    try:
        return runpy.run_path(str(ROOT / "examples" / name), run_name="__not_main__")["main"](list(map(str, args)))
    finally:
        sys.argv = argv


@pytest.mark.parametrize("extra", [[], ["--meta-sgd"], ["--first-order", "--inner-steps", "2"]])
def test_maml_sinusoid_smoke(tmp_path, capsys, extra):
    metrics = run_example("maml_sinusoid.py", "--steps", 3, "--meta-batch", 4, "--eval-tasks", 20,
                          "--num-workers", 0, "--no-progress", "--eager", "--out", tmp_path, *extra)
    out = capsys.readouterr().out
    final = [line for line in out.splitlines() if line.startswith("final:")]
    assert len(final) == 1 and "(K=10, 1 step, 20 tasks)" in final[0]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["post_adaptation_mse"]["mean"] == pytest.approx(metrics["post_adaptation_mse"]["mean"])
    assert len(saved["mse_vs_inner_steps"]["mean"]) == 11
    assert (tmp_path / "adaptation.png").stat().st_size > 10_000


def test_maml_sinusoid_is_reproducible(tmp_path):
    args = ("--steps", 5, "--meta-batch", 3, "--eval-tasks", 10, "--num-workers", 0, "--no-progress", "--eager",
            "--threads", 1)
    a = run_example("maml_sinusoid.py", *args, "--out", tmp_path / "a")
    b = run_example("maml_sinusoid.py", *args, "--num-workers", 2, "--out", tmp_path / "b")
    assert a["train_loss_every_100"] == b["train_loss_every_100"]
    assert a["mse_vs_inner_steps"] == b["mse_vs_inner_steps"]
