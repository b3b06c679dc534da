"""The compile recipe (one graph), the main job's flags and exact resume, and the benchmarks' structure.

No timing is asserted here: speed lives in benchmarks/. These tests check what the speed rests on —
the meta-step traces into one graph with no break, the natural form's breaks are the ones the docs
name, a resumed run is bit-identical to an uninterrupted one — and that the benchmark scripts run (or
refuse cleanly) on a CPU-only machine.
"""

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import optree
import pytest
import torch

import metabatch as mb
from metabatch import maml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_example(name):
    # A real module (in sys.modules), not runpy's namespace: dynamo looks functions' modules up by name.
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return vars(module)


SINUSOID = _load_example("maml_sinusoid")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sinusoid_setup(meta_sgd=False, seed=0):
    model = SINUSOID["make_model"](mb.random.key(seed))
    params = dict(model.named_parameters())
    trainable = {"params": params}
    if meta_sgd:
        trainable["lr"] = {k: torch.full_like(p, 0.01, requires_grad=True) for k, p in params.items()}
    opt = torch.optim.Adam(optree.tree_leaves(trainable), lr=1e-3)
    loss_fn = functools.partial(SINUSOID["mse_loss"], model)
    specs = mb.batch_specs(seed, num_tasks=100, batch_size=4, n_ctx=10, n_tgt=10, num_batches=3)
    batches = [mb.build_batch(mb.tasks.sinusoid, specs[i]) for i in range(3)]
    return model, trainable, opt, loss_fn, batches


@pytest.mark.parametrize("meta_sgd, inner_steps, first_order", [(False, 1, False), (True, 2, False),
                                                                (False, 1, True)])
def test_meta_step_is_one_graph(meta_sgd, inner_steps, first_order):
    _, trainable, opt, loss_fn, batches = _sinusoid_setup(meta_sgd)
    step = SINUSOID["make_meta_step"](loss_fn, trainable, opt, steps=inner_steps, lr=0.01,
                                      first_order=first_order)
    explained = torch._dynamo.explain(step)(batches[0]["context"], batches[0]["target"])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.filterwarnings("ignore")  # dynamo's own warnings while it traces Optimizer.step and .grad
def test_natural_form_breaks_where_the_docs_say():
    """docs/performance.md: compiling zero_grad / backward / step breaks at backward and at Optimizer.step."""
    _, trainable, opt, loss_fn, batches = _sinusoid_setup()
    params = trainable["params"]

    def natural(support, query):
        opt.zero_grad()
        loss = maml.meta_loss(loss_fn, params, support, query, steps=1, lr=0.01)
        loss.backward()
        opt.step()
        return loss

    explained = torch._dynamo.explain(natural)(batches[0]["context"], batches[0]["target"])
    reasons = " ".join(b.reason for b in explained.break_reasons)
    assert explained.graph_break_count >= 1 and explained.graph_count >= 2
    assert "backward" in reasons


