"""Race metabatch's differentiable inner optimizers against higher's, side by side in one run.

One meta-step = `steps` inner updates on every task's support set (second order) + the query loss's
backward + the outer Adam step, on the workloads of benchmarks/maml.py (its `build`):

    W1  sinusoid regression: MLP 1-40-40-1, 25 tasks, K=10 support, 10 query.
    W2  Omniglot 5-way 1-shot: conv4 (64 channels, BatchNorm with batch statistics), 28x28, 15 query
        images per class, 8 tasks.
    Each with 1 and 5 inner steps.

Anchors, one per (rule, implementation):
    higher momentum   higher.innerloop_ctx with torch.optim.SGD(momentum=0.9), one task at a time
    higher adam       the same with torch.optim.Adam (its differentiable Adam: eps before the bias
                      correction, see docs/algorithms.md)
    metabatch momentum  maml.meta_loss(inner=metabatch.inner.momentum(lr, 0.9)), vmapped over tasks
    metabatch adam      maml.meta_loss(inner=metabatch.inner.adam(1e-3))
    metabatch sgd       maml.meta_loss(lr=lr): plain SGD, for reference
    metabatch lslr      maml.meta_loss(inner=metabatch.inner.lslr(rates)): MAML++'s per-step rates

Every (workload, steps, anchor) runs in its own process (peak RSS is its own). Ratios compare the
same rule: metabatch momentum against higher momentum, metabatch adam against higher adam.

    pip install -e ".[bench]"            # higher, matplotlib
    python benchmarks/inner.py           # both workloads (W2 takes minutes on 2 cores)
    python benchmarks/inner.py --workloads W1 --quick

Writes benchmarks/results/inner.json and inner.png.
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
ANCHORS = ["higher momentum", "metabatch momentum", "higher adam", "metabatch adam", "metabatch sgd",
           "metabatch lslr"]
PAIRS = {"metabatch momentum": "higher momentum", "metabatch adam": "higher adam"}
ADAM_LR = 1e-3


@functools.cache
def workloads():
    """benchmarks/maml.py, loaded by path (its `build` and `WORKLOADS` define the workloads)."""
    spec = importlib.util.spec_from_file_location("bench_maml", HERE / "maml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_step(workload, anchor, steps):
    import torch

    from metabatch import inner, maml
    from metabatch import nn as mnn

    bench = workloads()
    model, support, query, criterion = bench.build(workload)
    t, lr = bench.WORKLOADS[workload]["tasks"], bench.WORKLOADS[workload]["lr"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = mnn.params(model)

    if anchor.startswith("higher"):
        import higher

        if anchor == "higher momentum":
            inner_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        else:
            inner_opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)

        def step():
            opt.zero_grad()
            for i in range(t):
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(criterion(fmodel(support[0][i]), support[1][i]))
                    (criterion(fmodel(query[0][i]), query[1][i]) / t).backward()
            opt.step()
        return step

    loss_fn = mnn.objective(model, criterion)
    extra = []
    if anchor == "metabatch momentum":
        rule = {"inner": inner.momentum(lr, momentum=0.9)}
    elif anchor == "metabatch adam":
        rule = {"inner": inner.adam(ADAM_LR)}
    elif anchor == "metabatch lslr":
        rates = inner.lslr_rates(params, steps, lr)
        extra = list(rates.values())
        rule = {"inner": inner.lslr(rates)}
    elif anchor == "metabatch sgd":
        rule = {"lr": lr}
    else:
        raise ValueError(f"unknown anchor {anchor!r}")
    if extra:
        opt = torch.optim.Adam([*model.parameters(), *extra], lr=1e-3)

    def step():
        loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, **rule)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec):
    import torch

    torch.set_num_threads(spec["threads"])  # a second thread on shared cores waits more than it works
    torch.manual_seed(0)
    base = rss_mb()
    step = make_step(spec["workload"], spec["anchor"], spec["steps"])
    for _ in range(spec["warmup"]):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < spec["min_reps"] or (time.perf_counter() - start < spec["min_seconds"]
                                            and len(times) < spec["max_reps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    print(json.dumps({"ms": 1000 * statistics.median(times), "ms_p25": 1000 * q[0], "ms_p75": 1000 * q[2],
                      "reps": len(times), "peak_rss_mb": rss_mb(), "base_rss_mb": base}))


def run_one(spec, timeout):
    return workloads().run_child(__file__, spec, timeout)


def machine():
    import importlib.metadata

    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average_start": os.getloadavg()}
    try:
        info["higher"] = importlib.metadata.version("higher")
    except importlib.metadata.PackageNotFoundError:
        info["higher"] = None
    return info


def ratios(rows):
    lines = []
    for r in rows:
        ref = PAIRS.get(r["anchor"])
        if ref is None or "ms" not in r:
            continue
        other = next((o for o in rows if (o["workload"], o["steps"], o["anchor"]) == (r["workload"], r["steps"], ref)
                      and "ms" in o), None)
        if other:
            lines.append(f"{r['workload']} {r['steps']}-step {r['anchor']}: {other['ms'] / r['ms']:.2f}x faster than "
                         f"{ref} ({r['ms']:.1f} vs {other['ms']:.1f} ms per meta-step)")
    return lines


def plot(rows, path, info):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    panels = sorted({(r["workload"], r["steps"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (workload, steps) in zip(axes.flat, panels, strict=False):
        sel = [r for r in rows if (r["workload"], r["steps"]) == (workload, steps) and "ms" in r]
        colors = ["tab:orange" if r["anchor"].startswith("metabatch") else "tab:gray" for r in sel]
        ax.barh(range(len(sel)), [r["ms"] for r in sel], color=colors)
        ax.set_yticks(range(len(sel)), [r["anchor"] for r in sel], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(f"{workload} {steps}-step: ms per meta-step", fontsize=9)
        for i, r in enumerate(sel):
            ax.text(r["ms"], i, f" {r['ms']:.3g}", va="center", fontsize=7)
    fig.suptitle(f"differentiable inner optimizers, {info['cpu']} ({info['cores']} cores), torch {info['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--steps", default="1,5")
    parser.add_argument("--anchors", default=None, help="comma-separated subset of " + ", ".join(ANCHORS))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per anchor (default 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="sweeps over the anchors, each in the reverse order of the last; a row keeps the "
                             "median over the rounds (default 1; use 3 on a shared machine)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    wanted = set(args.anchors.split(",")) if args.anchors else set(ANCHORS)
    plan = []
    for workload in args.workloads.split(","):
        heavy = workload == "W2"
        for steps in map(int, args.steps.split(",")):
            for anchor in [a for a in ANCHORS if a in wanted]:
                plan.append({"workload": workload, "steps": steps, "anchor": anchor, "threads": args.threads,
                             "warmup": 1 if heavy else (2 if args.quick else 10),
                             "min_reps": (2 if args.quick else 5) if heavy else (5 if args.quick else 20),
                             "max_reps": 10 if heavy else 2000, "min_seconds": 0 if args.quick else 3.0})
    runs: dict[tuple, list] = {}
    for r in range(args.rounds):
        for spec in plan if r % 2 == 0 else plan[::-1]:
            row = run_one(spec, timeout=1200)
            runs.setdefault((spec["workload"], spec["steps"], spec["anchor"]), []).append(row)
            shown = f"{row['ms']:9.2f} ms  rss {row['peak_rss_mb']:6.0f} MB" if "ms" in row else row["error"]
            print(f"round {r + 1} {spec['workload']} {spec['steps']}-step {spec['anchor']:20s} {shown}", flush=True)
    rows = []
    for (workload, steps, anchor), got in runs.items():
        ok = sorted((g for g in got if "ms" in g), key=lambda g: g["ms"])
        best = ok[len(ok) // 2] if ok else got[-1]  # the median round's row
        rows.append({"workload": workload, "steps": steps, "anchor": anchor, **best,
                     "ms_rounds": [g.get("ms") for g in got]})
    info["load_average_end"] = os.getloadavg()
    summary = ratios(rows)
    notes = ["ms: median wall time of one meta-step (second-order inner loop + outer backward + Adam).",
             f"Each (workload, steps, anchor) ran in its own process with {args.threads} intra-op thread(s), "
             f"{args.rounds} round(s) alternating the order; a row is the median round.",
             f"Adam's inner learning rate is {ADAM_LR} in both implementations; momentum 0.9 with the workload's lr.",
             "higher's Adam is not the same update (eps before the bias correction); its cost is comparable."]
    (out / "inner.json").write_text(json.dumps({"machine": info, "notes": notes, "results": rows,
                                                "ratios": summary}, indent=1) + "\n")
    plot(rows, out / "inner.png", info)
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
