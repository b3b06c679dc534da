"""Data-parallel MAML on sinusoids with torch.distributed: one process per device, launched by torchrun.

    torchrun --nproc_per_node=2 examples/maml_ddp.py --steps 2000      # 2 ranks here (gloo on CPU, nccl on GPUs)
    python examples/maml_ddp.py --steps 2000                           # the same run in one process
    torchrun --nproc_per_node=2 examples/maml_ddp.py --steps 4000 \\
        --resume runs/maml_ddp/checkpoints/step_0002000.pt              # continue the same stream
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 examples/maml_ddp.py                 # several machines: docs/distributed.md

The workload is that of examples/maml_sinusoid.py (MLP 1-40-40-1, K=10, one inner step, Adam), with a
global meta-batch of --meta-batch tasks split evenly over the ranks:

- every rank builds the same model from --seed (no broadcast needed) and loads only its contiguous share
  of each global batch, mb.batch_specs(..., **mb.distributed.shard()), with its own --num-workers loader
  workers;
- maml.meta_loss is the mean over the rank's tasks, so after loss.backward() the mean of the per-rank
  meta-gradients (mb.distributed.all_reduce_grads) is the meta-gradient of the whole global batch, and
  every rank takes the same Adam step: the loss curve is that of one process, for any number of ranks;
- rank 0 logs the global loss, writes checkpoints (--checkpoint-every) and metrics.json; --resume
  continues the exact stream from a checkpoint's step, with any number of ranks.

Why an explicit all-reduce and not DistributedDataParallel: meta_loss calls the model through
torch.func.functional_call inside torch.func transforms. DDP synchronises gradients from hooks that its
own forward arms; a call that bypasses the DDP wrapper never arms them (the gradients silently stay
per-rank), and calling the wrapper under vmap/grad runs its forward several times per backward, which
DDP does not support. One all-reduce after backward is exact and costs one collective per step.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

import optree
import torch
import torch.distributed as dist

import metabatch as mb
from metabatch import maml

# The model and the loss are those of examples/maml_sinusoid.py, imported from it.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maml_sinusoid import make_model, mse_loss

# What fixes the task stream and the updates: a checkpoint may only be resumed with the same values
# (the optimizer state in a checkpoint carries its learning rate, so a new --meta-lr would be ignored).
STREAM_ARGS = ("seed", "meta_batch", "shots", "query", "inner_steps", "inner_lr", "meta_lr", "first_order",
               "dtype")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000, help="meta-training steps in all (default 10000)")
    p.add_argument("--meta-batch", type=int, default=32,
                   help="tasks per global meta-batch, divisible by the number of ranks (default 32)")
    p.add_argument("--inner-steps", type=int, default=1, help="inner SGD steps (default 1)")
    p.add_argument("--inner-lr", type=float, default=0.01, help="inner learning rate (default 0.01)")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--shots", type=int, default=10, help="K, support points per task (default 10)")
    p.add_argument("--query", type=int, default=10, help="query points per task (default 10)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (FOMAML)")
    p.add_argument("--num-workers", type=int, default=1, help="loader worker processes per rank (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per rank (default: this machine's cores shared evenly by its "
                        "ranks, minus --num-workers, at least 1: "
                        f"{rank_threads(None, 1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))} here with 1 "
                        f"worker per rank)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model and data dtype (default float32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu (default auto)")
    p.add_argument("--seed", type=int, default=0, help="the seed of everything (default 0)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/maml_ddp"),
                   help="results folder: metrics.json, checkpoints/ (default runs/maml_ddp)")
    p.add_argument("--log-every", type=int, default=100, help="rank 0 prints the loss every N steps (default 100)")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="rank 0 writes out/checkpoints/step_NNNNNNN.pt every N steps and at the end "
                        "(default 1000; 0: only at the end)")
    p.add_argument("--resume", type=pathlib.Path, default=None,
                   help="a checkpoint to continue from (default: none)")
    p.add_argument("--eval-tasks", type=int, default=200,
                   help="held-out tasks evaluated by rank 0 at the end (default 200)")
    p.add_argument("--trace", action="store_true",
                   help="also write out/trace/rank{R}.pt: per step, this rank's spec and local loss, and on "
                        "rank 0 the parameters and the averaged meta-gradient (tests/test_distributed.py)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def rank_threads(threads: int | None, num_workers: int, local_ranks: int) -> int:
    """--threads, or this rank's share of the machine's cores minus its loader workers (at least 1).

    torchrun starts LOCAL_WORLD_SIZE ranks on a machine: each gets cpu_count() // LOCAL_WORLD_SIZE cores,
    and its loader workers take num_workers of them (metabatch.runtime.default_threads for one rank).
    """
    if threads is not None:
        return threads
    return max(1, mb.runtime.cpu_count() // max(1, local_ranks) - num_workers)


def setup(device: str) -> tuple[torch.device, bool]:
    """Pick this rank's device and join the process group when torchrun started us. -> (device, joined)."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():  # plain `python`: one process, no group
        return dev, False
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: the env:// defaults read them.
    dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return dev, True


