"""Task data larger than memory: memory-mapped class arrays against in-memory ones, side by side.

A synthetic uint8 class array [C, 600, 3, 84, 84] (mini-ImageNet's shape; 12.7 MB a class) of each
--sizes GB is written once to --data-dir as .npy. For each size and start method (fork, spawn), a
fresh process runs `mb.task_loader(mb.tasks.classification(images, ways=5), ...)` with --workers
workers, 5-way 1-shot 15-query, 4 tasks a batch, for one epoch of its classes (C tasks), with the
images held two ways:

    mmap        `mb.tasks.mmap_array(path)`: a read-only memory map that pickles by reference (what the
                dataset readers now return); workers map the file and share the page cache
    in-memory   `np.load(path)`: the array in the main process's memory (what the readers returned
                before); fork shares it copy-on-write, spawn pickles a copy into every worker

plus a tiny set (5 classes, "empty") for the baseline memory of a worker. Sizes where the in-memory
copies would not fit (main + workers > 60 % of RAM) are skipped for in-memory.

Measured per cell: the time to open the array, the time from creating the loader to the first batch,
tasks/s once every worker has delivered a batch (an epoch, at least --min-batches batches), and from /proc/<pid>/smaps_rollup of the main process and of each worker, after the first
batch and at the end of the epoch: RSS, PSS, USS (Private_Clean + Private_Dirty), USS without
clean file pages (Private_Dirty: anonymous memory, the copies), Pss_Anon, Pss_File. Clean pages of a
mapped file that only one process touched count in its USS although they are page cache the kernel
can drop at any time; both numbers are reported. The file's pages are evicted from the page cache
(posix_fadvise DONTNEED) before each cell unless --warm, so every cell starts cold.

Targets (issue 17): first batch under spawn <= 1 s at every size; each worker's USS within 100 MB of
its value for the empty set, at every size; the 8 GB set iterates a full epoch with the summed USS of
all processes <= 1 GB.

    python benchmarks/memory.py --sizes 0.5 2 8 --data-dir /tmp/metabatch-memory   # the full run
    python benchmarks/memory.py --sizes 0.1 0.5 --name memory_quick                 # a quick check

Writes DIR/<name>.json and DIR/<name>.png (DIR: --out, default benchmarks/results; name: memory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PER_CLASS, ITEM = 600, (3, 84, 84)
CLASS_BYTES = PER_CLASS * int(np.prod(ITEM))
BATCH, WAYS, N_CTX, N_TGT = 4, 5, 1, 15
MODES = ("mmap", "in-memory")
TARGETS = {"first_batch_spawn_s": "<= 1 s at every size (mmap)",
           "worker_uss_vs_empty_mb": "<= 100 MB above the empty set's, every size (mmap)",
           "sum_uss_8gb_epoch_mb": "<= 1024 MB (mmap, 8 GB set, one epoch)"}


# --------------------------------------------------------------------------- data


def dataset(folder: pathlib.Path, gb: float | None) -> pathlib.Path:
    """The synthetic set of ``gb`` GB (``None``: the 5-class "empty" set), written once, in chunks."""
    classes = 5 if gb is None else max(WAYS, round(gb * 2**30 / CLASS_BYTES))
    path = folder / f"classes-{classes}x{PER_CLASS}x{'x'.join(map(str, ITEM))}.npy"
    shape = (classes, PER_CLASS) + ITEM
    if path.exists():
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            if np.lib.format.read_array_header_1_0(f)[0] == shape and path.stat().st_size >= math.prod(shape):
                return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    rng = np.random.default_rng(classes)
    print(f"writing {path} ({math.prod(shape) / 2**30:.2f} GiB) ...", flush=True)
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for _ in range(classes):
            f.write(rng.integers(0, 256, (PER_CLASS,) + ITEM, dtype=np.uint8).tobytes())
    os.replace(tmp, path)
    return path


def evict(path: pathlib.Path) -> None:
    """Drop the file's pages from the page cache (ours only; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ measuring


FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty")


