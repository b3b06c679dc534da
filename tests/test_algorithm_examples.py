"""examples/maml_omniglot.py --mamlpp and examples/protonet_omniglot.py: smoke runs, exact resume, flags, plot."""

import json
import runpy

import pytest
import torch

from . import test_fewshot_examples as fewshot
from .test_examples import ROOT, run_example
from .test_fewshot_examples import TINY, write_runs

isolated, tiny_omniglot = fewshot.isolated, fewshot.tiny_omniglot  # the fixtures of the few-shot example tests

pytest.importorskip("PIL.Image", reason="Pillow (the omniglot extra) is not installed")


def test_mamlpp_smoke_with_every_piece(tiny_omniglot, tmp_path, capsys):
    train, held = tiny_omniglot
    runs = write_runs(tmp_path / "runs", ways=5)
    metrics = run_example("maml_omniglot.py", "--train", train, "--val-classes", 5, "--eval", held, "--eval-runs", runs,
                          *TINY, "--mamlpp", "--bnrs", "--inner-steps", 2, "--test-steps", 3, "--steps", 4,
                          "--val-every", 2, "--bnrs-tasks", 3, "--out", tmp_path / "out")
    out = capsys.readouterr().out
    assert "MAML++ pieces: msl, lslr, bnwb, bnrs, da" in out
    assert "first-order for 1 steps" in out  # --da-fraction 0.3 of 4 steps
    lines = [line for line in out.splitlines() if line.startswith("final:")]
    assert lines[0].startswith("final: 5-way 1-shot accuracy ") and lines[1].startswith("final: 5-way one-shot error")
    assert metrics["method"] == "MAML++" and metrics["example"] == "MAML++ Omniglot"
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=True)
    assert best["model"]["1.weight"].shape == (2, 8)  # per-step batch-norm weights: [steps, channels]
    assert best["model"]["1.running_mean"].shape == (8,)
    rates = {k: v for k, v in best["extra"].items() if k.startswith("lslr.")}
    assert sorted(rates) == [f"lslr.{k}" for k in sorted(best["model"]) if k.endswith(("weight", "bias"))
                             and not k.startswith(("1.", "4.", "7.", "10."))]
    assert all(v.shape == (2,) for v in rates.values())
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all("train_seconds" in v for v in saved["validation"])


@pytest.mark.parametrize("piece", ["--msl", "--lslr", "--bnwb", "--bnrs", "--da"])
def test_each_mamlpp_piece_runs_alone(tiny_omniglot, tmp_path, capsys, piece):
    train, _ = tiny_omniglot
    metrics = run_example("maml_omniglot.py", "--train", train, "--val-classes", 5, *TINY, piece, "--inner-steps", 2,
                          "--steps", 2, "--bnrs-tasks", 2, "--out", tmp_path)
    assert f"MAML++ pieces: {piece[2:]}" in capsys.readouterr().out
    assert metrics["method"] == "MAML++" and 0 <= metrics["test"]["accuracy"] <= 1


def test_mamlpp_leaves_bnrs_out_unless_asked(tiny_omniglot, tmp_path, capsys):
    train, _ = tiny_omniglot
    run_example("maml_omniglot.py", "--train", train, "--val-classes", 5, *TINY, "--mamlpp", "--steps", 1,
                "--out", tmp_path)
    assert "MAML++ pieces: msl, lslr, bnwb, da\n" in capsys.readouterr().out


def test_mamlpp_with_every_piece_off_is_plain_maml(tiny_omniglot, tmp_path):
    train, _ = tiny_omniglot
    common = ("--train", train, "--val-classes", 5, *TINY, "--steps", 3)
    plain = run_example("maml_omniglot.py", *common, "--out", tmp_path / "a")
    off = run_example("maml_omniglot.py", *common, "--mamlpp", "--no-msl", "--no-lslr", "--no-bnwb", "--no-bnrs",
                      "--no-da", "--out", tmp_path / "b")
    assert off["method"] == "MAML" and off["train_loss"] == plain["train_loss"]