def load_checkpoint(path: pathlib.Path, args, rank: int, world_size: int) -> dict:
    """Rank 0 reads the checkpoint and sends it to the others (no shared file system needed)."""
    box = [None]
    if rank == 0:
        box[0] = mb.checkpoint.load(path)  # weights_only: a checkpoint never runs code
        saved = box[0]["args"]
        changed = {k: (saved.get(k), getattr(args, k)) for k in STREAM_ARGS if saved.get(k) != getattr(args, k)}
        if changed:
            box[0] = ValueError(f"--resume {path}: these settings differ from the checkpoint's "
                                f"(saved, now): {changed}; resume with the same ones to continue its stream.")
        elif box[0]["step"] > args.steps:
            box[0] = ValueError(f"--resume {path} is at step {box[0]['step']}, past --steps {args.steps}; "
                                f"pass --steps {box[0]['step']} or more.")
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def save_checkpoint(out: pathlib.Path, step: int, model, opt, history, args, world_size: int):
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "history": history,
             "args": {k: getattr(args, k) for k in STREAM_ARGS}, "world_size": world_size}
    return mb.checkpoint.save(state, out / "checkpoints" / f"step_{step:07d}.pt")  # atomic: never torn


def evaluate(model, params, args, device, dtype):
    """Post-adaptation MSE (1 inner step, K=--shots, 100 query points) on held-out tasks (seed + 1)."""
    specs = mb.batch_specs(args.seed + 1, num_tasks=args.eval_tasks, batch_size=args.eval_tasks,
                           n_ctx=args.shots, n_tgt=100, num_batches=1)
    batch = optree.tree_map(lambda t: t.to(device, dtype), mb.build_batch(mb.tasks.sinusoid, specs[0]))
    return maml.evaluate(functools.partial(mse_loss, model), params, batch["context"], batch["target"],
                         steps=1, lr=args.inner_lr)


def main(argv=None):
    args = parse_args(argv)
    args.threads = rank_threads(args.threads, args.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device, joined = setup(args.device)
    threads = mb.runtime.use_threads(args.threads)
    try:
        metrics = train(args, device)
        if joined:
            dist.barrier()  # the other ranks wait for rank 0's checkpoint and evaluation, then all leave together
        return metrics
    finally:
        torch.set_num_threads(threads)
        if joined:
            dist.destroy_process_group()


def train(args, device):
    rank, world_size = mb.distributed.rank_and_world_size()
    lead = rank == 0
    dtype = getattr(torch, args.dtype)
    model = make_model(mb.random.fold_in(mb.random.key(args.seed), 1)).to(device, dtype)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=args.meta_lr)
    start, history = 0, []
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, args, rank, world_size)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start, history = ckpt["step"], list(ckpt["history"])
    loss_fn = functools.partial(mse_loss, model)

    # This rank's share of every global batch; the stream is the same for any world size and worker count.
    specs = mb.batch_specs(args.seed, num_tasks=10**6, batch_size=args.meta_batch, n_ctx=args.shots,
                           n_tgt=args.query, num_batches=args.steps, start=start, **mb.distributed.shard())
    loader = mb.task_loader(mb.tasks.sinusoid, specs, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda")
    if lead:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{world_size} rank(s) on {device.type}, {specs.local_batch_size} of {args.meta_batch} tasks "
              f"each, {args.num_workers} loader worker(s) per rank; steps {start}..{args.steps - 1}", flush=True)
    trace, tic = [], time.perf_counter()
    for spec, batch in zip(specs, loader, strict=False):
        batch = optree.tree_map(lambda t: t.to(device, dtype, non_blocking=True), batch)
        loss = maml.meta_loss(loss_fn, params, batch["context"], batch["target"], steps=args.inner_steps,
                              lr=args.inner_lr, first_order=args.first_order)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mb.distributed.all_reduce_grads(params)   # mean over ranks = meta-gradient of the global batch
        global_loss = mb.distributed.pmean(loss).item()
        if args.trace:
            record = {"step": spec.step, "indices": list(spec.indices), "offset": spec.offset,
                      "local_loss": loss.item(), "loss": global_loss}
            if lead:
                record["params"] = {k: v.detach().cpu().clone() for k, v in params.items()}
                record["grads"] = {k: v.grad.cpu().clone() for k, v in params.items()}
            trace.append(record)
        opt.step()
        history.append(global_loss)
        step = spec.step + 1  # steps done
        if lead and args.log_every and step % args.log_every == 0:
            ms = 1000 * (time.perf_counter() - tic) / (step - start)
            print(f"step {step}/{args.steps}  loss {global_loss:.4f}  ({ms:.1f} ms/step)", flush=True)
        if lead and args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
            save_checkpoint(args.out, step, model, opt, history, args, world_size)
    train_s = time.perf_counter() - tic
    if args.trace:
        (args.out / "trace").mkdir(parents=True, exist_ok=True)
        torch.save(trace, args.out / "trace" / f"rank{rank}.pt")
    if not lead:
        return None

    ckpt = save_checkpoint(args.out, args.steps, model, opt, history, args, world_size)
    ev = evaluate(model, params, args, device, dtype)
    metrics = {
        "method": "FOMAML" if args.first_order else "MAML",
        "world_size": world_size,
        "device": device.type,
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "start": start,
        "train_seconds": train_s,
        "ms_per_step": 1000 * train_s / max(1, args.steps - start),
        "post_adaptation_mse": {"mean": ev.loss, "ci95": ev.loss_ci, "steps": 1, "tasks": args.eval_tasks},
        "train_loss": history,
        "checkpoint": str(ckpt),
    }
    mb.checkpoint.save_json(metrics, args.out / "metrics.json")
    print(f"trained steps {start}..{args.steps - 1} on {world_size} rank(s) in {train_s:.1f} s; "
          f"checkpoint {ckpt}")
    print(f"final: post-adaptation MSE {ev.loss:.3f} ± {ev.loss_ci:.3f} (K={args.shots}, 1 step, "
          f"{args.eval_tasks} tasks)")
    return metrics


if __name__ == "__main__":
    main()