def smaps(pid) -> dict | None:
    """MB figures of /proc/<pid>/smaps_rollup, plus uss = Private_Clean + Private_Dirty."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        if name in FIELDS:
            kb[name] = int(rest.split()[0])
    mb = {k.lower(): v / 1024 for k, v in kb.items()}
    mb["uss"] = (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024
    mb["uss_anon"] = kb.get("Private_Dirty", 0) / 1024
    return mb


def snapshot(main_pid: int, workers: list) -> dict:
    return {"main": smaps(main_pid), "workers": [smaps(w) for w in workers]}


def workers_of(pid: int) -> list:
    """The loader workers among the descendants of ``pid`` (not multiprocessing's helper processes)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                try:
                    with open(f"/proc/{kid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                todo.append(kid)
                helper = "resource_tracker" in cmd or ("forkserver import main" in cmd and p == pid)
                if not helper:  # the forkserver's own children (the workers) share its command line
                    found.append(kid)
    return sorted(found)


def touch(batch) -> int:
    import optree

    leaves = optree.tree_leaves(batch)
    for leaf in leaves:
        flat = leaf.reshape(-1)
        flat[::max(1, 4096 // leaf.element_size())].sum()
    return leaves[0].shape[0]


def cell(spec: dict) -> dict:
    """One measurement, in its own process: spec = {path, mode, method, workers, epochs}."""
    import torch

    import metabatch as mb

    torch.set_num_threads(1)
    path = pathlib.Path(spec["path"])
    tic = time.perf_counter()
    images = mb.tasks.mmap_array(path) if spec["mode"] == "mmap" else np.load(path)
    open_s = time.perf_counter() - tic
    sample_task = mb.tasks.classification(images, ways=WAYS)
    num_classes = len(images)
    num_batches = max(math.ceil(spec["epochs"] * num_classes / BATCH), spec["min_batches"])
    specs = mb.batch_specs(seed=0, num_tasks=num_classes, batch_size=BATCH, n_ctx=N_CTX, n_tgt=N_TGT,
                           num_batches=num_batches)
    before = smaps("self")
    tic = time.perf_counter()
    loader = mb.task_loader(sample_task, specs, num_workers=spec["workers"],
                            multiprocessing_context=spec["method"])
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - tic
    tasks = touch(first)
    workers = workers_of(os.getpid())
    at_first = snapshot(os.getpid(), workers)
    for _ in range(spec["workers"] - 1):  # every worker has started and delivered once: the rate starts here
        tasks += touch(next(it))
    peak = {"main": 0.0, "workers": [0.0] * len(workers), "sum": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            snap = snapshot(os.getpid(), workers)
            uss = [s["uss"] if s else 0.0 for s in snap["workers"]]
            main = snap["main"]["uss"] if snap["main"] else 0.0
            peak["main"] = max(peak["main"], main)
            peak["workers"] = [max(a, b) for a, b in zip(peak["workers"], uss)]
            peak["sum"] = max(peak["sum"], main + sum(uss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tic = time.perf_counter()
    start = tic - first_s
    rest, at_end = 0, None
    received = spec["workers"]
    for batch in it:
        rest += touch(batch)
        received += 1
        if received == num_batches - 1:  # the workers exit with the iterator: measure them before the end
            at_end = snapshot(os.getpid(), workers)
    seconds = time.perf_counter() - tic
    if at_end is None:
        at_end = at_first
    stop.set()
    sampler.join()
    del it, loader
    return {"classes": num_classes, "gb": path.stat().st_size / 2**30, "open_s": open_s, "first_batch_s": first_s,
            "tasks": tasks + rest, "batches": num_batches, "tasks_per_s": rest / seconds if rest else None,
            "epoch_s": time.perf_counter() - start,
            "main_before_loader": before, "after_first_batch": at_first, "end": at_end, "peak_uss": peak,
            "workers": len(workers)}


def run_cell(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- results


def machine() -> dict:
    import torch

    import metabatch as mb

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": mem["MemTotal"] / 2**20, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "metabatch": mb.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": load}


def summary(cells: list) -> dict:
    """Targets and ratios from the cells."""
    def find(size, method, mode):
        return next((c for c in cells if c["size"] == size and c["method"] == method and c["mode"] == mode
                     and "error" not in c and "skipped" not in c), None)

    out = {"targets": TARGETS, "checks": {}, "ratios": {}}
    for method in sorted({c["method"] for c in cells}):
        empty = find("empty", method, "mmap")
        base = max((w["uss"] for w in empty["end"]["workers"] if w), default=None) if empty else None
        for size in sorted({c["size"] for c in cells if c["size"] != "empty"}, key=float):
            mm = find(size, method, "mmap")
            if mm is None:
                continue
            workers_uss = [w["uss"] for w in mm["end"]["workers"] if w]
            workers_anon = [w["uss_anon"] for w in mm["end"]["workers"] if w]
            key = f"{size}GB/{method}"
            check = {"first_batch_s": mm["first_batch_s"], "open_s": mm["open_s"], "worker_uss_mb": workers_uss,
                     "worker_uss_anon_mb": workers_anon, "empty_worker_uss_mb": base,
                     "sum_uss_mb": mm["end"]["main"]["uss"] + sum(workers_uss),
                     "peak_sum_uss_mb": mm["peak_uss"]["sum"], "tasks_per_s": mm["tasks_per_s"]}
            if base is not None:
                check["worker_uss_above_empty_mb"] = max(workers_uss) - base
                check["worker_uss_target_met"] = max(workers_uss) - base <= 100
            if method == "spawn":
                check["first_batch_target_met"] = mm["first_batch_s"] <= 1.0
                if empty is not None:  # what the data adds to starting the workers
                    check["first_batch_above_empty_s"] = mm["first_batch_s"] - empty["first_batch_s"]
            out["checks"][key] = check
            mem = find(size, method, "in-memory")
            if mem is not None:
                out["ratios"][key] = {
                    "first_batch_in_memory_over_mmap": mem["first_batch_s"] / mm["first_batch_s"],
                    "worker_uss_in_memory_over_mmap": (max(w["uss"] for w in mem["end"]["workers"] if w)
                                                       / max(workers_uss)) if workers_uss else None,
                    "open_plus_first_batch_in_memory_over_mmap": ((mem["open_s"] + mem["first_batch_s"])
                                                                  / (mm["open_s"] + mm["first_batch_s"])),
                    "tasks_per_s_mmap_over_in_memory": (mm["tasks_per_s"] / mem["tasks_per_s"]
                                                        if mm["tasks_per_s"] and mem["tasks_per_s"] else None),
                    "open_plus_epoch_in_memory_over_mmap": ((mem["open_s"] + mem["epoch_s"])
                                                            / (mm["open_s"] + mm["epoch_s"])),
                    "worker_uss_anon_in_memory_over_mmap": (max(w["uss_anon"] for w in mem["end"]["workers"] if w)
                                                            / max(workers_anon)) if workers_anon else None}
    return out


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if "error" not in c and "skipped" not in c]
    sizes = sorted({c["size"] for c in cells}, key=lambda s: -1.0 if s == "empty" else float(s))
    methods = sorted({c["method"] for c in cells})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / (len(methods) * len(MODES))
    colors = {("fork", "mmap"): "tab:blue", ("spawn", "mmap"): "tab:green",
              ("fork", "in-memory"): "lightsteelblue", ("spawn", "in-memory"): "darkseagreen"}
    for k, (method, mode) in enumerate((m, d) for m in methods for d in MODES):
        xs, first, uss, anon, total = [], [], [], [], []
        for i, size in enumerate(sizes):
            c = next((c for c in cells if c["size"] == size and c["method"] == method and c["mode"] == mode), None)
            if c is None:
                continue
            xs.append(i + (k - (len(methods) * len(MODES) - 1) / 2) * width)
            first.append(c["first_batch_s"])
            ws = [w for w in c["end"]["workers"] if w]
            uss.append(max(w["uss"] for w in ws) if ws else 0)
            anon.append(max(w["uss_anon"] for w in ws) if ws else 0)
            total.append(c["end"]["main"]["uss"] + sum(w["uss"] for w in ws))
        color = colors.get((method, mode), None)
        label = f"{method}, {mode}"
        axes[0].bar(xs, first, width, color=color, label=label)
        axes[1].bar(xs, uss, width, color=color, label=label)
        axes[1].scatter(xs, anon, color="black", marker="_", s=60, zorder=3)
        axes[2].bar(xs, total, width, color=color, label=label)
    axes[0].axhline(1.0, color="red", ls="--", lw=1, label="target (spawn): 1 s")
    axes[2].axhline(1024, color="red", ls="--", lw=1, label="target (8 GB set): 1 GB")
    titles = ("time to the first batch (s)", "largest worker USS (MB); black: without clean file pages",
              "USS of main + workers, end of epoch (MB)")
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([s if s == "empty" else f"{s} GB" for s in sizes])
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"metabatch: class arrays of each size, {result['workers']} workers, 5-way 1-shot 15-query, one "
                 f"epoch - {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.0f} GB, {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0, 8.0], help="GB (default 0.5 2 8)")
    parser.add_argument("--methods", nargs="+", default=["fork", "spawn"], choices=["fork", "spawn", "forkserver"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs of the classes per cell (default 1)")
    parser.add_argument("--min-batches", type=int, default=40, help="at least this many batches per cell")
    parser.add_argument("--data-dir", default="/tmp/metabatch-memory", help="where the synthetic sets are written")
    parser.add_argument("--warm", action="store_true", help="do not evict the files from the page cache")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="memory")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(json.loads(args.cell))))
        return
    out = pathlib.Path(args.out)
    if args.plot_only:
        plot(json.loads((out / f"{args.name}.json").read_text()), out / f"{args.name}.png")
        return
    folder = pathlib.Path(args.data_dir)
    info = machine()
    ram_mb = info["ram_gb"] * 1024
    cells = []
    for size in [None] + sorted(args.sizes):
        path = dataset(folder, size)
        label = "empty" if size is None else f"{size:g}"
        for method in args.methods:
            for mode in args.modes if size is not None else ("mmap",):
                spec = {"path": str(path), "mode": mode, "method": method, "workers": args.workers,
                        "epochs": args.epochs, "min_batches": args.min_batches}
                copies = 1 + (args.workers if method != "fork" else 0)
                need = copies * path.stat().st_size / 2**20
                row = {"size": label, "method": method, "mode": mode}
                if mode == "in-memory" and need > 0.6 * ram_mb:
                    row["skipped"] = f"{copies} copies need {need / 1024:.1f} GB of {ram_mb / 1024:.0f} GB RAM"
                    print(f"{label:>6} {method:>6} {mode:>9}: skipped ({row['skipped']})", flush=True)
                    cells.append(row)
                    continue
                if not args.warm:
                    evict(path)
                row.update(run_cell(spec, args.timeout))
                cells.append(row)
                if "error" in row:
                    print(f"{label:>6} {method:>6} {mode:>9}: ERROR {row['error']}", flush=True)
                    continue
                ws = [w for w in row["end"]["workers"] if w]
                uss = ", ".join(f"{w['uss']:.0f}" for w in ws)
                anon = ", ".join(f"{w['uss_anon']:.0f}" for w in ws)
                pss = ", ".join(f"{w['pss']:.0f}" for w in ws)
                print(f"{label:>6} {method:>6} {mode:>9}: first batch {row['first_batch_s']:6.2f} s, "
                      f"{row['tasks_per_s'] or 0:7.1f} tasks/s; USS main {row['end']['main']['uss']:7.0f} MB, "
                      f"workers {uss} MB (anonymous {anon}), PSS workers {pss} MB", flush=True)
    with open("/proc/loadavg") as f:
        info["loadavg_end"] = f.read().strip()
    result = {"machine": info, "workers": args.workers, "epochs": args.epochs, "batch": BATCH,
              "task": f"{WAYS}-way {N_CTX}-shot {N_TGT}-query, uint8 [C, {PER_CLASS}, 3, 84, 84]",
              "cold": not args.warm, "cells": cells, **summary(cells)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    try:
        plot(result, out / f"{args.name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    for key, check in result["checks"].items():
        print(key, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in check.items()
                    if not isinstance(v, list)})
    for key, r in result["ratios"].items():
        print(key, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {out / args.name}.json, .png")


if __name__ == "__main__":
    main()
