"""Learning curves of Omniglot runs in one plot: validation accuracy against training time (or steps).

Each run is the metrics.json that examples/maml_omniglot.py (MAML, MAML++) or
examples/protonet_omniglot.py writes. The x axis is training minutes (validation excluded): the
`train_seconds` recorded at each validation, or, for runs written before it was recorded, the step
times the run's mean time per step. The legend gives each run's final test accuracy (mean ± 95 % CI).

    python benchmarks/omniglot_curves.py \\
        "MAML=benchmarks/results/omniglot_small.json" \\
        "MAML++=runs/mamlpp_omniglot/metrics.json" \\
        "ProtoNet=runs/protonet_omniglot/metrics.json" \\
        --out benchmarks/results/omniglot_curves.png

Writes the PNG and, beside it, a JSON with the curves and the final accuracies.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def curve(metrics: dict, x: str) -> tuple[list, list, list]:
    per_step = metrics["train_seconds"] / max(metrics["steps"] - metrics.get("start_step", 0), 1)
    xs, ys, cis = [], [], []
    for v in metrics["validation"]:
        if x == "steps":
            xs.append(v["step"])
        else:
            xs.append(v.get("train_seconds", v["step"] * per_step) / 60)
        ys.append(100 * v["accuracy"])
        cis.append(100 * v["ci95"])
    return xs, ys, cis


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=METRICS_JSON")
    p.add_argument("--x", choices=("minutes", "steps"), default="minutes")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/omniglot_curves.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    summary = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item!r}: write LABEL=path/to/metrics.json")
        metrics = json.loads(pathlib.Path(path).read_text())
        xs, ys, cis = curve(metrics, args.x)
        test = metrics.get("test", {})
        final = (f" — test {100 * test['accuracy']:.2f}% ± {100 * test['ci95']:.2f}%" if "accuracy" in test else "")
        ax.errorbar(xs, ys, yerr=cis, marker="o", ms=3, capsize=2, label=f"{label}{final}")
        summary[label] = {"metrics": str(path), "x": xs, "val_accuracy": ys, "val_ci95": cis,
                          "test_accuracy": test.get("accuracy"), "test_ci95": test.get("ci95"),
                          "steps": metrics.get("steps"), "train_seconds": metrics.get("train_seconds")}
    ax.set(xlabel="training minutes (validation excluded)" if args.x == "minutes" else "meta-step",
           ylabel="validation accuracy, % (95% CI)", title="Omniglot 5-way 1-shot, trained on images_background_small1")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
