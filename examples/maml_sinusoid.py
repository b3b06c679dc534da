"""MAML (or Meta-SGD) on sinusoid regression — Finn et al. 2017, the README's main job.

Tasks: y = A sin(x + b), A ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5]; K=10 support and 10 query points;
an MLP 1-40-40-1; one inner SGD step (lr 0.01); Adam (1e-3) on the meta-objective, meta-batch 25, for
70 000 meta-steps. Evaluation: 600 held-out tasks (their own seed), K=10 support points, the MSE on
100 query points after 0..10 inner steps; the headline is the 1-step number.

    python examples/maml_sinusoid.py                    # the full protocol (compiled)
    python examples/maml_sinusoid.py --meta-sgd         # learned per-parameter inner learning rates
    python examples/maml_sinusoid.py --steps 3 --eager  # a smoke run
    python examples/maml_sinusoid.py --resume runs/maml_sinusoid/last.pt   # continue an interrupted run

The meta-step — inner loop, meta-gradient and Adam's update — is one function compiled by
torch.compile into one graph (docs/performance.md): torch.func.grad_and_value gives the
meta-gradient and torch.optim.adam.adam, torch's own functional Adam, updates the parameters
and the state of a torch.optim.Adam in place. The first run on a machine compiles it from an
empty cache (tens of seconds on 2 cores); later runs find it under TORCHINDUCTOR_CACHE_DIR
(default /tmp/torchinductor_$USER) and start in seconds. --eager runs the same function op by op.

Everything is reproducible from --seed: the task stream, the model initialisation and the evaluation
tasks (seed + 1) come from explicit keys. OUT/last.pt is written every --checkpoint-every steps and at
the end; --resume continues the same task stream from its step, and the result is bit-identical to an
uninterrupted run (same flags, same --threads).
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import time

import numpy as np
import optree
import torch
from torch.func import functional_call
from torch.optim.adam import adam as adam_update

import metabatch as mb
from metabatch import maml

# Inductor's C++ wrapper calls the step's ~40 kernels from C++ instead of one by one from Python: 1.2-1.8x
# faster steps than the default Python wrapper on this MLP, at no extra compile time (docs/performance.md).
COMPILE_OPTIONS = {"cpp_wrapper": True}

# What fixes the task stream and the updates: a checkpoint resumes only with the same values.
STREAM_ARGS = ("seed", "meta_batch", "inner_steps", "inner_lr", "meta_lr", "shots", "query",
               "first_order", "meta_sgd")


def make_model(key) -> torch.nn.Module:
    """MLP 1-40-40-1, initialised from ``key`` (torch's default init, with an explicit generator)."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                torch.nn.ReLU(), torch.nn.Linear(40, 1))
    g = mb.random.torch_generator(key)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
    return model


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos, nonneg = _int_at_least(1), _int_at_least(0)
    p.add_argument("--steps", type=nonneg, default=70_000, help="meta-training steps (default 70000)")
    p.add_argument("--meta-batch", type=pos, default=25, help="tasks per meta-step (default 25)")
    p.add_argument("--inner-steps", type=pos, default=1, help="inner SGD steps in training (default 1)")
    p.add_argument("--inner-lr", type=float, default=0.01, help="inner learning rate (Meta-SGD: its init)")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--shots", type=pos, default=10, help="K, support points per task (default 10)")
    p.add_argument("--query", type=pos, default=10, help="query points per training task (default 10)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (FOMAML)")
    p.add_argument("--meta-sgd", action="store_true", help="learn per-parameter inner learning rates")
    p.add_argument("--eager", action="store_true",
                   help="run the meta-step op by op instead of compiling it (no compile time; slower steps)")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old commands
    p.add_argument("--num-workers", type=nonneg, default=1, help="task-loader worker processes (default 1)")
    p.add_argument("--threads", type=pos, default=None,
                   help="torch intra-op threads (default: the cores this process may use minus --num-workers, "
                        f"at least 1: {mb.runtime.default_threads(1)} here with 1 worker)")
    p.add_argument("--eval-tasks", type=pos, default=600, help="evaluation tasks (default 600)")
    p.add_argument("--eval-points", type=pos, default=100, help="query points per evaluation task")
    p.add_argument("--seed", type=nonneg, default=0, help="the seed of everything (default 0)")
    p.add_argument("--checkpoint-every", type=nonneg, default=5000,
                   help="write OUT/last.pt every N steps, and at the end (0: only at the end; default 5000)")
    p.add_argument("--resume", type=pathlib.Path, default=None,
                   help="continue from a checkpoint (OUT/last.pt of an earlier run with the same flags)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/maml_sinusoid"),
                   help="results folder: metrics.json, adaptation.png, last.pt (default runs/maml_sinusoid)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = mb.runtime.default_threads(args.num_workers)
    return args


def mse_loss(model, params, data):
    x, y = data
    return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)