def test_mamlpp_resume_continues_the_exact_stream(tiny_omniglot, tmp_path):
    train, _ = tiny_omniglot
    common = ("--train", train, "--val-classes", 5, *TINY, "--mamlpp", "--bnrs", "--inner-steps", 2, "--val-every", 3,
              "--bnrs-tasks", 2, "--steps", 5)
    whole = run_example("maml_omniglot.py", *common, "--out", tmp_path / "whole")
    run_example("maml_omniglot.py", *common, "--out", tmp_path / "cut", "--time-budget", 1e-9)
    resumed = run_example("maml_omniglot.py", *common, "--out", tmp_path / "cut", "--resume",
                          tmp_path / "cut" / "last.pt")
    assert resumed["start_step"] == 1 and resumed["train_loss"] == whole["train_loss"]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert all(torch.equal(a["extra"][k], b["extra"][k]) for k in a["extra"])
    with pytest.raises(SystemExit, match=r"differ from the checkpoint's .*'msl': \(True, False\)"):
        run_example("maml_omniglot.py", *common, "--no-msl", "--out", tmp_path / "cut", "--resume",
                    tmp_path / "cut" / "last.pt")


def test_mamlpp_bad_flags(tiny_omniglot, tmp_path, capsys):
    train, _ = tiny_omniglot
    for flags, message in ((("--da", "--first-order-steps", 3), "--da sets the first-order steps"),
                           (("--msl", "--msl-fraction", 2), "--msl-fraction must lie in [0, 1], got 2.0")):
        with pytest.raises(SystemExit):
            run_example("maml_omniglot.py", "--train", train, "--val-classes", 5, *TINY, *flags, "--out", tmp_path)
        assert message in capsys.readouterr().err


def test_protonet_smoke_and_resume(tiny_omniglot, tmp_path, capsys):
    train, held = tiny_omniglot
    common = ("--train", train, "--val-classes", 5, "--eval", held, "--train-ways", 4, "--channels", 8,
              "--meta-batch", 2, "--query", 2, "--eval-query", 2, "--val-tasks", 4, "--eval-tasks", 6,
              "--eval-batch", 4, "--num-workers", 0, "--no-progress", "--threads", 1, "--val-every", 2, "--steps", 4)
    whole = run_example("protonet_omniglot.py", *common, "--out", tmp_path / "whole")
    out = capsys.readouterr().out
    assert "training: 7 characters, 4-way episodes" in out
    lines = [line for line in out.splitlines() if line.startswith("final:")]
    assert len(lines) == 1 and lines[0].startswith("final: 5-way 1-shot accuracy ") and lines[0].endswith("(6 tasks)")
    assert whole["method"] == "ProtoNet" and whole["test"]["on"] == "held-out alphabets: Tagalog"
    assert whole["train_loss"][-1] < whole["train_loss"][0]
    run_example("protonet_omniglot.py", *common, "--out", tmp_path / "cut", "--time-budget", 1e-9)
    resumed = run_example("protonet_omniglot.py", *common, "--out", tmp_path / "cut", "--resume",
                          tmp_path / "cut" / "last.pt")
    assert resumed["train_loss"] == whole["train_loss"]
    with pytest.raises(SystemExit):
        run_example("protonet_omniglot.py", *common, "--train-ways", 20, "--out", tmp_path / "x")
    assert "--train-ways 20 is more than the 7 training characters" in capsys.readouterr().err


def test_curves_plot_puts_the_runs_in_one_figure(tmp_path):
    a = json.loads((ROOT / "benchmarks" / "results" / "omniglot_small.json").read_text())
    b = {"steps": 4, "start_step": 0, "train_seconds": 60.0, "test": {"accuracy": 0.5, "ci95": 0.1},
         "validation": [{"step": 2, "accuracy": 0.4, "ci95": 0.1, "train_seconds": 30.0},
                        {"step": 4, "accuracy": 0.5, "ci95": 0.1, "train_seconds": 60.0}]}
    (tmp_path / "b.json").write_text(json.dumps(b))
    main = runpy.run_path(str(ROOT / "benchmarks" / "omniglot_curves.py"), run_name="__not_main__")["main"]
    main([f"MAML={ROOT / 'benchmarks' / 'results' / 'omniglot_small.json'}", f"B={tmp_path / 'b.json'}",
          "--out", str(tmp_path / "curves.png")])
    summary = json.loads((tmp_path / "curves.json").read_text())
    assert summary["B"]["x"] == [0.5, 1.0] and summary["B"]["test_accuracy"] == 0.5
    assert len(summary["MAML"]["x"]) == len(a["validation"])
    assert summary["MAML"]["test_accuracy"] == a["test"]["accuracy"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
