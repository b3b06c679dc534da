"""A conditional neural process (Garnelo et al. 2018) on Gaussian-process functions.

The CNP encodes every context pair (x, y) with an MLP, averages the codes into one representation r of
the task, and decodes (r, x) at each target input into a Gaussian: a mean and a standard deviation
0.1 + 0.9 * softplus(.) (a floor that keeps the likelihood from blowing up). Encoder
2-128-128-128-128, decoder 129-128-128-2, as in DeepMind's CNP notebook.

Tasks: mb.tasks.gp() (RBF kernel, length scale 0.6, output scale 1, noise 0.02, x ~ U[-2, 2]). The number
of context points is drawn per *batch* by mb.batch_specs(n_ctx=(3, 50)): every task of a batch has the
same n_ctx, so the batch is one dense tensor -- no padding, no masks -- and the next batch has another.
This was the original metabatch's use case. Each task also has 50 target points, disjoint from its context.

Targets and the context. Training follows the paper: the CNP is scored on the context *and* the
target points (the loop concatenates them), which teaches it to reproduce what it was shown. The
evaluation scores only the 50 disjoint target points -- prediction at inputs the model has not seen,
the harder and more honest number -- and reports the context-only score beside it in metrics.json.

Evaluation: 1000 held-out tasks from their own seed (--seed + 1), n_ctx drawn in 3..50 per batch of 25,
the log-likelihood per target point averaged within each task, mean ± 95 % CI over tasks. Two references
on the same tasks: the trivial predictor N(0, 1 + 0.02^2) (the GP prior, which ignores the context), and
the exact GP posterior with the true kernel (the best any model can do).

Measured with the defaults (15 000 steps of 16 tasks, Adam 1e-3, one loader worker, one torch thread;
139 s of training, 2.5 min in all, on the project's 2-core CPU machine while it was shared with other
work): target log-likelihood 0.30 ± 0.03 per point on 1000 held-out tasks, against -1.41 for the trivial
predictor and 1.94 for the exact GP posterior. By context size: -0.32 with 3-10 context points, 0.26 with
11-25, 0.50 with 26-50 (GP posterior 0.72, 1.95, 2.30). The training loss is still falling at the end.

    python examples/cnp.py                         # the default run (a few minutes on 2 CPU cores)
    python examples/cnp.py --steps 100000          # longer: the paper trains for far longer still
    python examples/cnp.py --steps 5 --eval-tasks 50 --no-progress      # a smoke run
    python examples/cnp.py --steps 20000 --resume runs/cnp/last.pt     # go on from the last checkpoint

--threads defaults to the cores this process may use minus --num-workers (at least 1):
metabatch.runtime.default_threads, 1 on a 2-core machine with the default worker.

Everything is reproducible from --seed: the task stream, the model initialisation and the evaluation
tasks come from explicit keys, and the result is the same for any --num-workers.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch
import torch.nn.functional as F

import metabatch as mb
from metabatch import maml


class CNP(torch.nn.Module):
    """Encoder MLP on (x, y) pairs, mean aggregation, decoder MLP on (r, x) -> (mean, std)."""

    def __init__(self, hidden: int = 128, min_std: float = 0.1):
        super().__init__()
        h = hidden
        self.encoder = torch.nn.Sequential(torch.nn.Linear(2, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                                           torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(),
                                           torch.nn.Linear(h, h))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(h + 1, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                                           torch.nn.ReLU(), torch.nn.Linear(h, 2))
        self.min_std = min_std

    def forward(self, x_ctx, y_ctx, x_tgt):
        """[..., n_ctx, 1] context, [..., n, 1] target inputs -> mean, std, each [..., n, 1]."""
        r = self.encoder(torch.cat([x_ctx, y_ctx], -1)).mean(-2, keepdim=True)   # one code per task
        out = self.decoder(torch.cat([r.expand(*x_tgt.shape[:-1], r.shape[-1]), x_tgt], -1))
        mean, raw = out.split(1, dim=-1)
        return mean, self.min_std + (1 - self.min_std) * F.softplus(raw)


def make_model(key, hidden: int = 128, min_std: float = 0.1) -> CNP:
    """A CNP initialised from ``key`` (torch's default init, with an explicit generator)."""
    model = CNP(hidden, min_std)
    g = mb.random.torch_generator(key)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
    return model


def normal_loglik(mean, std, y):
    """Per-point Gaussian log-density, [..., n, 1] -> [..., n]."""
    return (-0.5 * ((y - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).squeeze(-1)


def gp_posterior(task, x_ctx, y_ctx, x_tgt):
    """The exact GP predictive (mean, std) at x_tgt given the context, with the task family's kernel."""
    if task.length_scale[0] != task.length_scale[1] or task.output_scale[0] != task.output_scale[1]:
        raise ValueError(f"gp_posterior() needs the kernel of every task, but {task!r} draws its scales per "
                         f"task; use fixed length_scale and output_scale for this reference.")
    ls, scale, noise = task.length_scale[0], task.output_scale[0], task.noise
    x_ctx, y_ctx, x_tgt = (t.double() for t in (x_ctx, y_ctx, x_tgt))

    def kernel(a, b):
        return scale ** 2 * torch.exp(-0.5 * ((a - b.transpose(-1, -2)) / ls) ** 2)

    k_cc = kernel(x_ctx, x_ctx) + (noise ** 2 + 1e-6 * scale ** 2) * torch.eye(x_ctx.shape[-2], dtype=torch.float64)
    chol = torch.linalg.cholesky(k_cc)
    k_ct = kernel(x_ctx, x_tgt)
    mean = k_ct.transpose(-1, -2) @ torch.cholesky_solve(y_ctx, chol)
    v = torch.linalg.solve_triangular(chol, k_ct, upper=False)
    var = scale ** 2 + noise ** 2 - (v * v).sum(-2).unsqueeze(-1)
    return mean.float(), var.clamp_min(1e-12).sqrt().float()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15000, help="training steps (default 15000)")
    p.add_argument("--meta-batch", "--batch-size", dest="meta_batch", type=int, default=16,
                   help="tasks per batch (default 16; --batch-size is an older name)")
    p.add_argument("--min-ctx", type=int, default=3, help="fewest context points per batch (default 3)")
    p.add_argument("--max-ctx", type=int, default=50, help="most context points per batch (default 50)")
    p.add_argument("--n-tgt", type=int, default=50, help="target points per task, besides the context (50)")
    p.add_argument("--hidden", type=int, default=128, help="width of the MLPs (default 128)")
    p.add_argument("--min-std", type=float, default=0.1, help="lower bound of the predicted std (default 0.1)")
    p.add_argument("--meta-lr", "--lr", dest="meta_lr", type=float, default=1e-3,
                   help="Adam learning rate (default 1e-3; --lr is an older name)")
    p.add_argument("--num-workers", type=int, default=1, help="task-loader worker processes (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads while training (default: the cores this process may "
                        f"use minus --num-workers, at least 1: {mb.runtime.default_threads(1)} here with 1 "
                        f"worker)")
    p.add_argument("--eval-tasks", type=int, default=1000, help="held-out evaluation tasks (default 1000)")
    p.add_argument("--eval-batch", type=int, default=25, help="evaluation tasks per n_ctx draw (default 25)")
    p.add_argument("--seed", type=int, default=0, help="the seed of everything (default 0)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/cnp"),
                   help="results folder: metrics.json, predictions.png, last.pt (default runs/cnp)")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="write OUT/last.pt every N steps and at the end (default 1000; 0: only at the end)")
    p.add_argument("--resume", type=pathlib.Path, default=None,
                   help="continue from a checkpoint (OUT/last.pt): the same batches from its step on")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 1 <= args.min_ctx <= args.max_ctx:
        p.error(f"need 1 <= --min-ctx <= --max-ctx, got {args.min_ctx} and {args.max_ctx}")
    if args.threads is None:
        args.threads = mb.runtime.default_threads(args.num_workers)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.resume is not None and not args.resume.is_file():
        p.error(f"--resume {args.resume}: no such file (a checkpoint is written to OUT/last.pt)")
    if args.eval_tasks % args.eval_batch:
        p.error(f"--eval-batch ({args.eval_batch}) must divide --eval-tasks ({args.eval_tasks})")
    return args


