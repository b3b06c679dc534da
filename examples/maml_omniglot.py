"""MAML on Omniglot (Finn et al. 2017): N-way K-shot character classification, trained on a 2-core CPU.

    python examples/maml_omniglot.py --train DATA/images_background_small1.zip \\
        --eval DATA/images_background_small2.zip             # the recipe below: ~30 min on 2 cores
    python examples/maml_omniglot.py --train DATA/images_background.zip --ways 20 \\
        --eval-runs DATA/all_runs.zip                         # Lake et al.'s 20-way one-shot runs
    python examples/maml_omniglot.py ... --resume runs/maml_omniglot/last.pt   # continue the same stream

--train takes zips or unpacked folders (several are joined; alphabets seen in an earlier one are
skipped). --val-classes of its characters are held out, drawn from --seed, to pick the best model (by
validation accuracy; best.pt). --eval drops every alphabet of the training data and reports the
accuracy of the best model on --eval-tasks fixed tasks (--eval-seed) over the characters that are
left, mean ± 95 % CI; --eval-runs scores it on Lake et al.'s one-shot runs (needs --ways 20).

Model and algorithm: Finn et al.'s Omniglot conv4 (64 channels, 3x3 stride-2 convolutions, BatchNorm with
batch statistics, ReLU; 28x28 inputs), second-order MAML with one inner SGD step (lr 0.4) in training,
Adam on the meta-objective, random 90-degree rotations of each class (a rotated character is a new
class), 15 query images per class at test time.

What buys speed on a CPU, and what it costs (all flags):

- fewer query images per class in training (--query 5 instead of 15): the query pass is most of a
  meta-step; the meta-gradient is a little noisier. Evaluation keeps 15 (--eval-query);
- a first-order warm-up (--first-order-steps): early on, the second-order terms matter little;
- smaller meta-batches at a higher meta learning rate;
- --chunk-size: vmap a few tasks at a time (glibc serves big fresh allocations slowly);
- --num-workers 1: the task loader needs a fraction of a core; more workers steal the main process's.

The recipe (the defaults) and what it measured are in docs/examples-fewshot.md and
benchmarks/results/omniglot_small.json.

MAML-Pytorch (dragen1860) flag names are accepted as aliases, with their defaults (omniglot_train.py)
for comparison:

    metabatch          MAML-Pytorch           default here   MAML-Pytorch default
    --ways             --n_way                5              5
    --shots            --k_spt                1              1
    --query            --k_qry                5              15
    --image-size       --imgsz                28             28
    --meta-batch       --task_num             8              32
    --meta-lr          --meta_lr              0.003          0.001
    --inner-lr         --update_lr            0.4            0.4
    --inner-steps      --update_step          1              5
    --test-steps       --update_step_test     3              10
    --steps            (--epoch: 40000)       2400           40000
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fewshot  # noqa: E402  (examples/_fewshot.py: the code shared with maml_miniimagenet.py)

import metabatch as mb  # noqa: E402
from metabatch import maml  # noqa: E402
from metabatch.tasks import omniglot  # noqa: E402

DEFAULTS = dict(ways=5, shots=1, query=5, image_size=28, meta_batch=8, meta_lr=3e-3, inner_lr=0.4,
                inner_steps=1, test_steps=3, steps=2400, first_order_steps=0, chunk_size=0, val_tasks=200,
                val_every=200, out=pathlib.Path("runs/maml_omniglot"))
UPSTREAM = dict(n_way=5, k_spt=1, k_qry=15, imgsz=28, task_num=32, meta_lr=1e-3, update_lr=0.4, update_step=5,
                update_step_test=10)


def make_parser():
    p = _fewshot.parser(__doc__, DEFAULTS, UPSTREAM)
    p.add_argument("--train", type=pathlib.Path, nargs="+", required=True, metavar="PATH",
                   help="Omniglot zips or folders to meta-train on")
    p.add_argument("--eval", type=pathlib.Path, nargs="+", default=None, metavar="PATH",
                   help="evaluate on the characters of these zips/folders whose alphabets are not in --train")
    p.add_argument("--eval-runs", type=pathlib.Path, default=None, metavar="DIR",
                   help="evaluate on Lake et al.'s one-shot runs: all_runs.zip or its folder (needs --ways 20)")
    p.add_argument("--val-classes", type=_fewshot._int_at_least(1), default=20,
                   help="training characters held out for validation (default 20)")
    p.add_argument("--channels", type=_fewshot._int_at_least(1), default=64, help="conv filters (default 64)")
    p.add_argument("--shift", type=_fewshot._int_at_least(0), default=0,
                   help="move each training image by up to N pixels in x and y (default 0)")
    p.add_argument("--no-rotate", action="store_true", help="no 90-degree rotation augmentation")
    p.add_argument("--download", action="store_true", help="fetch missing official zips (omniglot.download)")
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def join(paths, args, log):
    """Load and join Omniglot sets; alphabets already seen in an earlier path are skipped."""
    data = None
    for path in paths:
        part = omniglot.load(path, size=args.image_size, download=args.download)
        if data is not None:
            seen = sorted(set(part.alphabets) & set(data.alphabets))
            if seen:
                log(f"{path}: skipping {', '.join(seen)} (already loaded from an earlier path)")
                if set(part.alphabets) <= set(data.alphabets):
                    continue
                part = omniglot.select(part, exclude=seen)
            data = omniglot.concat(data, part)
        else:
            data = part
    return data


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    log = print
    for path in args.train + (args.eval or []):
        if not path.exists() and not args.download:
            p.error(f"{path} does not exist; pass an Omniglot zip or folder (or --download for the official zips).")
    data = join(args.train, args, log)
    if args.val_classes >= len(data.images):
        p.error(f"--val-classes {args.val_classes} leaves no training class out of {len(data.images)}; "
                f"lower it.")
    train_idx, val_idx = _fewshot.split_classes(len(data.images), args.val_classes, args.seed)
    _fewshot.check(p, args, num_classes=len(train_idx), per_class=data.images.shape[1])
    if args.val_classes < args.ways:
        p.error(f"--val-classes {args.val_classes} cannot make {args.ways}-way validation tasks; raise it to "
                f"at least {args.ways}.")
    runs = None
    if args.eval_runs is not None:
        runs = omniglot.load_runs(args.eval_runs, size=args.image_size, download=args.download)
        sizes = sorted({len(r.training) for r in runs})
        if sizes != [args.ways]:
            p.error(f"--eval-runs: the runs are {'/'.join(map(str, sizes))}-way one-shot; train with --ways "
                    f"{sizes[0]} (got --ways {args.ways}).")
    held_out = None
    if args.eval is not None:
        every = join(args.eval, args, log)
        left = [a for a in dict.fromkeys(every.alphabets) if a not in set(data.alphabets)]
        if not left:
            p.error(f"--eval: every alphabet of {[str(e) for e in args.eval]} is in the training data; "
                    f"pass other alphabets (e.g. images_background_small2.zip for small1).")
        held_out = omniglot.select(every, left)
        if args.ways > len(held_out.images):
            p.error(f"--eval has {len(held_out.images)} held-out characters, fewer than --ways {args.ways}.")
        log(f"evaluation: {len(held_out.images)} characters of {', '.join(left)}")
    log(f"training: {len(train_idx)} characters of {len(set(data.alphabets))} alphabets "
        f"({', '.join(dict.fromkeys(data.alphabets))}), {args.val_classes} more held out for validation")

    rotate = not args.no_rotate
    train_task = mb.tasks.classification(data.images[train_idx], args.ways, rotate=rotate)
    if args.shift:
        train_task = _fewshot.Shifted(train_task, args.shift)
    val_task = mb.tasks.classification(data.images[val_idx], args.ways)

    def model_fn(key):
        return _fewshot.conv4(key, in_channels=1, ways=args.ways, channels=args.channels,
                              image_size=args.image_size, pool="stride")

    evaluations = []
    if held_out is not None:
        evaluations.append(("test", _fewshot.accuracy_eval(mb.tasks.classification(held_out.images, args.ways),
                                                           args, f"held-out alphabets: {', '.join(left)}")))
    if runs is not None:
        evaluations.append(("one_shot_runs", runs_eval(runs, args)))
    if not evaluations:
        log("no --eval or --eval-runs: the final accuracy is measured on the validation characters")
        evaluations.append(("test", _fewshot.accuracy_eval(val_task, args, "validation characters")))
    return _fewshot.run(args, name="MAML Omniglot", model_fn=model_fn, train_task=train_task,
                        val_task=val_task, evaluations=evaluations, log=log)


def runs_eval(runs, args):
    """An evaluation for _fewshot.run: Lake et al.'s mean percent error over the runs."""
    def fn(model, params, device):
        loss_fn = mb.nn.objective(model, torch.nn.functional.cross_entropy)
        apply = mb.nn.functional(model)

        def classify(support, query):  # support[i] is the only example of class i
            labels = torch.arange(len(support), device=device)
            fast = maml.adapt(loss_fn, params, (torch.from_numpy(support).to(device), labels),
                              steps=args.test_steps, lr=args.inner_lr, first_order=True)
            with torch.no_grad():
                return apply(fast, torch.from_numpy(query).to(device))

        score = omniglot.score_runs(runs, classify)
        line = f"final: {args.ways}-way one-shot error {score.mean_error:.2f}%"
        return {"mean_error": score.mean_error, "errors": score.errors.tolist(), "runs": len(runs),
                "inner_steps": args.test_steps}, line
    return fn


if __name__ == "__main__":
    main()
