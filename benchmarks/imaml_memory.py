"""Peak memory of one meta-step against the number of inner steps: implicit MAML against MAML.

MAML (`maml.meta_loss(...).backward()`, second order) keeps the graph of every inner step, so its
memory grows linearly with the steps; implicit MAML (`imaml.meta_grad`) runs the inner steps without
a graph and differentiates through the optimum by conjugate gradient (5 iterations), so its memory
should not depend on them. Workloads W1 and W2 of benchmarks/maml.py; inner steps 1, 2, 5, 10, 20.

Every (workload, method, steps) runs in its own process: the peak is that process's high-water mark
of resident memory (`ru_maxrss`) minus its mark after building the workload (imports, data, model),
i.e. what the meta-step itself added; on CUDA, `torch.cuda.max_memory_allocated` instead. Each
process also times its meta-step (one warm-up, then the median of `--reps`).

    python benchmarks/imaml_memory.py                  # W1 and W2, steps 1-20 (W2 MAML at 20 steps: minutes)
    python benchmarks/imaml_memory.py --workloads W1 --steps 1,5 --reps 1    # a smoke run

Writes benchmarks/results/imaml_memory.json and imaml_memory.png.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ["maml", "imaml"]


@functools.cache
def workloads():
    spec = importlib.util.spec_from_file_location("bench_maml", HERE / "maml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec):
    import torch

    from metabatch import imaml, maml
    from metabatch import nn as mnn

    torch.manual_seed(0)
    bench = workloads()
    model, support, query, criterion = bench.build(spec["workload"])
    device = torch.device(spec["device"])
    model = model.to(device)
    support = tuple(x.to(device) for x in support)
    query = tuple(x.to(device) for x in query)
    lr = bench.WORKLOADS[spec["workload"]]["lr"]
    loss_fn = mnn.objective(model, criterion)
    params = mnn.params(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = spec["steps"]

    def step():
        if spec["method"] == "maml":
            loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, lr=lr)
            opt.zero_grad()
            loss.backward()
        else:
            out = imaml.meta_grad(loss_fn, params, support, query, lam=spec["lam"], steps=steps, lr=lr,
                                  cg_steps=spec["cg_steps"])
            for name, p in params.items():
                p.grad = out.grads[name]
        opt.step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    times = []
    for _ in range(1 + spec["reps"]):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb()
    print(json.dumps({"peak_mb": peak - base, "base_mb": base, "ms": 1000 * statistics.median(times[1:]),
                      "memory": "cuda max_memory_allocated" if cuda else "ru_maxrss"}))


def run_one(spec, timeout):
    return workloads().run_child(__file__, spec, timeout)


def plot(rows, path, info):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    names = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for ax, workload in zip(axes.flat, names, strict=False):
        for method, color in (("maml", "tab:gray"), ("imaml", "tab:orange")):
            sel = sorted((r for r in rows if r["workload"] == workload and r["method"] == method and "peak_mb" in r),
                         key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in sel], [r["peak_mb"] for r in sel], "o-", color=color,
                    label="MAML (second order)" if method == "maml" else "iMAML (CG, 5 iterations)")
        ax.set(xlabel="inner steps", ylabel="peak memory of a meta-step, MB", title=workload)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"memory against inner steps, {info['cpu']}, torch {info['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--steps", default="1,2,5,10,20")
    parser.add_argument("--reps", type=int, default=2, help="timed meta-steps after the warm-up (default 2)")
    parser.add_argument("--lam", type=float, default=1.0, help="iMAML's proximal regularisation (default 1)")
    parser.add_argument("--cg-steps", type=int, default=5, help="iMAML's CG iterations (default 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    import torch

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "device": args.device,
            "load_average_start": os.getloadavg()}
    rows = []
    for workload in args.workloads.split(","):
        for steps in map(int, args.steps.split(",")):
            for method in METHODS:
                spec = {"workload": workload, "method": method, "steps": steps, "reps": args.reps,
                        "lam": args.lam, "cg_steps": args.cg_steps, "device": args.device}
                row = {"workload": workload, "method": method, "steps": steps, **run_one(spec, timeout=1800)}
                rows.append(row)
                shown = f"{row['peak_mb']:8.1f} MB  {row['ms']:9.1f} ms" if "peak_mb" in row else row["error"]
                print(f"{workload} {method:6s} {steps:3d} steps {shown}", flush=True)
    info["load_average_end"] = os.getloadavg()
    summary = []
    for workload in args.workloads.split(","):
        for method in METHODS:
            sel = sorted((r for r in rows if r["workload"] == workload and r["method"] == method and "peak_mb" in r),
                         key=lambda r: r["steps"])
            if len(sel) > 1:
                summary.append(f"{workload} {method}: peak {sel[0]['peak_mb']:.0f} MB at {sel[0]['steps']} step(s), "
                               f"{sel[-1]['peak_mb']:.0f} MB at {sel[-1]['steps']} "
                               f"({sel[-1]['peak_mb'] / max(sel[0]['peak_mb'], 1e-9):.2f}x)")
        pair = {r["method"]: r for r in rows if r["workload"] == workload and r["steps"] == max(
            map(int, args.steps.split(","))) and "peak_mb" in r}
        if len(pair) == 2:
            summary.append(f"{workload} at {max(map(int, args.steps.split(',')))} steps: iMAML uses "
                           f"{pair['imaml']['peak_mb'] / pair['maml']['peak_mb']:.2f}x MAML's memory")
    notes = [("peak_mb: the meta-step's own peak (ru_maxrss after the step minus ru_maxrss after building the "
              "workload; CUDA: max_memory_allocated minus allocated), one process per row."),
             "maml: second-order maml.meta_loss + backward + Adam; "
             "imaml: imaml.meta_grad (lam, cg_steps below) + Adam.",
             f"iMAML lam={args.lam}, cg_steps={args.cg_steps}; inner SGD with the workload's lr in both."]
    (out / "imaml_memory.json").write_text(json.dumps({"machine": info, "notes": notes, "results": rows,
                                                       "summary": summary}, indent=1) + "\n")
    plot(rows, out / "imaml_memory.png", info)
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
