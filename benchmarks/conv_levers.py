"""The levers of conv MAML (W2 of benchmarks/maml.py), each measured alone, side by side in one run.

benchmarks/maml.py races whole meta-steps; this script isolates the pieces its W2 rows are made of,
at W2's shapes (8 tasks; conv4 with 64 channels; 5 support and 75 query images of 28x28 per task):

    step0     the support pass of inner step 0 (forward, inner gradient, and the outer backward
              through it): every task starts from the same weights, so vmap's rule folds the tasks'
              images into one ordinary convolution ("shared") — against the same pass with the
              weights copied per task ("per-task"), which needs a grouped convolution.
    query     forward + backward of one query-pass convolution with per-task weights, per layer:
              one grouped convolution over [75, 8*C, H, W] (what metabatch's rule does), in NCHW
              and in channels-last memory, against a loop of 8 ordinary convolutions stacked
              (the per-task loop inside the rule).
    pagefault an elementwise op (relu) over a freshly allocated 120 MB activation (the size of
              W2's first query activation for 8 tasks) against the same over recycled memory, in
              the current process's allocator setting (THP_MEM_ALLOC_ENABLE decides; metabatch
              turns it on at import).

Every configuration runs ``--repeats`` times, interleaved (repeat-major); the JSON holds every
time, the table the medians and the ratios.

    python benchmarks/conv_levers.py                       # ~3 min on 2 cores
    python benchmarks/conv_levers.py --quick --out /tmp/c  # a smoke run

Writes benchmarks/results/conv_levers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's metabatch, not an installed one
# metabatch first: it sets THP_MEM_ALLOC_ENABLE=1 unless set, before torch allocates, as in a user's script
import metabatch as mb  # noqa: E402 isort: skip
import torch  # noqa: E402 isort: skip
import torch.nn.functional as F  # noqa: E402 isort: skip

T, SUPPORT, QUERY, C = 8, 5, 75, 64
LAYERS = [(1, 28), (C, 14), (C, 7), (C, 3)]  # (input channels, side) of the 4 convolutions


def timed(fn, warmup=1):
    for _ in range(warmup):
        fn()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t0), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def conv4():
    layers = []
    for i in range(4):
        layers += [torch.nn.Conv2d(1 if i == 0 else C, C, 3, padding=1),
                   torch.nn.BatchNorm2d(C, track_running_stats=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(C, 5))


def step0_cases():
    """The support pass of inner step 0 with shared weights, and with the weights copied per task."""
    g = torch.Generator().manual_seed(0)
    model = conv4()
    loss_fn = mb.nn.objective(model, F.cross_entropy)
    params = mb.nn.params(model)
    x = torch.rand(T, SUPPORT, 1, 28, 28, generator=g)
    y = torch.arange(SUPPORT).repeat(T, 1)

    def inner(p, xs, ys):  # one inner step's gradient, differentiated once more by the outer backward
        grads = torch.func.grad(loss_fn)(p, (xs, ys))
        return sum((gr * gr).sum() for gr in grads.values())

    def shared():
        with mb.batching.batching_rules():
            out = torch.func.vmap(inner, in_dims=(None, 0, 0))(params, x, y).sum()
        out.backward()

    def per_task():
        copies = {k: p.unsqueeze(0).expand(T, *p.shape) for k, p in params.items()}
        with mb.batching.batching_rules():
            out = torch.func.vmap(inner, in_dims=(0, 0, 0))(copies, x, y).sum()
        out.backward()

    return {"shared": shared, "per-task": per_task}


def query_cases(layer):
    """Forward + backward of one query-pass convolution with per-task weights."""
    cin, side = LAYERS[layer]
    g = torch.Generator().manual_seed(layer)
    x = torch.rand(T, QUERY, cin, side, side, generator=g)
    w = torch.randn(T, C, cin, 3, 3, generator=g) * 0.1
    gy = torch.randn(T, QUERY, C, side, side, generator=g)
    need_x = layer > 0

    def grouped(channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xf = x.movedim(0, 1).flatten(1, 2).contiguous(memory_format=fmt).requires_grad_(need_x)
        wf = w.flatten(0, 1).contiguous(memory_format=fmt).requires_grad_()
        gf = gy.movedim(0, 1).flatten(1, 2).contiguous(memory_format=fmt)

        def run():
            F.conv2d(xf, wf, padding=1, groups=T).backward(gf)
        return run

    def loop(channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xs = [x[t].contiguous(memory_format=fmt).requires_grad_(need_x) for t in range(T)]
        ws = [w[t].contiguous(memory_format=fmt).requires_grad_() for t in range(T)]
        gs = gy.movedim(0, 1).contiguous()

        def run():
            torch.stack([F.conv2d(xs[t], ws[t], padding=1) for t in range(T)], 1).backward(gs)
        return run

    return {"grouped NCHW": grouped(False), "grouped channels-last": grouped(True),
            "loop NCHW": loop(False), "loop channels-last": loop(True)}


def pagefault_cases():
    n = T * QUERY * C * 28 * 28  # 30.1 M floats, 120 MB
    recycled = torch.empty(n)
    src = torch.randn(n)

    def fresh():
        torch.relu(src)

    def reused():
        torch.clamp_min(src, 0.0, out=recycled)  # relu into memory that stays mapped

    return {"fresh 120 MB": fresh, "recycled 120 MB": reused}


def machine():
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "load_average_start": os.getloadavg()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    info = machine()
    groups = {"step0": step0_cases()}
    for layer in range(4):
        groups[f"query layer {layer + 1}"] = query_cases(layer)
    groups["pagefault"] = pagefault_cases()
    times = {g: {name: [] for name in cases} for g, cases in groups.items()}
    faults = {g: {name: [] for name in cases} for g, cases in groups.items()}
    for r in range(repeats):
        for g, cases in groups.items():
            for name, fn in cases.items():
                ms, flt = timed(fn)
                times[g][name].append(ms)
                faults[g][name].append(flt)
        print(f"repeat {r + 1}/{repeats} done", flush=True)
    table = {g: {name: {"ms": statistics.median(v), "minor_faults": statistics.median(faults[g][name])}
                 for name, v in cases.items()} for g, cases in times.items()}
    ratios = {
        "step0: per-task / shared": table["step0"]["per-task"]["ms"] / table["step0"]["shared"]["ms"],
        "pagefault: fresh / recycled": table["pagefault"]["fresh 120 MB"]["ms"]
        / table["pagefault"]["recycled 120 MB"]["ms"],
    }
    for layer in range(1, 5):
        q = table[f"query layer {layer}"]
        ratios[f"query layer {layer}: grouped NCHW / grouped channels-last"] = (
            q["grouped NCHW"]["ms"] / q["grouped channels-last"]["ms"])
        ratios[f"query layer {layer}: loop channels-last / grouped channels-last"] = (
            q["loop channels-last"]["ms"] / q["grouped channels-last"]["ms"])
    info["load_average_end"] = os.getloadavg()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "repeats": repeats, "times_ms": times, "minor_faults": faults, "medians": table,
              "ratios": ratios, "notes": __doc__.split("\n\n")[1]}
    (out / "conv_levers.json").write_text(json.dumps(result, indent=1) + "\n")
    for g, cases in table.items():
        for name, v in cases.items():
            print(f"{g:16s} {name:24s} {v['ms']:9.1f} ms  {v['minor_faults']:8.0f} faults")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":
    main()
