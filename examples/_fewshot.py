"""The code that examples/maml_omniglot.py and examples/maml_miniimagenet.py share.

Each script loads its data into ``sample_task`` functions and calls :func:`run`; everything else is here:
the command line (with MAML-Pytorch's flag names as aliases), the conv4 model, the training loop
(task_loader, second-order MAML with an optional first-order warm-up, validation, best and last
checkpoints, exact resume), the evaluation over a fixed set of tasks (mean ± 95 % CI), the learning-curve
plot and metrics.json.

Seeds: everything comes from ``--seed`` through explicit keys. The training stream is
``batch_specs(seed, ...)``; the model is initialised from ``fold_in(key(seed), 1)``; the data set
splits use ``fold_in(key(seed), 2)``; the validation tasks are ``batch_specs(seed + 1, ...)``; the test
tasks ``batch_specs(--eval-seed, ...)``, the same for every training seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import time

import numpy as np
import optree
import torch
import torch.nn.functional as F

import metabatch as mb
from metabatch import maml

# What fixes the batch stream and the updates: a checkpoint only resumes with the same values.
STREAM_ARGS = ("seed", "ways", "shots", "query", "meta_batch", "inner_steps", "inner_lr", "meta_lr",
               "first_order", "first_order_steps", "chunk_size", "image_size", "val_classes", "channels",
               "no_rotate", "shift", "flip", "lr_schedule")


# ----------------------------------------------------------------------------- command line


def int_at_least(low: int):
    """An argparse `type=` for ints >= `low` (the scripts share it)."""
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def parser(doc: str, defaults: dict, upstream: dict | None, inner_loop: bool = True) -> argparse.ArgumentParser:
    """The flags the scripts share. `defaults`: this script's values; `upstream`: MAML-Pytorch's.

    Every MAML-Pytorch flag (``--n_way`` ...) is an alias of metabatch's (``--ways`` ...): both set the
    same argument, and the help shows the two defaults side by side (`upstream=None`: no aliases).
    `inner_loop=False` (prototypical networks) leaves out the inner-loop flags.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = defaults

    def flag(name, alias, help_, **kw):
        dest = name[2:].replace("-", "_")
        alias = alias if upstream is not None else None
        names = [name] + ([alias] if alias else [])
        fallback = kw.pop("default", None)
        ours = d.get(dest, fallback)
        theirs = f"; MAML-Pytorch {alias} default {upstream[alias[2:]]}" if alias else ""
        p.add_argument(*names, dest=dest, default=ours, help=f"{help_} (default {ours}{theirs})", **kw)

    pos, nonneg = int_at_least(1), int_at_least(0)
    flag("--ways", "--n_way", "N, classes per task", type=int_at_least(2))
    flag("--shots", "--k_spt", "K, support images per class", type=pos)
    flag("--query", "--k_qry", "query images per class in training tasks", type=pos)
    flag("--image-size", "--imgsz", "image side in pixels", type=pos)
    flag("--meta-batch", "--task_num", "tasks per meta-step", type=pos)
    flag("--meta-lr", "--meta_lr", "Adam learning rate of the outer step", type=_positive_float)
    if inner_loop:
        flag("--inner-lr", "--update_lr", "inner SGD learning rate", type=_positive_float)
        flag("--inner-steps", "--update_step", "inner SGD steps in training", type=pos)
        flag("--test-steps", "--update_step_test", "inner SGD steps at validation and test time", type=pos)
    else:
        p.set_defaults(inner_lr=None, inner_steps=0, test_steps=0, first_order=False, first_order_steps=0)
    flag("--steps", None, "meta-steps of training (MAML-Pytorch's --epoch counts otherwise)", type=nonneg)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.get("lr_schedule", "constant"),
                   help="meta learning rate: constant, or cosine decay from --meta-lr to 0 at --steps "
                        f"(default {d.get('lr_schedule', 'constant')})")
    if inner_loop:
        flag("--first-order-steps", None, "first-order (FOMAML) warm-up: the first N meta-steps skip "
             "second-order terms", type=nonneg)
        p.add_argument("--first-order", action="store_true", help="first-order MAML (FOMAML) throughout")
    flag("--chunk-size", None, "vmap this many tasks at a time in the meta-step (0: all at once)", type=nonneg)
    flag("--eval-query", None, "query images per class in validation and test tasks", type=pos, default=15)
    flag("--eval-tasks", None, "test tasks (mean and 95%% CI)", type=pos, default=600)
    flag("--val-tasks", None, "validation tasks, at every --val-every steps", type=pos)
    flag("--val-every", None, "validate (and write last.pt) every N meta-steps (0: only at the end)",
         type=nonneg)
    flag("--eval-batch", None, "tasks per batch at validation and test time", type=pos, default=50)
    flag("--eval-seed", None, "seed of the test tasks (the same for every training seed)", type=nonneg,
         default=1000)
    flag("--seed", None, "the seed of everything else", type=nonneg, default=0)
    flag("--num-workers", None, "task-loader worker processes", type=nonneg, default=1)
    workers = p.get_default("num_workers")
    p.add_argument("--threads", type=nonneg, default=None,
                   help="torch intra-op threads in the main process (default: the cores this process may use "
                        f"minus --num-workers, at least 1: {mb.runtime.default_threads(workers)} here with "
                        f"{workers} worker{'s' if workers != 1 else ''}; 0: torch's own default, one per core)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default auto)")
    p.add_argument("--tf32", action="store_true", help="CUDA only: TF32 matmuls and convolutions")
    flag("--time-budget", None, "stop training after this many minutes (checkpoint and evaluate as if "
         "--steps ended there; the step count then depends on the machine)", type=_positive_float,
         default=None)
    p.add_argument("--resume", type=pathlib.Path, default=None,
                   help="continue from a checkpoint (OUT/last.pt): the same batch stream from its step")
    p.add_argument("--out", type=pathlib.Path, default=d["out"],
                   help=f"results folder: metrics.json, learning_curve.png, best.pt, last.pt (default {d['out']})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check(p: argparse.ArgumentParser, args, *, num_classes: int, per_class: int):
    """Cross-flag checks, with the fix in the message (argparse exits with status 2)."""
    if args.ways > num_classes:
        p.error(f"--ways {args.ways} is more than the {num_classes} training classes; lower --ways.")
    for name, n_query in (("--query", args.query), ("--eval-query", args.eval_query)):
        if args.shots + n_query > per_class:
            p.error(f"--shots {args.shots} + {name} {n_query} = {args.shots + n_query} images per class, "
                    f"but every class has {per_class}; lower {name} or --shots.")


# ----------------------------------------------------------------------------------- model


def conv4(key, *, in_channels: int, ways: int, channels: int, image_size: int, pool: str,
          track_running_stats: bool = False) -> torch.nn.Module:
    """Finn et al.'s conv4: 4 x [3x3 conv, BatchNorm (batch statistics), ReLU], then a linear head.

    `track_running_stats=True` gives the batch norms running-statistics buffers, used only in eval mode
    (MAML++'s per-step statistics); metabatch's vmapped rules normalise with batch statistics in training.

    ``pool="stride"`` (their Omniglot net): stride-2 convolutions, 28 -> 14 -> 7 -> 4 -> 2.
    ``pool="max"`` (their mini-ImageNet net): stride-1 convolutions, each followed by 2x2 max-pooling,
    84 -> 42 -> 21 -> 10 -> 5. Weights He-normal (as MAML-Pytorch), biases 0, from ``key``.
    """
    layers = []
    for i in range(4):
        stride = 2 if pool == "stride" else 1
        layers += [torch.nn.Conv2d(in_channels if i == 0 else channels, channels, 3, stride, padding=1),
                   torch.nn.BatchNorm2d(channels, track_running_stats=track_running_stats), torch.nn.ReLU()]
        if pool == "max":
            layers.append(torch.nn.MaxPool2d(2))
    body = torch.nn.Sequential(*layers, torch.nn.Flatten())
    with torch.no_grad():
        features = body(torch.zeros(2, in_channels, image_size, image_size)).shape[1]
    model = torch.nn.Sequential(*body, torch.nn.Linear(features, ways))
    g = mb.random.torch_generator(key)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
                m.bias.zero_()
    return model


def split_classes(num_classes: int, holdout: int, seed: int) -> tuple:
    """(kept, held-out) class indices, ``holdout`` of them drawn from ``fold_in(key(seed), 2)``."""
    perm = mb.random.numpy_rng(mb.random.fold_in(mb.random.key(seed), 2)).permutation(num_classes)
    return sorted(perm[holdout:].tolist()), sorted(perm[:holdout].tolist())


@dataclasses.dataclass(frozen=True)
class Augmented:
    """``sample_task`` with two more augmentations for character images, drawn from ``fold_in(key, 1)``.

    ``flip``: mirror each class of a task, with probability 1/2 (all its support and query images): a
    mirrored character is a new character, as a rotated one is. ``shift``: move every image by up to
    ``shift`` pixels in x and y (zero fill). ``sample_task`` keeps drawing from ``key`` itself. A frozen
    module-level dataclass, so it pickles for any worker start method.
    """

    sample_task: object
    shift: int = 0
    flip: bool = False

    def __call__(self, key, idx, n_ctx, n_tgt):
        task = self.sample_task(key, idx, n_ctx, n_tgt)
        rng = mb.random.numpy_rng(mb.random.fold_in(key, 1))
        ways = int(task["context"][1].max()) + 1
        mirror = rng.random(ways) < 0.5 if self.flip else np.zeros(ways, bool)
        p = self.shift
        for part in ("context", "target"):
            x, y = task[part]                                   # [n, C, H, W] float32, labels [n]
            x = np.where(mirror[y][:, None, None, None], x[..., ::-1], x)
            if p:
                h, w = x.shape[-2:]
                padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)])
                dy, dx = rng.integers(0, 2 * p + 1, size=(2, len(x)))
                x = np.stack([padded[i, ..., dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])
            task[part] = (np.ascontiguousarray(x, dtype=np.float32), y)
        return task


# ------------------------------------------------------------------------------- devices


def device_for(args) -> torch.device:
    """The device, with the CUDA knobs MAML-Pytorch users expect applied only where CUDA is present."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here; use --device auto or cpu.")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if not cuda:
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    return torch.device("cuda")


def to_device(batch, device):
    """`batch` (a pytree of tensors) on `device`; on the CPU, as it is."""
    if device.type == "cpu":
        return batch
    return optree.tree_map(lambda t: t.to(device, non_blocking=True), batch)


# ------------------------------------------------------------------------------- methods


@dataclasses.dataclass
class Method:
    """What a meta-step and an evaluation compute. `maml_method` is plain MAML from the flags; the
    scripts build others (MAML++ in maml_omniglot.py, prototypical networks in protonet_omniglot.py).

    `meta_loss(model, params, batch, step) -> scalar` is back-propagated and stepped by Adam;
    `evaluator(model, params, device)` returns `batch -> per-task accuracy [T]` for one round of
    validation or testing; `extra` holds meta-parameters outside the model (learned inner rates),
    optimised and checkpointed with it; `stream_args` names more flags a resumed run must share;
    `adapt(params, x, labels, device) -> predict(query_x)`, if given, adapts to one task (Lake et al.'s
    one-shot runs); `None` for plain MAML's.
    """

    name: str
    meta_loss: object
    evaluator: object
    extra: dict = dataclasses.field(default_factory=dict)
    stream_args: tuple = ()
    adapt: object = None


def maml_method(args) -> Method:
    """Second-order MAML (FOMAML with --first-order, a first-order warm-up with --first-order-steps)."""
    def meta_loss(model, params, batch, step):
        first_order = args.first_order or step < args.first_order_steps
        return maml.meta_loss(mb.nn.objective(model, F.cross_entropy), params, batch["context"], batch["target"],
                              steps=args.inner_steps, lr=args.inner_lr, first_order=first_order,
                              chunk_size=args.chunk_size or None)

    def evaluator(model, params, device):
        loss_fn = mb.nn.objective(model, F.cross_entropy)
        acc_fn = mb.nn.objective(model, mb.nn.accuracy)

        def per_task(batch):
            return maml.evaluate(loss_fn, params, batch["context"], batch["target"], steps=args.test_steps,
                                 lr=args.inner_lr, metric_fn=acc_fn).per_task_metric
        return per_task

    return Method("FOMAML" if args.first_order else "MAML", meta_loss, evaluator)


# ---------------------------------------------------------------------------- evaluation


def accuracy_on(model, params, sample_task, *, num_tasks: int, seed: int, args, device,
                method: Method | None = None) -> torch.Tensor:
    """Per-task query accuracy of ``num_tasks`` fixed tasks (``batch_specs(seed, ...)``), float64 [T]."""
    per_task_accuracy = (method or maml_method(args)).evaluator(model, params, device)
    batch_size = min(args.eval_batch, num_tasks)
    specs = mb.batch_specs(seed, num_tasks=num_tasks, batch_size=batch_size, n_ctx=args.shots,
                           n_tgt=args.eval_query, num_batches=math.ceil(num_tasks / batch_size))
    loader = mb.task_loader(sample_task, specs, num_workers=min(args.num_workers, len(specs)),
                            pin_memory=device.type == "cuda")
    per_task = []
    for batch in loader:
        batch = to_device(batch, device)
        per_task.append(per_task_accuracy(batch).double().cpu())
    return torch.cat(per_task)[:num_tasks]


# ---------------------------------------------------------------------------- checkpoints


def _jsonable(args) -> dict:
    return {k: (str(v) if isinstance(v, pathlib.Path) else
                [str(x) for x in v] if isinstance(v, list) else v) for k, v in vars(args).items()}


def save(path: pathlib.Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def load_checkpoint(path: pathlib.Path, args, stream_args: tuple = ()) -> dict:
    if not path.is_file():
        raise SystemExit(f"--resume {path}: no such checkpoint; pass OUT/last.pt of an earlier run.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "opt" not in ckpt:
        raise SystemExit(f"--resume {path}: this checkpoint holds no optimizer state (best.pt?); "
                         f"resume from last.pt.")
    saved = ckpt["args"]
    changed = {k: (saved.get(k), getattr(args, k, None)) for k in STREAM_ARGS + tuple(stream_args)
               if saved.get(k) != getattr(args, k, None)}
    if changed:
        raise SystemExit(f"--resume {path}: these settings differ from the checkpoint's (saved, now): "
                         f"{changed}; resume with the same values to continue its batch stream.")
    if args.lr_schedule == "cosine" and saved.get("steps") != args.steps:
        raise SystemExit(f"--resume {path}: the cosine schedule was laid out for --steps {saved.get('steps')}; "
                         f"resume with the same --steps (or train with --lr-schedule constant).")
    if ckpt["step"] > args.steps:
        raise SystemExit(f"--resume {path}: the checkpoint is at step {ckpt['step']}, past --steps "
                         f"{args.steps}; raise --steps to train further.")
    return ckpt


# ---------------------------------------------------------------------------------- run


def rate_line(step: int, state: dict, args) -> str:
    steps = step - state["start"]
    s = max(state["train_seconds"], 1e-9)
    tasks = steps * args.meta_batch / s
    return (f"{tasks:.1f} tasks/s, {tasks * args.ways * (args.shots + args.query):.0f} images/s, "
            f"{1000 * s / max(steps, 1):.0f} ms/step")


def _load_extra(method: Method, saved: dict) -> None:
    with torch.no_grad():
        for k, v in method.extra.items():
            v.copy_(saved[k])


def train(model, train_task, val_task, args, device, log, method: Method | None = None) -> dict:
    """Meta-train ``model`` in place; returns the run state (history, validation curve, best, timing)."""
    method = method or maml_method(args)
    params = mb.nn.params(model)
    opt = torch.optim.Adam([*params.values(), *method.extra.values()], lr=args.meta_lr)
    state = {"step": 0, "loss": [], "val": [], "best_acc": -1.0, "best_step": 0}
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, args, method.stream_args)
        model.load_state_dict(ckpt["model"])
        _load_extra(method, ckpt.get("extra", {}))
        opt.load_state_dict(ckpt["opt"])
        state.update({k: ckpt[k] for k in ("step", "loss", "val", "best_acc", "best_step")})
        log(f"resumed from {args.resume} at step {state['step']} (best validation accuracy so far "
            f"{100 * state['best_acc']:.2f}% at step {state['best_step']})")
    state.update(start=state["step"], train_seconds=0.0, stopped_at=None)
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint(step):
        save(args.out / "last.pt", {"step": step, "seed": args.seed, "model": model.state_dict(),
                                    "extra": {k: v.detach() for k, v in method.extra.items()},
                                    "opt": opt.state_dict(), "args": _jsonable(args),
                                    **{k: state[k] for k in ("loss", "val", "best_acc", "best_step")}})

    def validate(step):
        acc = accuracy_on(model, params, val_task, num_tasks=args.val_tasks, seed=args.seed + 1, args=args,
                          device=device, method=method)
        mean, ci = maml.mean_ci(acc)
        state["val"].append([step, mean, ci, state["train_seconds"]])
        best = mean > state["best_acc"]
        if best:
            state["best_acc"], state["best_step"] = mean, step
            save(args.out / "best.pt", {"step": step, "model": model.state_dict(), "val_acc": mean,
                                        "extra": {k: v.detach() for k, v in method.extra.items()},
                                        "args": _jsonable(args)})
        checkpoint(step)
        loss = sum(state["loss"][-50:]) / max(1, len(state["loss"][-50:]))
        log(f"step {step}/{args.steps}  loss {loss:.3f}  val acc {100 * mean:.2f}% ± {100 * ci:.2f}%"
            f"{' (best)' if best else ''}  [{rate_line(step, state, args)}]")

    specs = mb.batch_specs(args.seed, num_tasks=10**6, batch_size=args.meta_batch, n_ctx=args.shots,
                           n_tgt=args.query, num_batches=args.steps, start=state["start"])
    loader = mb.task_loader(train_task, specs, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    bar = None
    if not args.no_progress and state["start"] < args.steps:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=state["start"], desc="meta-train", unit="step", mininterval=2.0)
    wall = time.perf_counter()
    step = state["start"]
    for spec, batch in zip(specs, loader, strict=False):
        tic = time.perf_counter()
        batch = to_device(batch, device)
        loss = method.meta_loss(model, params, batch, spec.step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.lr_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = args.meta_lr * 0.5 * (1 + math.cos(math.pi * spec.step / args.steps))
        opt.step()
        state["loss"].append(loss.item())
        state["train_seconds"] += time.perf_counter() - tic
        step = spec.step + 1
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {sum(state['loss'][-20:]) / 20:.3f}, {rate_line(step, state, args)}")
        over = args.time_budget is not None and time.perf_counter() - wall > 60 * args.time_budget
        if over and step < args.steps:
            state["stopped_at"] = step
            log(f"--time-budget {args.time_budget} min reached at step {step}: stopping here")
            break
        if args.val_every and step % args.val_every == 0 and step < args.steps:
            validate(step)
    if bar is not None:
        bar.close()
    state["wall_seconds"] = time.perf_counter() - wall
    if not state["val"] or state["val"][-1][0] != step:
        validate(step)
    state["step"] = step
    return state


def plot(state, args, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    loss = torch.tensor(state["loss"])
    ax1.plot(range(1, len(loss) + 1), loss, alpha=0.3, lw=0.7, label="meta-batch")
    w = min(50, len(loss))
    if w > 1:
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], w, 1)[0, 0]
        ax1.plot(range(w, len(loss) + 1), smooth, label=f"mean of {w}")
    ax1.set(xlabel="meta-step", ylabel="query loss after adaptation", title=f"{title}: meta-training")
    ax1.legend(fontsize=8)
    steps, acc, ci = (torch.tensor([v[i] for v in state["val"]]) for i in range(3))
    ax2.errorbar(steps, 100 * acc, yerr=100 * ci, marker="o", ms=3, capsize=2)
    ax2.axvline(state["best_step"], color="k", ls=":", label=f"best (step {state['best_step']})")
    ax2.set(xlabel="meta-step", ylabel=f"accuracy, % ({args.val_tasks} tasks, 95% CI)",
            title=f"validation ({args.test_steps} inner steps)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, *, name: str, model_fn, train_task, val_task, evaluations, log=print, method=None) -> dict:
    """Train, keep the best model by validation accuracy, evaluate it, write metrics.json and the plot.

    ``evaluations``: ``[(label, fn)]``; ``fn(model, params, device) -> (dict, final_line)`` is run on the
    best model; its dict goes to metrics.json under `label`, its line is printed. `method`: a
    `Method`, or `None` for `maml_method`; `method` may also be a function of the built
    model returning one (for methods whose extra parameters depend on the model). `--threads` applies
    while it runs (`None`: `metabatch.runtime.default_threads(--num-workers)`; 0: torch's own count).
    """
    if args.threads is None:  # every example's policy: the cores left over by the loader workers
        args.threads = mb.runtime.default_threads(args.num_workers)
    previous = mb.runtime.use_threads(args.threads) if args.threads else None  # 0: torch's own default
    try:
        return _run(args, name=name, model_fn=model_fn, train_task=train_task, val_task=val_task,
                    evaluations=evaluations, log=log, method=method)
    finally:
        if previous is not None:
            torch.set_num_threads(previous)  # the caller's count back (a script called as a function)


def _run(args, *, name: str, model_fn, train_task, val_task, evaluations, log, method) -> dict:
    device = device_for(args)
    load = os.getloadavg()
    model = model_fn(mb.random.fold_in(mb.random.key(args.seed), 1)).to(device)
    log(f"{name}: {sum(p.numel() for p in model.parameters())} parameters on {device.type}, "
        f"{args.ways}-way {args.shots}-shot, {args.meta_batch} tasks per meta-step, {args.query} query images "
        f"per class; load average {load[0]:.2f}")
    if callable(method) and not isinstance(method, Method):
        method = method(model)
    method = method or maml_method(args)
    state = train(model, train_task, val_task, args, device, log, method)
    best = torch.load(args.out / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    _load_extra(method, best.get("extra", {}))
    params = {k: v.detach() for k, v in mb.nn.params(model).items()}
    results, lines = {}, []
    eval_tic = time.perf_counter()
    for label, fn in evaluations:
        results[label], line = fn(model, params, device)
        lines.append(line)
    trained = state["step"] - state["start"]
    tasks_s = trained * args.meta_batch / max(state["train_seconds"], 1e-9)
    metrics = {
        "method": method.name,
        "example": name,
        "args": _jsonable(args),
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": {"start": list(load), "end": list(os.getloadavg())},
        "start_step": state["start"],
        "steps": state["step"],
        "stopped_by_time_budget": state["stopped_at"] is not None,
        "train_seconds": state["train_seconds"],
        "wall_seconds": state["wall_seconds"],
        "eval_seconds": time.perf_counter() - eval_tic,
        "ms_per_step": 1000 * state["train_seconds"] / max(trained, 1),
        "tasks_per_s": tasks_s,
        "images_per_s": tasks_s * args.ways * (args.shots + args.query),
        "best": {"step": state["best_step"], "val_accuracy": state["best_acc"]},
        "validation": [{"step": v[0], "accuracy": v[1], "ci95": v[2],
                        **({"train_seconds": v[3]} if len(v) > 3 else {})} for v in state["val"]],
        **results,
        "train_loss_every_10": state["loss"][::10],
    }
    mb.checkpoint.save_json(metrics, args.out / "metrics.json")
    try:
        plot(state, args, args.out / "learning_curve.png", name)
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
    log(f"trained steps {state['start']}..{state['step'] - 1} in {state['train_seconds']:.1f} s "
        f"({state['wall_seconds'] / 60:.1f} min with validation; {rate_line(state['step'], state, args)}); "
        f"best validation accuracy {100 * state['best_acc']:.2f}% at step {state['best_step']}; "
        f"results in {args.out}")
    for line in lines:
        log(line)
    metrics["train_loss"] = state["loss"]  # the full curve is returned, not written
    return metrics


def accuracy_eval(sample_task, args, what: str, method=None):
    """An evaluation for `run`: `--eval-tasks` tasks from `sample_task`, mean ± 95 % CI.

    `method`: the `Method` (or a zero-argument function returning it, for a method that
    `run` builds from the model); `None` for plain MAML."""
    def fn(model, params, device):
        m = method() if callable(method) and not isinstance(method, Method) else method
        acc = accuracy_on(model, params, sample_task, num_tasks=args.eval_tasks, seed=args.eval_seed,
                          args=args, device=device, method=m)
        mean, ci = maml.mean_ci(acc)
        line = (f"final: {args.ways}-way {args.shots}-shot accuracy {100 * mean:.2f}% ± {100 * ci:.2f}% "
                f"({len(acc)} tasks)")
        return {"accuracy": mean, "ci95": ci, "tasks": len(acc), "on": what, "query_per_class": args.eval_query,
                "inner_steps": args.test_steps}, line
    return fn
