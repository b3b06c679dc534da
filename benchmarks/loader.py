"""Race ways of producing the same batches of tasks, side by side in one run.

Batch size 32. Methods (each does the same work per task: benchmarks/_workloads.py):

    in-loop            the "traditional approach": in the training loop, one thread, for each
                       BatchSpec ``[sample_task(fold_in(spec.key, j), idx, n_ctx, n_tgt) ...]``
                       then ``optree.tree_map(lambda *xs: torch.from_numpy(np.stack(xs)), *outs)``
    metabatch 0.9.1    the PyPI release's TaskSet/TaskLoader (``n_batches``, ``shuffle=True``), in its
                       own process (it has our import name); ``__gettask__`` draws from the global
                       ``np.random``. It raises with num_workers=0 on torch 2: workers >= 1 only.
    task_loader        ``mb.task_loader(sample_task, mb.batch_specs(...), num_workers=w)``;
                       ``sample_task`` draws from ``mb.random.numpy_rng(key)``
    torch sharing      the same task_loader with ``collate_fn=mb.stack``: workers stack the batch into
                       tensors and DataLoader ships them with torch's own tensor sharing (one
                       shared-memory segment per leaf, its file descriptor fetched per batch) instead of
                       metabatch's transport (one pooled buffer per batch, sent once); the ratio
                       ``transport_vs_torch_sharing`` says whether the transport pays
    compat TaskLoader  ``mb.TaskLoader`` over a ``mb.TaskSet`` subclass written in 0.9.1 style
                       (``__gettask__(idx, n_context, n_target)`` on the global ``np.random``, which
                       the compat layer seeds once per batch from the batch key)

Workloads:
    light   sinusoid regression, n_ctx U{1..5}, n_tgt U{1..10} (0.9.1 and compat: n_tgt
            U{n_ctx..10}, their sampling rule), tens of microseconds a task
    medium  5-way 1-shot 15-query classification from an in-memory uint8 array [400, 20, 28, 28],
            a random 90-degree rotation per class, float32 images in [0, 1] + int64 labels

Method: for every configuration, build the loader, skip the first batches (worker start-up),
time whole batches for >= 2 s (light) / >= 3 s (medium), touching every memory page of every
leaf of every batch (so that shared-memory transport is paid for, as a training step would);
repeat 3 times with the methods interleaved (repeat-major) and report the median and the
spread (min, max). Then iterate task_loader light (and medium) with 2 workers for a long run,
sampling the RSS of the main process and of each worker.

Setup (metabatch 0.9.1 lives outside the environment, since it has our import name):
    pip install --target /tmp/mb091 --no-deps metabatch==0.9.1
    python benchmarks/loader.py [--quick] [--out DIR] [--mb091-dir /tmp/mb091]

Without /tmp/mb091 (or --mb091-dir) the 0.9.1 rows are skipped with a message.
Writes DIR/loader.json and DIR/loader.png (DIR defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import optree
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _workloads as W  # noqa: E402 (benchmarks/_workloads.py, found through sys.path above)

BATCH = 32
NUM_TASKS = 10_000
SEED = 0
METHODS = ["in-loop", "metabatch 0.9.1", "task_loader", "torch sharing", "compat TaskLoader"]
WORKERS = {"in-loop": [0], "metabatch 0.9.1": [1, 2, 3], "task_loader": [0, 1, 2, 3], "torch sharing": [1, 2],
           "compat TaskLoader": [0, 1, 2]}
WORKLOADS = {
    "light": {"n_ctx": (1, 5), "n_tgt": (1, 10), "min_time": 2.0,
              "title": "light: sinusoid, n_ctx 1-5, n_tgt 1-10"},
    "medium": {"n_ctx": 1, "n_tgt": 15, "min_time": 3.0,
               "title": "medium: 5-way 1-shot 15-query, 28x28, rot90"},
}
TARGETS = {
    "light_w2_vs_0.9.1": ">= 10",
    "medium_w2_vs_ideal": ">= 0.85 (ideal = 2 x in-loop)",
    "compat_vs_task_loader": ">= 0.90 (within 10 %)",
    "transport_vs_torch_sharing": "> 1 (else the transport does not pay and goes)",
    "in_loop_vs_w0": "<= 1.10 (task_loader w=0 cost relative to in-loop)",
    "rss": "flat (last - first small against first)",
}

# ------------------------------------------------------------------ our task functions

_numpy_rng = None  # metabatch.random.numpy_rng, bound in main(); fork workers inherit it


def light_task(key, idx, n_ctx, n_tgt):
    return W.sinusoid(_numpy_rng(key), n_ctx, n_tgt)


def medium_task(key, idx, n_ctx, n_tgt):
    return W.classification(_numpy_rng(key), n_ctx, n_tgt)


TASKS = {"light": light_task, "medium": medium_task}
LEGACY = {"light": W.sinusoid, "medium": W.classification}


def legacy_sizes(workload):
    """0.9.1 / compat TaskSet size arguments (in 0.9.1's positional order) giving the workload's sizes."""
    if workload == "light":  # n_context U{1..5}, n_target U{n_context..10}
        return {"min_pts": 1, "max_ctx_pts": 5, "max_tgt_pts": 10, "total_tgt_pts": None, "eval": False,
                "predict_full_target": False, "predict_full_target_during_eval": False}
    return {"min_pts": 1, "max_ctx_pts": 1, "max_tgt_pts": 15, "total_tgt_pts": 15, "eval": False,  # 1 and 15
            "predict_full_target": True, "predict_full_target_during_eval": False}


# ------------------------------------------------------------------------- measuring


def touch(batch) -> int:
    """Read one element per 4 KiB page of every leaf; return the number of tasks."""
    leaves = optree.tree_leaves(batch)
    for leaf in leaves:
        flat = leaf.reshape(-1)
        flat[::max(1, 4096 // leaf.element_size())].sum()
    return leaves[0].shape[0]


def _cpu_s(pid) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children() -> list:
    pids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def measure(make, min_time, warmup) -> dict:
    """Time whole batches of ``make()`` (an iterator) for >= min_time s after ``warmup`` batches."""
    load = loadavg1()
    it = make()
    for _ in range(warmup):
        touch(next(it))
    kids = children()
    k0 = {p: _cpu_s(p) for p in kids}
    busy0 = busy_cpu_s()
    c0, t0 = time.process_time(), time.perf_counter()
    tasks = batches = 0
    while True:
        tasks += touch(next(it))
        batches += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            break
    main_cpu = time.process_time() - c0
    kids_cpu = sum(_cpu_s(p) - k0[p] for p in kids)
    others = max(0.0, busy_cpu_s() - busy0 - main_cpu - kids_cpu) / elapsed
    del it
    gc.collect()
    return {"tasks_per_s": tasks / elapsed, "batches": batches, "seconds": elapsed,
            "main_cpu_us_per_task": 1e6 * main_cpu / tasks, "children_cpu_us_per_task": 1e6 * kids_cpu / tasks,
            "loadavg_1min_before": load, "other_processes_cores": round(others, 2)}


def rss_mb(pid="self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------- our methods


def in_loop(workload):
    import metabatch as mb

    task, fold_in = TASKS[workload], mb.random.fold_in
    cfg = WORKLOADS[workload]
    specs = mb.batch_specs(SEED, NUM_TASKS, BATCH, cfg["n_ctx"], cfg["n_tgt"])
    for spec in specs:
        outs = [task(fold_in(spec.key, j), idx, spec.n_ctx, spec.n_tgt) for j, idx in enumerate(spec.indices)]
        yield optree.tree_map(lambda *xs: torch.from_numpy(np.stack(xs)), *outs)


def make_task_loader(workload, workers, **options):
    import metabatch as mb

    cfg = WORKLOADS[workload]
    specs = mb.batch_specs(SEED, NUM_TASKS, BATCH, cfg["n_ctx"], cfg["n_tgt"])
    return mb.task_loader(TASKS[workload], specs, num_workers=workers, **options)


def compat_taskset(workload):
    import metabatch as mb

    gettask = LEGACY[workload]

    class LegacyTaskSet(mb.TaskSet):  # 0.9.1 style: the global np.random inside
        def __len__(self):
            return NUM_TASKS

        def __gettask__(self, idx, n_context, n_target):
            return gettask(np.random, n_context, n_target)

    return LegacyTaskSet(**legacy_sizes(workload))


def make_compat(workload, workers):
    import metabatch as mb

    return mb.TaskLoader(compat_taskset(workload), batch_size=BATCH, shuffle=True, n_batches=10**7,
                         num_workers=workers, seed=SEED)


def run_ours(method, workload, workers, min_time, warmup):
    def make():
        if method == "in-loop":
            return in_loop(workload)
        if method == "task_loader":
            return iter(make_task_loader(workload, workers))
        if method == "torch sharing":
            import metabatch as mb

            return iter(make_task_loader(workload, workers, collate_fn=mb.stack))
        return iter(make_compat(workload, workers))

    return measure(make, min_time, warmup)


# ------------------------------------------------------------- metabatch 0.9.1 (child)


def child_mb091(spec) -> dict:
    """Runs in a process whose PYTHONPATH puts metabatch 0.9.1 first."""
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    import metabatch as old

    where = pathlib.Path(old.__file__).resolve()
    if hasattr(old, "task_loader") or not str(where).startswith(str(pathlib.Path(spec["dir"]).resolve())):
        raise RuntimeError(f"expected metabatch 0.9.1 from {spec['dir']}, imported {where}")
    out = {"imported_from": str(where.parent), "results": {}}
    for workload in spec["workloads"]:
        min_time = spec["min_time"] if spec["quick"] else WORKLOADS[workload]["min_time"]
        if spec.get("probe_w0") and "w0_error" not in out:
            try:
                touch(next(_mb091_iter(old, workload, 0)))
                out["w0_error"] = None
            except Exception as err:  # noqa: BLE001  (recorded, not fatal)
                out["w0_error"] = f"{type(err).__name__}: {err}"[:300]
        for w in spec["workers"]:
            make = functools.partial(_mb091_iter, old, workload, w)
            out["results"][f"{workload}/{w}"] = measure(make, min_time, spec["warmup"])
    return out


def _mb091_iter(old, workload, workers):
    """An iterator over metabatch 0.9.1's TaskLoader (``old`` is its package) for ``workload``."""
    gettask = LEGACY[workload]

    class OldTaskSet(old.TaskSet):  # 0.9.1's README pattern: the global np.random inside
        def __len__(self):
            return NUM_TASKS

        def __gettask__(self, idx, n_context, n_target):
            return gettask(np.random, n_context, n_target)

    dataset = OldTaskSet(*legacy_sizes(workload).values())  # 0.9.1 takes all seven, no defaults
    return iter(old.TaskLoader(dataset, BATCH, shuffle=True, n_batches=10**7, num_workers=workers))


def run_mb091(mb091_dir, workloads, workers, quick, min_time, warmup, probe_w0):
    spec = {"dir": str(mb091_dir), "workloads": workloads, "workers": workers, "quick": quick,
            "min_time": min_time, "warmup": warmup, "probe_w0": probe_w0}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(mb091_dir), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--child-mb091", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"metabatch 0.9.1 child failed (rc {proc.returncode}): {tail}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------ RSS


def rss_run(workload, batches, every, workers=2) -> dict:
    it = iter(make_task_loader(workload, workers))
    touch(next(it))  # the workers exist from the first batch on
    pids = children()
    samples = [{"batch": 1, "main_mb": round(rss_mb(), 1), "workers_mb": [round(rss_mb(p), 1) for p in pids]}]
    t0 = time.perf_counter()
    for b in range(2, batches + 1):
        touch(next(it))
        if b % every == 0:
            samples.append({"batch": b, "main_mb": round(rss_mb(), 1),
                            "workers_mb": [round(rss_mb(p), 1) for p in pids]})
    elapsed = time.perf_counter() - t0
    del it
    gc.collect()

    def summary(values):
        return {"first": values[0], "last": values[-1], "max": max(values), "min": min(values)}

    main = [s["main_mb"] for s in samples]
    per_worker = [summary([s["workers_mb"][i] for s in samples]) for i in range(len(pids))]
    return {"workload": workload, "workers": workers, "batches": batches, "every": every,
            "seconds": elapsed, "main_mb": summary(main), "workers_mb": per_worker, "samples": samples}


# --------------------------------------------------------------------------- machine


def other_benchmarks() -> list:
    """Command lines of other running benchmark scripts (not this process or its ancestors)."""
    mine, pid = set(), os.getpid()
    while pid > 1:
        mine.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    out = subprocess.run(["pgrep", "-af", "benchmarks/"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if line and int(line.split()[0]) not in mine]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have spent so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def idle_fraction(seconds: float = 10.0) -> float:
    """The fraction of all cores' time spent idle over the next ``seconds`` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def loadavg1() -> float:
    """The 1-minute load average (what ``uptime`` shows first)."""
    return float(loadavg().split()[0])


def machine() -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    import metabatch as mb

    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "optree": optree.__version__, "python": platform.python_version(), "metabatch": mb.__version__,
            "start_method": __import__("multiprocessing").get_start_method(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": loadavg()}


# --------------------------------------------------------------------------- results


def med(rows, method, workload, workers):
    row = rows.get(method, {}).get(workload, {}).get(str(workers))
    return None if row is None or "median" not in row else row["median"]


def ratios(rows) -> dict:
    def r(a, b):
        return None if a is None or b is None else round(a / b, 3)

    out = {
        "light_w2_vs_0.9.1": r(med(rows, "task_loader", "light", 2), med(rows, "metabatch 0.9.1", "light", 2)),
        "medium_w2_vs_0.9.1": r(med(rows, "task_loader", "medium", 2), med(rows, "metabatch 0.9.1", "medium", 2)),
        "medium_w2_vs_ideal": r(med(rows, "task_loader", "medium", 2), None if med(rows, "in-loop", "medium", 0)
                                is None else 2 * med(rows, "in-loop", "medium", 0)),
        "light_w2_vs_ideal": r(med(rows, "task_loader", "light", 2), None if med(rows, "in-loop", "light", 0)
                               is None else 2 * med(rows, "in-loop", "light", 0)),
    }
    for workload in WORKLOADS:
        out[f"in_loop_vs_w0/{workload}"] = r(med(rows, "in-loop", workload, 0), med(rows, "task_loader", workload, 0))
        for w in WORKERS["compat TaskLoader"]:
            out[f"compat_vs_task_loader/{workload}/{w}"] = r(med(rows, "compat TaskLoader", workload, w),
                                                              med(rows, "task_loader", workload, w))
        for w in WORKERS["torch sharing"]:
            out[f"transport_vs_torch_sharing/{workload}/{w}"] = r(med(rows, "task_loader", workload, w),
                                                                   med(rows, "torch sharing", workload, w))
    return out


def summarise(runs) -> dict:
    """{method: {workload: {workers: {median, min, max, spread, runs}}}} from the list of repeats."""
    rows = {}
    for (method, workload, workers), reps in runs.items():
        rates = [rep["tasks_per_s"] for rep in reps]
        row = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
               "spread": (max(rates) - min(rates)) / statistics.median(rates),
               "main_cpu_us_per_task": statistics.median(rep["main_cpu_us_per_task"] for rep in reps),
               "children_cpu_us_per_task": statistics.median(rep["children_cpu_us_per_task"] for rep in reps),
               "loadavg_1min": [rep.get("loadavg_1min_before") for rep in reps],
               "other_processes_cores": [rep.get("other_processes_cores") for rep in reps],
               "runs": reps}
        rows.setdefault(method, {}).setdefault(workload, {})[str(workers)] = row
    return rows


def table(rows) -> str:
    cols = [(m, w) for m in METHODS for w in WORKERS[m]]
    lines = [f"{'method':18s} {'w':>2s} " + "".join(f"{wl:>26s}" for wl in WORKLOADS)]
    for method, w in cols:
        cells = []
        for workload in WORKLOADS:
            row = rows.get(method, {}).get(workload, {}).get(str(w))
            if row is None or "median" not in row:
                cells.append(f"{'-':>26s}")
            else:
                cells.append(f"{row['median']:>11,.0f} [{row['min']:>6,.0f}-{row['max']:>6,.0f}]".rjust(26))
        lines.append(f"{method:18s} {w:>2d} " + "".join(cells))
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(12, 4.8))
    styles = {"metabatch 0.9.1": ("tab:red", "s", 4), "task_loader": ("tab:blue", "o", 4),
              "torch sharing": ("tab:purple", "v", -11), "compat TaskLoader": ("tab:green", "^", -11)}
    for ax, workload in zip(axes, WORKLOADS, strict=False):
        base = med(rows, "in-loop", workload, 0)
        if base is not None:
            ax.axhline(base / 1e3, color="black", ls="--", lw=1, label=f"in-loop, 1 thread ({base / 1e3:.1f}k)")
            cores = result["machine"]["cores_usable"]
            ideal_w = list(range(4))
            ax.plot(ideal_w, [base * min(max(w, 1), cores) / 1e3 for w in ideal_w], color="grey", ls=":", lw=1,
                    label=f"ideal: min(max(w, 1), {cores} cores) x in-loop")
        for method, (color, marker, dy) in styles.items():
            data = rows.get(method, {}).get(workload, {})
            ws = sorted(int(w) for w in data if "median" in data[w])
            if not ws:
                continue
            y = [data[str(w)]["median"] / 1e3 for w in ws]
            err = [[(data[str(w)]["median"] - data[str(w)]["min"]) / 1e3 for w in ws],
                   [(data[str(w)]["max"] - data[str(w)]["median"]) / 1e3 for w in ws]]
            ax.errorbar(ws, y, yerr=err, color=color, marker=marker, capsize=3, label=method)
            for w, v in zip(ws, y, strict=False):
                ax.annotate(f"{v:.1f}", (w, v), textcoords="offset points", xytext=(5, dy), fontsize=7, color=color)
        ax.set_title(WORKLOADS[workload]["title"], fontsize=10)
        ax.set_xlabel("num_workers (0 = in the main process)")
        ax.set_ylabel("thousand tasks / s (median of repeats, bars: min-max)")
        ax.set_xticks(range(4))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    m = result["machine"]
    fig.suptitle(f"metabatch loader, batch {BATCH} - {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
                 f"{m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


# ------------------------------------------------------------------- pin_memory to a GPU


def pin_memory_row(batches: int = 200, workers: int = 2, workload: str = "medium") -> dict:
    """tasks/s of task_loader batches carried to the GPU: pageable + blocking copy vs pin_memory + non_blocking.

    Each batch's leaves go to ``cuda`` with ``.to(device, non_blocking=pin)`` and the step ends with
    one ``torch.cuda.synchronize()``, as a training loop's next kernel would wait for them. The two
    settings run interleaved, 3 repeats each, after 5 warm-up batches; returns the medians and their
    ratio. Without CUDA it returns ``{"skipped": reason}`` and measures nothing.
    """
    import metabatch as mb

    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available: pin_memory + non_blocking needs a GPU"}
    cfg = WORKLOADS[workload]
    device = torch.device("cuda")
    runs = {"pageable, blocking": [], "pin_memory, non_blocking": []}
    for repeat in range(3):
        for name, pin in (("pageable, blocking", False), ("pin_memory, non_blocking", True)):
            specs = mb.batch_specs(SEED + repeat, NUM_TASKS, BATCH, cfg["n_ctx"], cfg["n_tgt"],
                                   num_batches=batches + 5)
            loader = mb.task_loader(TASKS[workload], specs, num_workers=workers, pin_memory=pin)
            it = iter(loader)
            move = functools.partial(torch.Tensor.to, device=device, non_blocking=pin)
            for _ in range(5):
                optree.tree_map(move, next(it))
            torch.cuda.synchronize()
            start, tasks = time.perf_counter(), 0
            for batch in it:
                moved = optree.tree_map(move, batch)
                torch.cuda.synchronize()
                tasks += optree.tree_leaves(moved)[0].shape[0]
            runs[name].append(tasks / (time.perf_counter() - start))
            del it, loader
    med_ = {name: statistics.median(v) for name, v in runs.items()}
    return {"workload": workload, "workers": workers, "batches": batches, "tasks_per_s": med_, "repeats": runs,
            "gpu": torch.cuda.get_device_name(0),
            "pinned_over_pageable": med_["pin_memory, non_blocking"] / med_["pageable, blocking"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (seconds)")
    parser.add_argument("--out", default=str(HERE / "results"), help="where loader.json / loader.png go")
    parser.add_argument("--mb091-dir", default="/tmp/mb091", help="pip install --target DIR metabatch==0.9.1")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other benchmarks to finish")
    parser.add_argument("--min-idle", type=float, default=None,
                        help="also wait until the cores were at least this idle (0-1) over 10 s: the cores are "
                             "shared, and a busy core caps every worker configuration")
    parser.add_argument("--max-wait", type=float, default=900, help="seconds to wait at most (default 900)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--max-other-cores", type=float, default=None,
                        help="measure a configuration again (up to --retries times) when other processes used "
                             "more than this many cores meanwhile; the least contended attempt counts, the "
                             "others are kept in the JSON under 'discarded'")
    parser.add_argument("--retries", type=int, default=3, help="extra attempts per configuration (default 3)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="race only these methods (default: all)")
    parser.add_argument("--pin-memory", action="store_true",
                        help="only the GPU row: pin_memory + non_blocking against pageable copies "
                             "(writes loader_pin_memory.json; needs CUDA)")
    parser.add_argument("--child-mb091", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pin_memory:
        row = pin_memory_row(batches=20 if args.quick else 200)
        if "skipped" in row:
            parser.error(f"--pin-memory: {row['skipped']}")
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.out) / "loader_pin_memory.json").write_text(
            json.dumps({"machine": machine(), "pin_memory": row}, indent=1) + "\n")
        print(json.dumps(row["tasks_per_s"]), f"pinned/pageable {row['pinned_over_pageable']:.2f}x")
        return
    if args.child_mb091:
        print(json.dumps(child_mb091(json.loads(args.child_mb091))))
        return
    out_dir = pathlib.Path(args.out)
    if args.replot:
        plot(json.loads((out_dir / "loader.json").read_text()), out_dir / "loader.png")
        return

    global _numpy_rng
    # 3 workers on 2 cores is deliberate (it shows the cost of oversubscription).
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    from metabatch.random import numpy_rng as _numpy_rng

    repeats, warmup = (1, 2) if args.quick else (args.repeats, 5)

    def contended(res):
        """Why a measurement does not count (other processes took cores meanwhile), or None."""
        if args.max_other_cores is None or res["other_processes_cores"] <= args.max_other_cores:
            return None
        return f"other processes used {res['other_processes_cores']} cores"

    def least_contended(attempts):
        best = min(attempts, key=lambda r: r["other_processes_cores"])
        return dict(best, attempts=len(attempts), discarded=[a for a in attempts if a is not best])
    min_times = {wl: (0.3 if args.quick else cfg["min_time"]) for wl, cfg in WORKLOADS.items()}
    idle, wait_start = None, time.monotonic()

    def busy():
        nonlocal idle
        if args.min_idle is None:
            return False
        idle = idle_fraction(10.0)
        return idle < args.min_idle

    others = other_benchmarks()
    while (others or busy()) and not args.no_wait and time.monotonic() - wait_start < args.max_wait:
        why = f"other benchmarks to finish: {others}" if others else f"idle CPU {idle:.0%} < {args.min_idle:.0%}"
        print(f"waiting: {why}", flush=True)
        time.sleep(5)
        others = other_benchmarks()
    waited = round(time.monotonic() - wait_start, 1)
    info = machine()
    info["other_benchmarks_at_start"] = others
    info["waited_s"] = waited
    info["idle_before_start"] = idle
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, numpy {info['numpy']}, "
          f"python {info['python']}; loadavg {info['loadavg_start']}", flush=True)
    W.images()  # made before any fork: workers share it

    mb091_dir = pathlib.Path(args.mb091_dir)
    mb091_ok = (mb091_dir / "metabatch" / "dataloader.py").exists()
    skipped = None
    if not mb091_ok:
        skipped = (f"metabatch 0.9.1 not found in {mb091_dir}: skipped. Install it with "
                   f"`pip install --target {mb091_dir} --no-deps metabatch==0.9.1`.")
        print(skipped, flush=True)

    runs, mb091_meta = {}, {}
    t_start = time.perf_counter()
    for rep in range(repeats):
        for workload in WORKLOADS:
            for method in args.methods:
                if method == "metabatch 0.9.1":
                    if not mb091_ok:
                        continue
                    try:
                        children_runs = []
                        for attempt in range(1 + args.retries):
                            child = run_mb091(mb091_dir, [workload], WORKERS[method], args.quick,
                                              min_times[workload], warmup, probe_w0=(rep == 0))
                            children_runs.append(child)
                            if all(contended(res) is None for res in child["results"].values()):
                                break
                            if attempt < args.retries:
                                print(f"    {method} {workload}: other processes busy, measuring again", flush=True)
                    except Exception as err:  # noqa: BLE001
                        print(f"  {err}", flush=True)
                        skipped = str(err)
                        continue
                    mb091_meta.update({k: v for k, v in child.items() if k != "results"})
                    for key in child["results"]:
                        res = least_contended([c["results"][key] for c in children_runs])
                        w = int(key.split("/")[1])
                        runs.setdefault((method, workload, w), []).append(res)
                        print(f"  rep {rep} {workload:6s} {method:18s} w={w}: {res['tasks_per_s']:>9,.0f} tasks/s",
                              flush=True)
                    continue
                for w in WORKERS[method]:
                    attempts = []
                    for attempt in range(1 + args.retries):
                        attempts.append(run_ours(method, workload, w, min_times[workload], warmup))
                        if contended(attempts[-1]) is None:
                            break
                        if attempt < args.retries:
                            print(f"    {method} {workload} w={w}: {contended(attempts[-1])}, measuring again",
                                  flush=True)
                    res = least_contended(attempts)
                    runs.setdefault((method, workload, w), []).append(res)
                    print(f"  rep {rep} {workload:6s} {method:18s} w={w}: {res['tasks_per_s']:>9,.0f} tasks/s",
                          flush=True)
    race_s = time.perf_counter() - t_start

    print("RSS runs (task_loader, 2 workers)...", flush=True)
    rss = [rss_run("light", 1000 if args.quick else 10_000, 100 if args.quick else 500),
           rss_run("medium", 200 if args.quick else 1500, 20 if args.quick else 100)]

    rows = summarise(runs)
    info["loadavg_end"] = loadavg()
    result = {
        "machine": info,
        "settings": {"batch_size": BATCH, "num_tasks": NUM_TASKS, "repeats": repeats, "warmup_batches": warmup,
                     "min_idle": args.min_idle, "max_other_cores": args.max_other_cores, "retries": args.retries,
                     "min_time_s": min_times, "quick": args.quick, "race_seconds": round(race_s, 1),
                     "workloads": WORKLOADS, "workers": WORKERS,
                     "touch": "one element per 4 KiB page of every leaf of every batch is read"},
        "mb091": {"dir": str(mb091_dir), "skipped": skipped, **mb091_meta},
        "notes": ("tasks/s over whole batches of 32; median of the repeats, min/max alongside; "
                  "main_cpu_us_per_task / children_cpu_us_per_task: CPU time of the main process / of its "
                  "children (workers, 0.9.1's Manager) per task during the timed window. 0.9.1 and compat "
                  "draw light's n_tgt from U{n_ctx..10} (their rule), the others from U{1..10}."),
        "targets": TARGETS,
        "ratios": ratios(rows),
        "rss": rss,
        "results": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "loader.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / "loader.png")

    print("\ntasks/s, batch 32: median [min-max] of", repeats, "repeat(s)")
    print(table(rows))
    print("\nratios (targets):")
    for name, value in result["ratios"].items():
        target = next((t for k, t in TARGETS.items() if name.startswith(k)), "")
        print(f"  {name:34s} {value if value is not None else '-':>7}   {target}")
    for r in rss:
        workers = ", ".join(f"{w['first']:.0f}/{w['last']:.0f}/{w['max']:.0f}" for w in r["workers_mb"])
        print(f"RSS {r['workload']} {r['batches']} batches, first/last/max MB: main {r['main_mb']['first']:.0f}/"
              f"{r['main_mb']['last']:.0f}/{r['main_mb']['max']:.0f}; workers {workers}")
    print(f"loadavg start {info['loadavg_start']} / end {info['loadavg_end']}; wrote {out_dir}/loader.json, loader.png")


if __name__ == "__main__":
    main()
