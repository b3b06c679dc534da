"""metabatch.distributed and examples/maml_ddp.py, on 2 CPU ranks (gloo) under torchrun.

The guarantees: every rank loads only its share of each global batch; the all-reduced meta-gradient of
every step equals the single-process meta-gradient of the whole global batch (float64, 1e-9 relative);
the loss curve is that of one process; resuming from a checkpoint continues the exact same stream.
"""

import functools
import json
import os
import pathlib
import runpy
import signal
import socket
import subprocess
import sys

import optree
import pytest
import torch
import torch.distributed as dist

import metabatch as mb
from metabatch import maml

from .test_examples import run_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "maml_ddp.py"
SEED, META_BATCH, STEPS = 3, 8, 6
ARGS = ("--steps", STEPS, "--meta-batch", META_BATCH, "--seed", SEED, "--dtype", "float64",
        "--eval-tasks", 10, "--log-every", 0, "--checkpoint-every", 3, "--device", "cpu")
TIMEOUT_S = 120


# ------------------------------------------------------------------------ without a process group


def test_one_rank_without_a_process_group():
    assert not dist.is_initialized()
    assert mb.distributed.rank_and_world_size() == (0, 1)
    assert mb.distributed.shard() == {"rank": 0, "world_size": 1}
    specs = mb.batch_specs(0, num_tasks=20, batch_size=4, n_ctx=2, n_tgt=3, **mb.distributed.shard())
    assert specs[5] == mb.batch_specs(0, num_tasks=20, batch_size=4, n_ctx=2, n_tgt=3)[5]


def test_torchrun_environment_without_a_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="init_process_group"):
        mb.distributed.shard()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert mb.distributed.shard() == {"rank": 0, "world_size": 1}


def test_group_without_a_process_group_is_an_error():
    with pytest.raises(ValueError, match="group="):
        mb.distributed.rank_and_world_size(group=object())


def test_one_rank_leaves_values_and_grads_alone():
    w = torch.arange(3.0, requires_grad=True)
    (w ** 2).sum().backward()
    grad = w.grad
    mb.distributed.all_reduce_grads([w])
    assert w.grad is grad and torch.equal(grad, torch.tensor([0.0, 2.0, 4.0]))
    tree = {"w": w, "n": (torch.ones(2),)}
    out = mb.distributed.pmean(tree)
    assert optree.tree_structure(out) == optree.tree_structure(tree)
    assert torch.equal(out["w"], w) and not out["w"].requires_grad


@pytest.mark.parametrize("bad, match", [
    ({"n": torch.ones(2, dtype=torch.int64)}, "torch.int64"),
    ({"n": 1.0}, "float"),
    ([torch.ones(2).to_sparse()], "sparse"),
])
def test_pmean_rejects_what_it_cannot_average(bad, match):
    with pytest.raises(TypeError, match=match):
        mb.distributed.pmean(bad)


# ------------------------------------------------------------------------------- under torchrun


def _unavailable() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not built into this torch"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build"
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError as err:
        return f"torchrun (torch.distributed.run) cannot be imported: {err}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
    except OSError as err:
        return f"no local TCP socket for torchrun's rendezvous: {err}"
    return None


def torchrun(script, *args, nproc=2):
    """Run ``script`` on ``nproc`` CPU ranks; kill the whole process group on timeout."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed (exit {proc.returncode}):\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two torchrun launches of examples/maml_ddp.py: 6 steps from scratch, and a resume at step 3."""
    tmp = tmp_path_factory.mktemp("ddp")
    full, resumed = tmp / "full", tmp / "resumed"
    torchrun(EXAMPLE, *ARGS, "--num-workers", 1, "--trace", "--out", full)
    ckpt = full / "checkpoints" / "step_0000003.pt"
    torchrun(EXAMPLE, *ARGS, "--num-workers", 0, "--trace", "--out", resumed, "--resume", ckpt)
    return full, resumed


def load(run, what):
    if what == "metrics":
        return json.loads((run / "metrics.json").read_text())
    return torch.load(run / "trace" / f"{what}.pt", weights_only=True)


def global_specs():
    return mb.batch_specs(SEED, num_tasks=10**6, batch_size=META_BATCH, n_ctx=10, n_tgt=10)


def relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.mark.slow
def test_two_ranks_primitives():
    assert "checks ok" in torchrun(ROOT / "tests" / "distributed_checks.py")


@pytest.mark.slow
def test_each_rank_loads_its_share_of_every_global_batch(runs):
    full, _ = runs
    ranks = [load(full, "rank0"), load(full, "rank1")]
    specs = global_specs()
    for step in range(STEPS):
        shares = [r[step] for r in ranks]
        assert [s["step"] for s in shares] == [step, step]
        assert [s["offset"] for s in shares] == [0, META_BATCH // 2]
        assert shares[0]["indices"] + shares[1]["indices"] == list(specs[step].indices)
        assert shares[0]["loss"] == shares[1]["loss"]  # the all-reduced loss, the same on every rank


@pytest.mark.slow
def test_all_reduced_meta_gradient_is_the_global_batch_meta_gradient(runs):
    full, _ = runs
    ns = runpy.run_path(str(EXAMPLE), run_name="__not_main__")
    model = ns["make_model"](mb.random.key(0)).double()  # the architecture; parameters come from the trace
    loss_fn = functools.partial(ns["mse_loss"], model)
    specs = global_specs()
    trace = load(full, "rank0")
    assert [r["step"] for r in trace] == list(range(STEPS))
    for record in trace:
        params = {k: v.clone().requires_grad_() for k, v in record["params"].items()}
        batch = optree.tree_map(torch.Tensor.double, mb.build_batch(mb.tasks.sinusoid, specs[record["step"]]))
        loss = maml.meta_loss(loss_fn, params, batch["context"], batch["target"], steps=1, lr=0.01)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        assert relative_difference(record["grads"], grads) <= 1e-9, record["step"]
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-9, abs=0)


@pytest.mark.slow
def test_loss_curve_is_the_same_for_one_and_two_ranks(runs, tmp_path):
    full, _ = runs
    one = run_example("maml_ddp.py", *ARGS, "--num-workers", 0, "--out", tmp_path)
    two = load(full, "metrics")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(two["train_loss"]) == STEPS
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-9, abs=0)
    assert two["post_adaptation_mse"]["mean"] == pytest.approx(one["post_adaptation_mse"]["mean"], rel=1e-9)


@pytest.mark.slow
def test_resume_under_torchrun_continues_the_same_stream(runs):
    full, resumed = runs
    a, b = load(full, "rank0"), load(resumed, "rank0")
    assert [r["step"] for r in b] == [3, 4, 5]
    for x, y in zip(a[3:], b, strict=True):
        assert x["indices"] == y["indices"] and x["loss"] == y["loss"]
        assert all(torch.equal(x["grads"][k], y["grads"][k]) for k in x["grads"])
    assert [r["indices"] for r in load(full, "rank1")[3:]] == [r["indices"] for r in load(resumed, "rank1")]
    assert load(resumed, "metrics")["train_loss"] == load(full, "metrics")["train_loss"]
    assert load(resumed, "metrics")["start"] == 3


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    full, _ = runs
    ckpt = full / "checkpoints" / "step_0000003.pt"
    one = run_example("maml_ddp.py", *ARGS, "--num-workers", 0, "--out", tmp_path, "--resume", ckpt)
    assert one["start"] == 3
    assert one["train_loss"] == pytest.approx(load(full, "metrics")["train_loss"], rel=1e-9, abs=0)
    with pytest.raises(ValueError, match=r"\{'meta_batch': \(8, 4\)\}"):
        run_example("maml_ddp.py", *ARGS, "--meta-batch", 4, "--out", tmp_path / "x", "--resume", ckpt)
    # the checkpoint's optimizer state carries its learning rate: another --meta-lr would be ignored
    with pytest.raises(ValueError, match=r"\{'meta_lr': \(0.001, 0.01\)\}"):
        run_example("maml_ddp.py", *ARGS, "--meta-lr", 0.01, "--out", tmp_path / "y", "--resume", ckpt)
    with pytest.raises(ValueError, match=r"at step 3, past --steps 2; pass --steps 3 or more"):
        run_example("maml_ddp.py", *ARGS, "--steps", 2, "--out", tmp_path / "z", "--resume", ckpt)
