"""metabatch.protonet: prototypes, losses and gradients against an explicit per-task loop (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metabatch as mb
from metabatch import nn as mnn
from metabatch import protonet

from .test_maml import assert_close_grads, gen, init

T, WAYS = 3, 4


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def encoder(seed=0, bn=True):
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4, track_running_stats=False)] if bn else []) + [
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    return init(nn.Sequential(*layers), seed)


def episode(shots=2, queries=3, seed=1, shuffle=True):
    g = gen(seed)
    ys = torch.arange(WAYS).repeat_interleave(shots).repeat(T, 1)
    yq = torch.arange(WAYS).repeat_interleave(queries).repeat(T, 1)
    if shuffle:
        ys = torch.stack([y[torch.randperm(len(y), generator=g)] for y in ys])
        yq = torch.stack([y[torch.randperm(len(y), generator=g)] for y in yq])
    xs = torch.randn(T, WAYS * shots, 1, 8, 8, generator=g) + ys[..., None, None, None] * 0.3
    xq = torch.randn(T, WAYS * queries, 1, 8, 8, generator=g) + yq[..., None, None, None] * 0.3
    return (xs, ys), (xq, yq)


def loop(net, support, query, distance="sqeuclidean"):
    """Snell et al.'s computation, task by task: embed support and query together, class means, -distance."""
    losses, accs = [], []
    for t in range(T):
        xs, ys = support[0][t], support[1][t]
        xq, yq = query[0][t], query[1][t]
        z = net(torch.cat([xs, xq]))
        zs, zq = z[: len(xs)], z[len(xs):]
        protos = torch.stack([zs[ys == c].mean(0) for c in range(WAYS)])
        if distance == "cosine":
            logits = F.cosine_similarity(zq[:, None], protos[None], dim=-1)
        else:
            logits = -torch.cdist(zq, protos) ** 2
        losses.append(F.cross_entropy(logits, yq))
        accs.append((logits.argmax(-1) == yq).double().mean())
    return torch.stack(losses), torch.stack(accs)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
def test_loss_accuracy_and_gradient_equal_a_per_task_loop(bn, distance):
    net = encoder(bn=bn)
    support, query = episode()
    params = mnn.params(net)
    want_loss, want_acc = loop(net, support, query, distance)
    out = protonet.loss(mnn.functional(net), params, support, query, distance=distance)
    assert torch.allclose(out.per_task_loss, want_loss, rtol=1e-10, atol=0)
    assert torch.equal(out.per_task_accuracy, want_acc)
    assert out.loss.item() == pytest.approx(want_loss.mean().item(), rel=1e-12)
    assert out.accuracy.item() == pytest.approx(want_acc.mean().item(), rel=1e-12)
    want = torch.autograd.grad(want_loss.mean(), list(params.values()))
    assert_close_grads(torch.autograd.grad(out.loss, list(params.values())), want)
    plain = {k: p.detach() for k, p in params.items()}
    fgrad = torch.func.grad(lambda p: protonet.loss(mnn.functional(net), p, support, query, distance=distance).loss)(
        plain)
    assert_close_grads(list(fgrad.values()), want)
    chunked = protonet.loss(mnn.functional(net), params, support, query, distance=distance, chunk_size=2)
    assert torch.allclose(chunked.per_task_loss, want_loss, rtol=1e-10, atol=0)


def test_prototypes_are_class_means_for_any_order():
    z = torch.randn(7, 3, generator=gen(2))
    y = torch.tensor([2, 0, 1, 2, 0, 2, 1])
    got = protonet.prototypes(z, y, 3)
    for c in range(3):
        assert torch.allclose(got[c], z[y == c].mean(0), rtol=1e-14, atol=0)


def test_fed_by_task_loader_and_classification_and_trains():
    torch.set_default_dtype(torch.float32)
    rng = torch.Generator().manual_seed(3)
    classes = (torch.rand(12, 6, 8, 8, generator=rng) < 0.3).numpy()
    task = mb.tasks.classification(classes, ways=WAYS, rotate=True, shuffle=True)
    specs = mb.batch_specs(seed=0, num_tasks=1000, batch_size=4, n_ctx=1, n_tgt=2, num_batches=30)
    net = encoder(seed=4).float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    embed, params = mnn.functional(net), mnn.params(net)
    first = last = None
    for batch in mb.task_loader(task, specs, num_workers=0):
        out = protonet.loss(embed, params, batch["context"], batch["target"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.loss.item() if first is None else first
        last = out.loss.item()
    assert last < first
    ev = protonet.evaluate(embed, params, batch["context"], batch["target"], ways=WAYS)
    assert ev.metric == pytest.approx(out.accuracy.item(), abs=0.3) and ev.per_task_metric.shape == (4,)
    assert not ev.per_task_loss.requires_grad


def test_same_key_same_dropout_masks():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5))
    support, query = episode()
    params = mnn.params(net)
    a = protonet.loss(mnn.functional(net), params, support, query, key=mb.random.key(0)).loss
    b = protonet.loss(mnn.functional(net), params, support, query, key=mb.random.key(0)).loss
    c = protonet.loss(mnn.functional(net), params, support, query, key=mb.random.key(1)).loss
    assert a.item() == b.item() != c.item()


def test_errors_name_the_bad_value():
    net = encoder()
    embed, params = mnn.functional(net), mnn.params(net)
    support, query = episode()
    with pytest.raises(TypeError, match=r"protonet.loss\(\): support must be a pair"):
        protonet.loss(embed, params, support[0], query)
    with pytest.raises(TypeError, match="labels must be integers"):
        protonet.loss(embed, params, (support[0], support[1].double()), query)
    with pytest.raises(ValueError, match=r"query must be \(inputs \[T, n, ...\], labels \[T, n\]\)"):
        protonet.loss(embed, params, support, (query[0], query[1][:, :2]))
    with pytest.raises(ValueError, match="holds no tasks"):
        protonet.loss(embed, params, (support[0][:0], support[1][:0]), (query[0][:0], query[1][:0]))
    with pytest.raises(ValueError, match="distance must be one of"):
        protonet.loss(embed, params, support, query, distance="l1")
    with pytest.raises(ValueError, match="support holds 3 tasks and query 2"):
        protonet.loss(embed, params, support, (query[0][:2], query[1][:2]))
    assert protonet.loss(embed, params, support, query, ways=WAYS).loss.item() == pytest.approx(
        protonet.loss(embed, params, support, query).loss.item())
