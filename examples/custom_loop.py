"""The shortest honest metabatch loop: your task function, your model, your optimizer, MAML in between.

    python examples/custom_loop.py                                      # 300 meta-steps, seconds
    python examples/custom_loop.py --steps 150 --out runs/line        # stop at 150: runs/line/last.pt...
    python examples/custom_loop.py --steps 300 --resume runs/line/last.pt   # ...and on: the 300-step run
"""
import argparse

import numpy as np
import torch

import metabatch as mb
from metabatch import maml


def sample_task(key, idx, n_ctx, n_tgt):
    """A random line y = a x + b. Module-level (workers pickle it); every random number from `key`."""
    rng = mb.random.numpy_rng(key)
    a, b = rng.uniform(-1, 1, size=2)
    x = rng.uniform(-1, 1, size=(n_ctx + n_tgt, 1)).astype(np.float32)
    y = (a * x + b).astype(np.float32)
    return {"context": (x[:n_ctx], y[:n_ctx]), "target": (x[n_ctx:], y[n_ctx:])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="meta-steps, counted from 0 (default 300)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the tasks and the model (default 0)")
    p.add_argument("--num-workers", type=int, default=2, help="task-loader workers (default 2)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the cores this process may "
                   f"use minus --num-workers, at least 1: {mb.runtime.default_threads(2)} with 2 workers)")
    p.add_argument("--out", help="write OUT/last.pt (model, optimizer, step) at the end (default: none)")
    p.add_argument("--resume", help="continue from this checkpoint (default: start afresh)")
    args = p.parse_args(argv)
    threads = mb.runtime.use_threads(args.threads, num_workers=args.num_workers)  # put back at the end
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    g = mb.random.torch_generator(mb.random.fold_in(mb.random.key(args.seed), 1))
    with torch.no_grad():  # torch's default init, U(±1/√fan_in), but drawn from an explicit key
        for w, fan_in in [(model[0].weight, 1), (model[0].bias, 1), (model[2].weight, 32), (model[2].bias, 32)]:
            w.uniform_(-fan_in ** -0.5, fan_in ** -0.5, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = mb.nn.objective(model, torch.nn.functional.mse_loss)   # loss_fn(params, (x, y)) of one task
    specs = mb.batch_specs(args.seed, num_tasks=10**6, batch_size=16, n_ctx=(2, 10), n_tgt=10,
                           num_batches=args.steps)
    ckpt = mb.checkpoint.load(args.resume) if args.resume else {"step": 0}   # weights_only: safe to load
    if args.resume:
        model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["opt"])
    start, losses = ckpt["step"], []
    loader = mb.task_loader(sample_task, specs.replace(start=start), num_workers=args.num_workers)
    for _step, batch in enumerate(loader, start):  # specs.replace(start=k): the exact stream from step k on
        loss = maml.meta_loss(loss_fn, mb.nn.params(model), batch["context"], batch["target"], lr=0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if args.out:  # written atomically: a crash leaves the previous checkpoint whole
        ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "step": start + len(losses)}
        print("checkpoint:", mb.checkpoint.save(ckpt, f"{args.out}/last.pt"))
    print(f"final: meta-loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f} (first/last 20 steps)")
    torch.set_num_threads(threads)
    return losses


if __name__ == "__main__":
    main()