def evaluate(model, params, lr, args, max_steps: int = 10):
    """MSE after 0..max_steps inner steps on args.eval_tasks held-out tasks: (curve mean, curve CI95)."""
    loss_fn = functools.partial(mse_loss, model)
    specs = mb.batch_specs(args.seed + 1, num_tasks=args.eval_tasks, batch_size=args.eval_tasks,
                           n_ctx=args.shots, n_tgt=args.eval_points, num_batches=1)
    batch = mb.build_batch(functools.partial(mb.tasks.sinusoid, info=True), specs[0])
    support, query = batch["context"], batch["target"]
    params = {k: v.detach() for k, v in params.items()}
    lr = lr if isinstance(lr, float) else {k: v.detach() for k, v in lr.items()}

    def after(steps):
        def one(s, q):
            adapted = maml.adapt(loss_fn, params, s, steps=steps, lr=lr, first_order=True)
            return loss_fn(adapted, q)
        return torch.func.vmap(one)(support, query)

    curve = torch.stack([after(k) for k in range(max_steps + 1)])  # [steps+1, tasks]
    mean = curve.mean(1)
    ci = 1.96 * curve.std(1) / math.sqrt(curve.shape[1])
    return mean, ci, batch


def plot(model, params, lr, mean, ci, batch, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(len(mean))
    ax1.errorbar(steps, mean.numpy(), yerr=ci.numpy(), marker="o", capsize=3)
    ax1.set(xlabel="inner gradient steps", ylabel="query MSE (600 tasks, 95% CI)", yscale="log",
            title=f"{'Meta-SGD' if args.meta_sgd else 'MAML'}: adaptation, K={args.shots}")
    loss_fn = functools.partial(mse_loss, model)
    xs = torch.linspace(-5, 5, 200).unsqueeze(-1)
    amp, phase = batch["info"]["amplitude"][0].item(), batch["info"]["phase"][0].item()
    sx, sy = batch["context"][0][0], batch["context"][1][0]
    params = {k: v.detach() for k, v in params.items()}
    lr = lr if isinstance(lr, float) else {k: v.detach() for k, v in lr.items()}
    ax2.plot(xs, amp * torch.sin(xs + phase), "k--", label="true function")
    ax2.plot(xs, functional_call(model, params, (xs,)).detach(), label="meta-learned init (0 steps)")
    for k in (1, 10):
        adapted = maml.adapt(loss_fn, params, (sx, sy), steps=k, lr=lr, first_order=True)
        ax2.plot(xs, functional_call(model, adapted, (xs,)).detach(), label=f"after {k} step{'s' * (k > 1)}")
    ax2.scatter(sx, sy, c="k", zorder=5, label=f"K={args.shots} support points")
    ax2.set(xlabel="x", ylabel="y", title="one held-out task")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- the meta-step


def init_adam_state(opt: torch.optim.Adam) -> None:
    """Create Adam's per-parameter state as its first ``step()`` would, so that a compiled step can update it."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = {"step": torch.tensor(0.0),
                                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def make_meta_step(loss_fn, trainable: dict, opt: torch.optim.Adam, *, steps: int, lr: float,
                   first_order: bool = False):
    """The whole meta-step as one function ``step(support, query) -> loss``.

    The inner loop, the meta-gradient (``torch.func.grad_and_value``) and Adam's update
    (``torch.optim.adam.adam``, in place on ``trainable`` and on ``opt``'s state) — no ``.backward()``
    and no ``opt.step()``, whose graph breaks would split a compiled step (docs/performance.md): under
    ``torch.compile(..., fullgraph=True)`` this is one graph.

    Args:
        loss_fn: ``loss_fn(params, data)`` of one task.
        trainable: ``{"params": params}``, plus ``"lr": rates`` for Meta-SGD: the tensors ``opt`` updates.
        opt: a ``torch.optim.Adam`` over the tensors of ``trainable``, in any order (one parameter group).
        steps: inner steps; lr: the inner learning rate when ``trainable`` has no ``"lr"``;
            first_order: FOMAML.
    """
    leaves = optree.tree_leaves(trainable)
    if len(opt.param_groups) != 1 or ({id(p) for p in opt.param_groups[0]["params"]} != {id(t) for t in leaves}
                                      or len(opt.param_groups[0]["params"]) != len(leaves)):
        raise ValueError("make_meta_step(): opt must be an Adam over the tensors of trainable "
                         "(optree.tree_leaves(trainable)), in one parameter group.")
    init_adam_state(opt)
    state = [opt.state[p] for p in leaves]
    exp_avgs = [s["exp_avg"] for s in state]
    exp_avg_sqs = [s["exp_avg_sq"] for s in state]
    counts = [s["step"] for s in state]
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]

    def objective(t, support, query):
        return maml.meta_loss(loss_fn, t["params"], support, query, steps=steps, lr=t.get("lr", lr),
                              first_order=first_order)

    def step(support, query):
        plain = optree.tree_map(torch.Tensor.detach, trainable)
        grads, loss = torch.func.grad_and_value(objective)(plain, support, query)
        with torch.no_grad():
            adam_update(leaves, optree.tree_leaves(grads), exp_avgs, exp_avg_sqs, [], counts, foreach=False,
                        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return loss

    return step


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: pathlib.Path, step: int, trainable, opt, losses, args) -> None:
    mb.checkpoint.save({"step": step, "seed": args.seed, "args": {k: getattr(args, k) for k in STREAM_ARGS},
                        "eager": args.eager, "threads": args.threads,
                        "trainable": [t.detach().clone() for t in optree.tree_leaves(trainable)],
                        "opt": opt.state_dict(), "losses": torch.tensor(losses, dtype=torch.float32)}, path)


def load_checkpoint(path: pathlib.Path, args) -> dict:
    try:
        ckpt = mb.checkpoint.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--resume {path}: {err} Pass OUT/last.pt of an earlier run.") from None
    changed = {k: (ckpt["args"].get(k), getattr(args, k)) for k in STREAM_ARGS
               if ckpt["args"].get(k) != getattr(args, k)}
    if changed:
        raise SystemExit(f"--resume {path}: these settings differ from the checkpoint's (saved, now): {changed}; "
                         f"resume with the same values to continue its task stream.")
    if ckpt["step"] > args.steps:
        raise SystemExit(f"--resume {path}: the checkpoint is at step {ckpt['step']}, past --steps {args.steps}; "
                         f"raise --steps to train further.")
    if (ckpt["eager"], ckpt["threads"]) != (args.eager, args.threads):
        print(f"note: the checkpoint was trained with eager={ckpt['eager']}, threads={ckpt['threads']}; now "
              f"eager={args.eager}, threads={args.threads}: the same task stream, but the floating-point "
              f"results can differ from an uninterrupted run in the last bits.")
    return ckpt


# ------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads_before = mb.runtime.use_threads(args.threads)  # before compiling: kernels are built for it
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args):
    k_model, = mb.random.split(mb.random.fold_in(mb.random.key(args.seed), 1), 1)
    model = make_model(k_model)
    params = dict(model.named_parameters())
    trainable = {"params": params}
    if args.meta_sgd:  # Meta-SGD: one learnable inner learning rate per parameter entry
        trainable["lr"] = {k: torch.full_like(p, args.inner_lr, requires_grad=True) for k, p in params.items()}
    opt = torch.optim.Adam(optree.tree_leaves(trainable), lr=args.meta_lr)
    loss_fn = functools.partial(mse_loss, model)
    start, losses = 0, []
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, args)
        with torch.no_grad():
            for t, saved in zip(optree.tree_leaves(trainable), ckpt["trainable"], strict=False):
                t.copy_(saved)
        opt.load_state_dict(ckpt["opt"])
        start, losses = ckpt["step"], ckpt["losses"].tolist()
        print(f"resumed from {args.resume} at step {start}")

    step_fn = make_meta_step(loss_fn, trainable, opt, steps=args.inner_steps, lr=args.inner_lr,
                             first_order=args.first_order)
    if not args.eager:
        step_fn = torch.compile(step_fn, fullgraph=True, options=COMPILE_OPTIONS)
    specs = mb.batch_specs(args.seed, num_tasks=10**6, batch_size=args.meta_batch, n_ctx=args.shots,
                           n_tgt=args.query, num_batches=args.steps, start=start)
    loader = mb.task_loader(mb.tasks.sinusoid, specs, num_workers=args.num_workers)
    bar = None
    if not args.no_progress and start < args.steps:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc="meta-train", unit="step", mininterval=1.0)
    last = args.out / "last.pt"
    wall = time.perf_counter()
    first_step_s, step, running = None, start, None
    for batch in loader:
        loss = step_fn(batch["context"], batch["target"]).item()
        if first_step_s is None:
            first_step_s = time.perf_counter() - wall  # includes compiling
        losses.append(loss)
        step += 1
        running = loss if running is None else 0.99 * running + 0.01 * loss
        if bar is not None:
            bar.update(1)
            if step % 200 == 0:
                bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
            save_checkpoint(last, step, trainable, opt, losses, args)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - wall
    save_checkpoint(last, step, trainable, opt, losses, args)

    lr = trainable.get("lr", args.inner_lr)
    mean, ci, batch = evaluate(model, params, lr, args)
    done = step - start
    metrics = {
        "method": "Meta-SGD" if args.meta_sgd else ("FOMAML" if args.first_order else "MAML"),
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "compiled": not args.eager,
        "threads": torch.get_num_threads(),
        "resumed_at": start if args.resume is not None else None,
        "train_seconds": train_s,
        "first_step_seconds": first_step_s,
        "ms_per_step": 1000 * (train_s - (first_step_s or 0.0)) / max(1, done - 1),
        "post_adaptation_mse": {"mean": mean[1].item(), "ci95": ci[1].item(), "steps": 1,
                                "tasks": args.eval_tasks, "shots": args.shots},
        "mse_vs_inner_steps": {"mean": mean.tolist(), "ci95": ci.tolist()},
        "train_loss_every_100": losses[::100],
    }
    mb.checkpoint.save_json(metrics, args.out / "metrics.json")
    try:
        plot(model, params, lr, mean, ci, batch, args, args.out / "adaptation.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"trained {done} steps in {train_s:.1f} s ({metrics['ms_per_step']:.2f} ms/step after a first step of "
          f"{first_step_s or 0.0:.1f} s{'' if args.eager else ', compile included'}); results in {args.out}")
    print(f"final: post-adaptation MSE {mean[1].item():.3f} ± {ci[1].item():.3f} "
          f"(K={args.shots}, 1 step, {args.eval_tasks} tasks)")
    return metrics


if __name__ == "__main__":
    main()
