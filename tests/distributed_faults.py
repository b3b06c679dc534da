"""Ranks that disagree, on 2 gloo ranks; tests/test_faults.py runs this under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_faults.py OUT_DIR

Each case makes the ranks pass different parameters to metabatch.distributed.all_reduce_grads (or
trees to pmean); every rank records what it raised in OUT_DIR/rank<r>.json. A last, agreeing call
shows that the process group still works afterwards.
"""

import json
import pathlib
import sys

import torch
import torch.distributed as dist

import metabatch as mb


def param(shape, dtype=torch.float32):
    p = torch.zeros(shape, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    return p


def cases(rank):
    """name -> (function, argument) for this rank."""
    other = rank == 1
    return {
        "dtype": (mb.distributed.all_reduce_grads,
                  {"w": param(3, torch.float64 if other else torch.float32)}),
        "count": (mb.distributed.all_reduce_grads,
                  {"a": param(2), "b": param(2), **({"c": param(5)} if other else {})}),
        "shape": (mb.distributed.all_reduce_grads, {"a": param(2), "b": param(4 if other else 3)}),
        "order": (mb.distributed.all_reduce_grads, [param(4), param(3)] if other else [param(3), param(4)]),
        "module": (mb.distributed.all_reduce_grads,
                   torch.nn.Sequential(torch.nn.Linear(2, 3 if other else 4), torch.nn.Linear(3 if other else 4, 1))),
        "pmean": (mb.distributed.pmean, {"loss": torch.tensor(1.0), **({"acc": torch.tensor(0.5)} if other else {})}),
    }


def main():
    out = pathlib.Path(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        got = {}
        for name, (fn, arg) in cases(rank).items():
            if isinstance(arg, torch.nn.Module):
                for p in arg.parameters():
                    p.grad = torch.ones_like(p)
            try:
                fn(arg)
                got[name] = [None, ""]
            except Exception as err:  # noqa: BLE001 - recorded, checked by the test
                got[name] = [type(err).__name__, str(err)]
        w = param(3)
        w.grad = torch.full((3,), float(rank))
        mb.distributed.all_reduce_grads([w])  # the group still works
        got["after"] = w.grad.tolist()
        (out / f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
