"""MAML (or Meta-SGD) on sinusoid regression — Finn et al. 2017, the README's main job.

Tasks: y = A sin(x + b), A ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5]; K=10 support and 10 query points;
an MLP 1-40-40-1; one inner SGD step (lr 0.01); Adam (1e-3) on the meta-objective, meta-batch 25, for
70 000 meta-steps. Evaluation: 600 held-out tasks (their own seed), K=10 support points, the MSE on
100 query points after 0..10 inner steps; the headline is the 1-step number.

    python examples/maml_sinusoid.py                    # the full protocol
    python examples/maml_sinusoid.py --meta-sgd         # learned per-parameter inner learning rates
    python examples/maml_sinusoid.py --steps 3          # a smoke run

Everything is reproducible from --seed: the task stream, the model initialisation and the evaluation
tasks (seed + 1) come from explicit keys.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import time

import numpy as np
import torch
from torch.func import functional_call

import metabatch as mb
from metabatch import maml


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=70_000, help="meta-training steps (default 70000)")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-step (default 25)")
    p.add_argument("--inner-steps", type=int, default=1, help="inner SGD steps in training (default 1)")
    p.add_argument("--inner-lr", type=float, default=0.01, help="inner learning rate (Meta-SGD: its init)")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--shots", type=int, default=10, help="K, support points per task (default 10)")
    p.add_argument("--query", type=int, default=10, help="query points per training task (default 10)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (FOMAML)")
    p.add_argument("--meta-sgd", action="store_true", help="learn per-parameter inner learning rates")
    p.add_argument("--compile", action="store_true", help="torch.compile the meta-step")
    p.add_argument("--num-workers", type=int, default=1, help="task-loader worker processes (default 1)")
    p.add_argument("--eval-tasks", type=int, default=600, help="evaluation tasks (default 600)")
    p.add_argument("--eval-points", type=int, default=100, help="query points per evaluation task")
    p.add_argument("--seed", type=int, default=0, help="the seed of everything (default 0)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/maml_sinusoid"),
                   help="results folder (metrics.json, adaptation.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


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


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    k_model, = mb.random.split(mb.random.fold_in(mb.random.key(args.seed), 1), 1)
    model = make_model(k_model)
    params = dict(model.named_parameters())
    lr = args.inner_lr
    outer = list(params.values())
    if args.meta_sgd:  # Meta-SGD: one learnable inner learning rate per parameter entry
        lr = {k: torch.full_like(p, args.inner_lr, requires_grad=True) for k, p in params.items()}
        outer += list(lr.values())
    opt = torch.optim.Adam(outer, lr=args.meta_lr)
    loss_fn = functools.partial(mse_loss, model)

    def meta_loss(params, lr, support, query):
        return maml.meta_loss(loss_fn, params, support, query, steps=args.inner_steps, lr=lr,
                              first_order=args.first_order)

    step_loss = torch.compile(meta_loss) if args.compile else meta_loss
    specs = mb.batch_specs(args.seed, num_tasks=10**6, batch_size=args.meta_batch, n_ctx=args.shots,
                           n_tgt=args.query, num_batches=args.steps)
    loader = mb.task_loader(mb.tasks.sinusoid, specs, num_workers=args.num_workers)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc="meta-train", unit="step", mininterval=1.0)
    history, start, running = [], time.perf_counter(), None
    for batch in loader:
        loss = step_loss(params, lr, batch["context"], batch["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        running = value if running is None else 0.99 * running + 0.01 * value
        step = len(history)
        history.append(value)
        if bar is not None:
            bar.update(1)
            if step % 200 == 0:
                bar.set_postfix(loss=f"{running:.3f}")
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - start

    mean, ci, batch = evaluate(model, params, lr, args)
    metrics = {
        "method": "Meta-SGD" if args.meta_sgd else ("FOMAML" if args.first_order else "MAML"),
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "train_seconds": train_s,
        "ms_per_step": 1000 * train_s / max(1, args.steps),
        "post_adaptation_mse": {"mean": mean[1].item(), "ci95": ci[1].item(), "steps": 1,
                                "tasks": args.eval_tasks, "shots": args.shots},
        "mse_vs_inner_steps": {"mean": mean.tolist(), "ci95": ci.tolist()},
        "train_loss_every_100": history[::100],
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        plot(model, params, lr, mean, ci, batch, args, args.out / "adaptation.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"trained {args.steps} steps in {train_s:.1f} s ({metrics['ms_per_step']:.2f} ms/step); "
          f"results in {args.out}")
    print(f"final: post-adaptation MSE {mean[1].item():.3f} ± {ci[1].item():.3f} "
          f"(K={args.shots}, 1 step, {args.eval_tasks} tasks)")
    return metrics


if __name__ == "__main__":
    main()