@torch.no_grad()
def evaluate(model, task, args):
    """Per-task mean log-likelihood on held-out tasks: CNP, trivial predictor, exact GP posterior."""
    specs = mb.batch_specs(args.seed + 1, num_tasks=args.eval_tasks, batch_size=args.eval_batch,
                           n_ctx=(args.min_ctx, args.max_ctx), n_tgt=args.n_tgt,
                           num_batches=args.eval_tasks // args.eval_batch)
    prior_std = math.sqrt(task.output_scale[0] ** 2 + task.noise ** 2)
    rows = {"cnp": [], "cnp_on_context": [], "trivial": [], "gp_posterior": []}
    n_ctx = []
    for batch in mb.task_loader(task, specs, num_workers=0):
        (xc, yc), (xt, yt) = batch["context"], batch["target"]
        mean, std = model(xc, yc, torch.cat([xc, xt], 1))
        ll = normal_loglik(mean, std, torch.cat([yc, yt], 1))           # [tasks, n_ctx + n_tgt]
        k = xc.shape[1]
        rows["cnp"].append(ll[:, k:].mean(-1))
        rows["cnp_on_context"].append(ll[:, :k].mean(-1))
        rows["trivial"].append(normal_loglik(torch.zeros_like(yt), torch.full_like(yt, prior_std), yt).mean(-1))
        rows["gp_posterior"].append(normal_loglik(*gp_posterior(task, xc, yc, xt), yt).mean(-1))
        n_ctx.append(k)
    per_task = {name: torch.cat(v) for name, v in rows.items()}
    summary = {name: dict(zip(("mean", "ci95"), maml.mean_ci(v), strict=False)) for name, v in per_task.items()}
    by_batch = {"n_ctx": n_ctx, **{name: [v.mean().item() for v in vs] for name, vs in rows.items()}}
    return summary, by_batch


@torch.no_grad()
def plot(model, task, history, by_batch, args, path, sizes=(3, 10, 50), num_tasks=3, grid=200):
    """Predictions with ±2σ bands for a few held-out tasks at several context sizes; LL vs n_ctx."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({min(max(s, args.min_ctx), args.max_ctx) for s in sizes})
    specs = mb.batch_specs(args.seed + 2, num_tasks=num_tasks, batch_size=num_tasks, n_ctx=max(sizes),
                           n_tgt=grid, num_batches=1)
    batch = mb.build_batch(task, specs[0])
    (xc, yc), (xt, yt) = batch["context"], batch["target"]
    order = xt.argsort(1)
    xt, yt = xt.gather(1, order), yt.gather(1, order)       # the function on a sorted grid of inputs
    fig, axes = plt.subplots(num_tasks + 1, len(sizes), figsize=(4 * len(sizes), 2.8 * (num_tasks + 1)),
                             squeeze=False)
    for j, k in enumerate(sizes):   # the first k context points of a task are a random subset of its 50
        mean, std = model(xc[:, :k], yc[:, :k], xt)
        gp_mean, gp_std = gp_posterior(task, xc[:, :k], yc[:, :k], xt)
        for i in range(num_tasks):
            ax, x = axes[i, j], xt[i, :, 0]
            ax.plot(x, yt[i, :, 0], color="0.6", lw=1, label="true function")
            ax.plot(x, mean[i, :, 0], color="C0", label="CNP mean")
            ax.fill_between(x, mean[i, :, 0] - 2 * std[i, :, 0], mean[i, :, 0] + 2 * std[i, :, 0],
                            color="C0", alpha=0.25, label="CNP ±2σ")
            ax.plot(x, gp_mean[i, :, 0] + 2 * gp_std[i, :, 0], "k:", lw=0.8, label="GP posterior ±2σ")
            ax.plot(x, gp_mean[i, :, 0] - 2 * gp_std[i, :, 0], "k:", lw=0.8)
            ax.scatter(xc[i, :k, 0], yc[i, :k, 0], c="k", s=12, zorder=5, label="context")
            ax.set(ylim=(-3.5, 3.5), title=f"held-out task {i}, {k} context points")
    ax_ll, ax_loss = axes[-1, 0], axes[-1, 1 if len(sizes) > 1 else 0]
    for name, style in (("gp_posterior", "k^"), ("cnp", "C0o"), ("trivial", "C3s")):
        ax_ll.plot(by_batch["n_ctx"], by_batch[name], style, ms=4, label=f"{name.replace('_', ' ')} (held out)")
    ax_ll.set(xlabel="context points", ylabel="target log-lik / point", title="held-out batches")
    if ax_loss is not ax_ll:
        window = max(1, len(history) // 50)
        smooth = torch.tensor(history).unfold(0, window, window).mean(1) if len(history) >= window else []
        ax_loss.plot([window * (i + 0.5) for i in range(len(smooth))], list(smooth))
        ax_loss.set(xlabel="step", ylabel="NLL / point", title="training")
    for ax in axes[-1, 2:]:
        ax.axis("off")
    legends = [axes[0, 0].get_legend_handles_labels(), ax_ll.get_legend_handles_labels()]
    if len(sizes) > 2:   # both legends in the empty panel, clear of the data
        axes[-1, 2].legend(legends[0][0] + legends[1][0], legends[0][1] + legends[1][1], loc="center")
    else:
        axes[0, 0].legend(fontsize=7, loc="lower left")
        ax_ll.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    threads = mb.runtime.use_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


# What a checkpoint must agree on to continue the same run (the rest, e.g. --steps, may change).
SAME_RUN = ("seed", "meta_batch", "min_ctx", "max_ctx", "n_tgt", "hidden", "min_std", "meta_lr")


def checkpoint(model, opt, step, history, n_ctx_seen, args):
    mb.checkpoint.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "train_nll": history, "n_ctx_per_step": n_ctx_seen,
                        "run": {k: getattr(args, k) for k in SAME_RUN}}, args.out / "last.pt")


def run(args):
    args.out.mkdir(parents=True, exist_ok=True)
    model = make_model(mb.random.fold_in(mb.random.key(args.seed), 1), args.hidden, args.min_std)
    opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    history, n_ctx_seen, first = [], [], 0
    if args.resume is not None:
        ckpt = mb.checkpoint.load(args.resume)
        differs = {k: (v, getattr(args, k)) for k, v in ckpt["run"].items() if v != getattr(args, k)}
        if differs:
            raise SystemExit(f"--resume {args.resume}: the checkpoint is of another run; these flags differ "
                             f"(checkpoint, now): {differs}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        first, history, n_ctx_seen = ckpt["step"], ckpt["train_nll"], ckpt["n_ctx_per_step"]
        print(f"resumed from {args.resume} at step {first}")
    task = mb.tasks.gp()           # the CNP paper's GP; picklable, so it goes to the workers as is
    specs = mb.batch_specs(args.seed, num_tasks=10**6, batch_size=args.meta_batch,
                           n_ctx=(args.min_ctx, args.max_ctx), n_tgt=args.n_tgt, num_batches=args.steps)
    loader = mb.task_loader(task, specs.replace(start=first), num_workers=args.num_workers)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=first, desc="train CNP", unit="step", mininterval=1.0)
    running, start = None, time.perf_counter()
    for step, batch in enumerate(loader, first):   # specs.replace(start=k): the stream from step k on
        (xc, yc), (xt, yt) = batch["context"], batch["target"]
        x_all, y_all = torch.cat([xc, xt], 1), torch.cat([yc, yt], 1)   # the paper: targets include the context
        mean, std = model(xc, yc, x_all)
        loss = -normal_loglik(mean, std, y_all).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        n_ctx_seen.append(xc.shape[1])
        running = history[-1] if running is None else 0.99 * running + 0.01 * history[-1]
        if bar is not None:
            bar.update(1)
            if len(history) % 100 == 1:
                bar.set_postfix(nll=f"{running:.3f}", n_ctx=xc.shape[1])
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            checkpoint(model, opt, step + 1, history, n_ctx_seen, args)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - start
    checkpoint(model, opt, max(first, args.steps), history, n_ctx_seen, args)

    summary, by_batch = evaluate(model, task, args)
    metrics = {
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "train_seconds": train_s,
        "ms_per_step": 1000 * train_s / max(1, args.steps - first),
        "target_loglik": {**summary["cnp"], "tasks": args.eval_tasks, "per": "point"},
        "context_loglik": summary["cnp_on_context"],
        "trivial_loglik": summary["trivial"],
        "gp_posterior_loglik": summary["gp_posterior"],
        "eval_by_batch": by_batch,
        "n_ctx_per_step": n_ctx_seen,
        "train_nll": history,
    }
    mb.checkpoint.save_json(metrics, args.out / "metrics.json")
    try:
        plot(model, task, history, by_batch, args, args.out / "predictions.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    s = summary
    print(f"trained {args.steps} steps in {train_s:.1f} s ({metrics['ms_per_step']:.1f} ms/step); "
          f"results in {args.out}")
    print(f"references on the same tasks: trivial predictor {s['trivial']['mean']:.2f}, "
          f"exact GP posterior {s['gp_posterior']['mean']:.2f}")
    print(f"final: target log-likelihood {s['cnp']['mean']:.3f} ± {s['cnp']['ci95']:.3f} per point "
          f"({args.eval_tasks} tasks)")
    return metrics


if __name__ == "__main__":
    main()