def test_meta_step_matches_backward_and_optimizer_step():
    """The recipe's update is torch.optim.Adam's: the same parameters as zero_grad / backward / step."""
    _, trainable, opt, loss_fn, batches = _sinusoid_setup()
    _, trainable2, opt2, loss_fn2, _ = _sinusoid_setup()
    step = SINUSOID["make_meta_step"](loss_fn, trainable, opt, steps=1, lr=0.01)
    for batch in batches:
        loss = step(batch["context"], batch["target"])
        opt2.zero_grad()
        loss2 = maml.meta_loss(loss_fn2, trainable2["params"], batch["context"], batch["target"], steps=1,
                               lr=0.01)
        loss2.backward()
        opt2.step()
        assert loss.item() == pytest.approx(loss2.item(), rel=1e-6)
    for a, b in zip(optree.tree_leaves(trainable), optree.tree_leaves(trainable2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert opt.state_dict()["state"][0]["step"].item() == 3.0


def test_meta_step_refuses_an_optimizer_over_other_tensors():
    _, trainable, _, loss_fn, _ = _sinusoid_setup()
    other = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="tree_leaves"):
        SINUSOID["make_meta_step"](loss_fn, trainable, other, steps=1, lr=0.01)


def test_help_shows_threads_default_and_eager(capsys):
    with pytest.raises(SystemExit):
        SINUSOID["parse_args"](["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"at least 1: {mb.runtime.default_threads(1)} here with 1 worker" in out
    for flag in ("--eager", "--threads", "--num-workers", "--resume", "--out", "--checkpoint-every"):
        assert flag in out
    args = SINUSOID["parse_args"]([])
    assert args.threads == mb.runtime.default_threads(args.num_workers) and not args.eager
    assert SINUSOID["parse_args"](["--num-workers", "0"]).threads == mb.runtime.default_threads(0)


def _run(*args):
    return SINUSOID["main"]([str(a) for a in args])


@pytest.mark.parametrize("mode", [["--eager"], []], ids=["eager", "compiled"])
def test_resume_is_bit_identical(tmp_path, capsys, mode):
    common = ("--meta-batch", 4, "--eval-tasks", 10, "--num-workers", 0, "--no-progress", "--threads", 1,
              "--checkpoint-every", 4, *mode)
    full = _run("--steps", 10, "--out", tmp_path / "full", *common)
    _run("--steps", 6, "--out", tmp_path / "first", *common)  # stops at 6: last.pt at step 6
    first = mb.checkpoint.load(tmp_path / "first" / "last.pt")
    assert first["step"] == 6 and len(first["losses"]) == 6
    resumed = _run("--steps", 10, "--out", tmp_path / "second", "--resume", tmp_path / "first" / "last.pt",
                   *common)
    assert "resumed from" in capsys.readouterr().out
    a = mb.checkpoint.load(tmp_path / "full" / "last.pt")
    b = mb.checkpoint.load(tmp_path / "second" / "last.pt")
    assert a["step"] == b["step"] == 10
    assert torch.equal(a["losses"], b["losses"])
    assert all(torch.equal(x, y) for x, y in zip(a["trainable"], b["trainable"], strict=True))
    for x, y in zip(a["opt"]["state"].values(), b["opt"]["state"].values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert full["mse_vs_inner_steps"] == resumed["mse_vs_inner_steps"]
    assert resumed["resumed_at"] == 6 and resumed["compiled"] == (mode == [])


def test_checkpoint_every_writes_midway(tmp_path):
    _run("--steps", 5, "--meta-batch", 2, "--eval-tasks", 5, "--num-workers", 0, "--no-progress", "--eager",
         "--checkpoint-every", 2, "--out", tmp_path)
    assert mb.checkpoint.load(tmp_path / "last.pt")["step"] == 5


def test_resume_refuses_other_settings_and_missing_files(tmp_path):
    common = ("--meta-batch", 2, "--eval-tasks", 5, "--num-workers", 0, "--no-progress", "--eager")
    _run("--steps", 2, "--out", tmp_path, *common)
    with pytest.raises(SystemExit, match="meta_batch"):
        _run("--steps", 4, "--out", tmp_path / "b", "--resume", tmp_path / "last.pt", *common[2:],
             "--meta-batch", 3)
    with pytest.raises(SystemExit, match="past --steps"):
        _run("--steps", 1, "--out", tmp_path / "b", "--resume", tmp_path / "last.pt", *common)
    with pytest.raises(SystemExit, match="no checkpoint"):
        _run("--steps", 4, "--out", tmp_path / "b", "--resume", tmp_path / "nope.pt", *common)


# -------------------------------------------------------------------------------- benchmarks


def _bench(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_maml_benchmark_cuda_refuses_cleanly_without_cuda(tmp_path):
    out = _bench("maml.py", "--device", "cuda", "--out", tmp_path)
    assert out.returncode == 2
    assert "CUDA is not available" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "maml_cuda.json").exists()


def test_maml_benchmark_structure_on_cpu(tmp_path):
    """A tiny run of benchmarks/maml.py writes its JSON with the rows, ratios and the machine."""
    out = _bench("maml.py", "--workloads", "W1", "--steps", "1", "--anchors", "metabatch,torch.func loop",
                 "--quick", "--out", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((tmp_path / "maml.json").read_text())
    assert {r["anchor"] for r in saved["results"]} == {"metabatch", "torch.func loop"}
    assert all("ms" in r and r["device"] == "cpu" for r in saved["results"])
    assert saved["machine"]["device"] == "cpu"
    assert any("vs torch.func loop" in line for line in saved["ratios"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_loader_pin_memory_row_refuses_cleanly_without_cuda():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import loader as loader_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = loader_bench.pin_memory_row(batches=4, workers=0)
    assert result == {"skipped": "CUDA is not available: pin_memory + non_blocking needs a GPU"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_loader_pin_memory_flag_refuses_cleanly_without_cuda(tmp_path):
    out = _bench("loader.py", "--pin-memory", "--out", tmp_path)
    assert out.returncode == 2 and "needs a GPU" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "loader_pin_memory.json").exists()


def test_compiled_meta_step_does_not_recompile():
    """The second call reuses the first call's graph (a guard on the rules' thread-local state once made it
    compile twice: the main job paid its compile time two times)."""
    _, trainable, opt, loss_fn, batches = _sinusoid_setup()
    step = torch.compile(SINUSOID["make_meta_step"](loss_fn, trainable, opt, steps=1, lr=0.01), fullgraph=True,
                         backend="eager")
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches:
            step(batch["context"], batch["target"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
