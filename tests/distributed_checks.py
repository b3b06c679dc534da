"""Checks of metabatch.distributed on 2 ranks; tests/test_distributed.py runs this under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_checks.py

Every rank asserts; a failed check makes torchrun exit non-zero. Rank 0 prints "checks ok".
"""

import torch
import torch.distributed as dist

import metabatch as mb


def check_rank_and_shard(rank, world):
    assert mb.distributed.rank_and_world_size() == (rank, world)
    assert mb.distributed.shard() == {"rank": rank, "world_size": world}
    specs = mb.batch_specs(3, num_tasks=50, batch_size=6, n_ctx=2, n_tgt=2, **mb.distributed.shard())
    whole = mb.batch_specs(3, num_tasks=50, batch_size=6, n_ctx=2, n_tgt=2)
    share = whole[4].indices[rank * 3:(rank + 1) * 3]
    assert specs[4].indices == share and specs[4].offset == 3 * rank, (specs[4], share)


def check_pmean(rank, world):
    tree = {"b": torch.full((2, 3), float(rank + 1), dtype=torch.float64),
            "a": (torch.tensor(10.0 * rank), torch.arange(4, dtype=torch.float32) * (rank + 1))}
    before = [t.clone() for t in (tree["b"], *tree["a"])]
    out = mb.distributed.pmean(tree)
    assert list(out) == ["b", "a"] and isinstance(out["a"], tuple)
    assert torch.equal(out["b"], torch.full((2, 3), 1.5, dtype=torch.float64))
    assert torch.equal(out["a"][0], torch.tensor(5.0))
    assert torch.equal(out["a"][1], torch.arange(4, dtype=torch.float32) * 1.5)
    after = (tree["b"], *tree["a"])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "pmean changed its input"


def check_all_reduce_grads(rank, world):
    both = torch.zeros(3, dtype=torch.float64, requires_grad=True)       # a gradient on every rank
    only1 = torch.zeros(2, requires_grad=True)                           # a gradient on rank 1 only
    never = torch.zeros(2, requires_grad=True)                           # no gradient anywhere
    loss = ((rank + 1) * both).sum() + (rank == 1) * (only1 * 4).sum()
    loss.backward()
    grad_tensor = both.grad
    mb.distributed.all_reduce_grads({"x": [both, only1, never], "tied": both})  # `both` counted once
    assert both.grad is grad_tensor, "an existing .grad must be updated in place"
    assert torch.equal(both.grad, torch.full((3,), 1.5, dtype=torch.float64)), both.grad
    assert torch.equal(only1.grad, torch.full((2,), 2.0)), only1.grad    # (0 + 4) / 2
    assert never.grad is None

    module = torch.nn.Linear(2, 1)
    for p in module.parameters():
        p.grad = torch.full_like(p, float(rank))
    mb.distributed.all_reduce_grads(module)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in module.parameters())


def main():
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        assert world == 2, world
        check_rank_and_shard(rank, world)
        check_pmean(rank, world)
        check_all_reduce_grads(rank, world)
        dist.barrier()
        if rank == 0:
            print("checks ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
