"""The claims of docs/coming-from.md, checked against the other libraries' own training steps.

MAML-Pytorch's ``Meta.forward`` is written out in its shape (its ``Learner`` replaced by
``functional_call`` on an ordinary module); higher's step is higher's own ``innerloop_ctx`` (skipped when
higher is not installed: ``pip install higher==0.2.1``, in the ``bench`` extra). float64, so that "the
same" means to rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import metabatch as mb
from metabatch import maml

TASKS, SHOTS, QUERY, LR = 3, 5, 7, 0.1


def setup():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    amp = torch.rand(TASKS, 1, 1, generator=g, dtype=torch.float64) * 4 + 1
    x_spt = torch.rand(TASKS, SHOTS, 1, generator=g, dtype=torch.float64) * 10 - 5
    x_qry = torch.rand(TASKS, QUERY, 1, generator=g, dtype=torch.float64) * 10 - 5
    return net, x_spt, amp * torch.sin(x_spt), x_qry, amp * torch.sin(x_qry)


def maml_pytorch_meta_grad(net, x_spt, y_spt, x_qry, y_qry, update_lr, update_step):
    """The meta-gradient of MAML-Pytorch's Meta.forward (its loss bookkeeping kept, accuracy left out)."""
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())

    def run(x, weights):
        return functional_call(net, dict(zip(names, weights, strict=True)), (x,))

    losses_q = [0 for _ in range(update_step + 1)]
    for i in range(x_spt.shape[0]):
        loss = F.mse_loss(run(x_spt[i], params), y_spt[i])
        grad = torch.autograd.grad(loss, params)                      # no create_graph
        fast_weights = [p - update_lr * g for g, p in zip(grad, params, strict=True)]
        with torch.no_grad():
            losses_q[0] += F.mse_loss(run(x_qry[i], params), y_qry[i])
        with torch.no_grad():
            losses_q[1] += F.mse_loss(run(x_qry[i], fast_weights), y_qry[i])
        for k in range(1, update_step):
            loss = F.mse_loss(run(x_spt[i], fast_weights), y_spt[i])
            grad = torch.autograd.grad(loss, fast_weights)            # no create_graph
            fast_weights = [p - update_lr * g for g, p in zip(grad, fast_weights, strict=True)]
            losses_q[k + 1] += F.mse_loss(run(x_qry[i], fast_weights), y_qry[i])
    loss_q = losses_q[-1] / x_spt.shape[0]
    return torch.autograd.grad(loss_q, params)  # Meta.forward: loss_q.backward()


def metabatch_meta_grad(net, x_spt, y_spt, x_qry, y_qry, steps, first_order):
    params = mb.nn.params(net)
    loss = maml.meta_loss(mb.nn.objective(net, F.mse_loss), params, (x_spt, y_spt), (x_qry, y_qry),
                          steps=steps, lr=LR, first_order=first_order)
    return torch.autograd.grad(loss, list(params.values()))


def relative_difference(a, b) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    return num / sum(float(y.pow(2).sum()) for y in b) ** 0.5


@pytest.mark.parametrize("update_step", [2, 5])
def test_maml_pytorch_meta_gradient_is_first_order(update_step):
    net, *data = setup()
    theirs = maml_pytorch_meta_grad(net, *data, LR, update_step)
    first = metabatch_meta_grad(net, *data, update_step, first_order=True)
    second = metabatch_meta_grad(net, *data, update_step, first_order=False)
    assert relative_difference(theirs, first) < 1e-12
    assert relative_difference(theirs, second) > 1e-2  # not MAML's second-order gradient


def test_maml_pytorch_crashes_with_one_inner_step():
    net, *data = setup()
    # losses_q[-1] is then losses_q[1], computed under torch.no_grad(): nothing to differentiate
    with pytest.raises(RuntimeError, match="does not require grad"):
        maml_pytorch_meta_grad(net, *data, LR, update_step=1)
    assert all(torch.isfinite(g).all() for g in metabatch_meta_grad(net, *data, 1, first_order=False))


@pytest.mark.parametrize("steps", [1, 3])
def test_higher_innerloop_ctx_is_meta_loss_times_the_task_count(steps):
    higher = pytest.importorskip("higher")
    net, x_spt, y_spt, x_qry, y_qry = setup()
    inner_opt = torch.optim.SGD(net.parameters(), lr=LR)
    net.zero_grad()
    for i in range(TASKS):  # higher's examples/maml-omniglot.py: one backward per task, summed in .grad
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(F.mse_loss(fnet(x_spt[i]), y_spt[i]))
            F.mse_loss(fnet(x_qry[i]), y_qry[i]).backward()
    theirs = [p.grad.clone() for p in net.parameters()]
    ours = metabatch_meta_grad(net, x_spt, y_spt, x_qry, y_qry, steps, first_order=False)
    assert relative_difference(theirs, [TASKS * g for g in ours]) < 1e-12
