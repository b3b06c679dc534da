"""MAML on Omniglot (Finn et al. 2017): N-way K-shot character classification, trained on a 2-core CPU.

    python examples/maml_omniglot.py --train DATA/images_background_small1.zip \\
        --eval DATA/images_background_small2.zip             # the recipe below, on 2 CPU cores
    python examples/maml_omniglot.py --train DATA/images_background.zip --ways 20 \\
        --eval-runs DATA/all_runs.zip                         # Lake et al.'s 20-way one-shot runs
    python examples/maml_omniglot.py ... --resume runs/maml_omniglot/last.pt   # continue the same stream

--train takes zips or unpacked folders (several are joined; alphabets seen in an earlier one are
skipped). --val-classes of its characters are held out, drawn from --seed, to pick the best model (by
validation accuracy; best.pt). --eval drops every alphabet of the training data and reports the
accuracy of the best model on --eval-tasks fixed tasks (--eval-seed) over the characters that are
left, mean ± 95 % CI; --eval-runs scores it on Lake et al.'s one-shot runs (needs --ways 20).

Model and algorithm: Finn et al.'s Omniglot conv4 (64 channels, 3x3 stride-2 convolutions, BatchNorm with
batch statistics, ReLU; 28x28 inputs; a linear head on the flattened 2x2x64 map), second-order MAML with
one inner SGD step (lr 0.4) in training and 10 at test time, Adam on the meta-objective, random
90-degree rotations of each class (a rotated character is a new class), 15 query images per class in
test tasks.

The recipe (the defaults): trained only on images_background_small1.zip (116 characters after the 20
held out for validation), 5-way 1-shot accuracy on the 106 characters of images_background_small2.zip
that small1 lacks (Japanese (katakana), Sanskrit, Tagalog). What it changes from the paper, to train in
minutes on 2 CPU cores:

- 5 query images per class in training tasks instead of 15 (the query pass is most of a meta-step;
  test tasks keep 15, --eval-query);
- 8 tasks per meta-step instead of 32, Adam at 3e-3 with a cosine decay to 0 over 12 000 steps;
- every training image moved by up to 2 pixels (--shift 2): 116 characters overfit otherwise;
- one intra-op thread: --threads defaults to the cores this process may use minus --num-workers
  (metabatch.runtime.default_threads, as in every example), which is 1 on the 2-core machine with the
  default 1 worker, the setting of the measured runs. When other work shares the machine, two intra-op
  threads wait on each other and a step gets 3-6x slower; one thread keeps ~90 ms per step and leaves the
  other core to the task loader. With more cores than that, pass --threads 1 on a shared machine; on a
  machine of your own the default (or --threads 0, torch's one per core) is faster.

Measured (seed 0, torch 2.13 CPU, 2 cores shared with other jobs, load average 1.0-2.8): 12 000
meta-steps in 19.3 min of training (96 ms per step, 83 tasks/s, 2 491 images/s), 21.0 min with the
validations; best validation accuracy 93.72 % (step 11 000); on the held-out characters
`final: 5-way 1-shot accuracy 92.17% ± 0.58% (600 tasks)`. A 7 000-step run reached 90.08% ± 0.64% in
11.7 min. On a busy machine (load 6-10) a step takes 250-500 ms: --time-budget 30 stops training at 30
minutes, and --steps 6000 gave 90.84% ± 0.61% (40 min at that load). benchmarks/results/omniglot_small.json
is the 12 000-step run's metrics.json; docs/examples-fewshot.md has the details.

MAML++ (Antoniou et al. 2019): --mamlpp trains with learned per-step, per-tensor inner rates (--lslr),
per-step batch-norm weights and biases (--bnwb), the multi-step loss annealed towards the last step over
--msl-fraction of --steps (--msl) and first-order steps for the first --da-fraction (--da), with the cosine
schedule of the meta learning rate; each piece has its own flag (--no-msl drops one, --bnrs adds per-step
batch-norm statistics at evaluation, which hurts a model trained on batch statistics: docs/algorithms.md).
A MAML++ step with 2 inner steps costs ~1.4x a MAML step, with 3 ~2x (measured side by side). On short
runs (~800 MAML steps' worth of compute) MAML++ and MAML were level: 81.45% ± 1.11% (2 inner steps, 570
steps) against 80.85% ± 1.18% (800 steps), 300 test tasks. The 30-minute comparison, run in one
sitting on a host where a MAML step took 360-420 ms (30 minutes bought a third of the recipe's
training): MAML 89.91% ± 0.65% (4 001 steps), MAML++ 88.79% ± 0.66% (2 992 steps), ProtoNet
92.33% ± 0.59% (benchmarks/results/omniglot_*_30min.json):

    python examples/maml_omniglot.py --train DATA/images_background_small1.zip \
        --eval DATA/images_background_small2.zip --mamlpp --inner-steps 2 --test-steps 10 \
        --time-budget 30 --out runs/mamlpp_omniglot

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
    --test-steps       --update_step_test     10             10
    --steps            (--epoch)              12000          40000 meta-steps
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fewshot  # examples/_fewshot.py: the code shared with maml_miniimagenet.py

import metabatch as mb
from metabatch import inner, maml, mamlpp
from metabatch.tasks import omniglot

DEFAULTS = {"ways": 5, "shots": 1, "query": 5, "image_size": 28, "meta_batch": 8, "meta_lr": 3e-3,
            "lr_schedule": "cosine", "inner_lr": 0.4, "inner_steps": 1, "test_steps": 10, "steps": 12000,
            "first_order_steps": 0, "chunk_size": 0, "val_tasks": 200, "val_every": 1000,
            "out": pathlib.Path("runs/maml_omniglot")}
UPSTREAM = {"n_way": 5, "k_spt": 1, "k_qry": 15, "imgsz": 28, "task_num": 32, "meta_lr": 1e-3, "update_lr": 0.4,
            "update_step": 5, "update_step_test": 10}  # MAML-Pytorch's omniglot_train.py


def add_data_flags(p) -> None:
    """The Omniglot flags this script shares with protonet_omniglot.py: splits, model width, augmentation."""
    p.add_argument("--val-classes", type=_fewshot.int_at_least(1), default=20,
                   help="training characters held out for validation (default 20)")
    p.add_argument("--channels", type=_fewshot.int_at_least(1), default=64, help="conv filters (default 64)")
    p.add_argument("--shift", type=_fewshot.int_at_least(0), default=2,
                   help="move each training image by up to N pixels in x and y (default 2)")
    p.add_argument("--flip", action="store_true",
                   help="mirror each class of a training task with probability 1/2 (a new character)")
    p.add_argument("--no-rotate", action="store_true", help="no 90-degree rotation augmentation")
    p.add_argument("--download", action="store_true", help="fetch missing official zips (omniglot.download)")


def make_parser():
    p = _fewshot.parser(__doc__, DEFAULTS, UPSTREAM)
    p.add_argument("--train", type=pathlib.Path, nargs="+", required=True, metavar="PATH",
                   help="Omniglot zips or folders to meta-train on")
    p.add_argument("--eval", type=pathlib.Path, nargs="+", default=None, metavar="PATH",
                   help="evaluate on the characters of these zips/folders whose alphabets are not in --train")
    p.add_argument("--eval-runs", type=pathlib.Path, default=None, metavar="DIR",
                   help="evaluate on Lake et al.'s one-shot runs: all_runs.zip or its folder (needs --ways 20)")
    add_data_flags(p)
    pp = p.add_argument_group(
        "MAML++ (Antoniou et al. 2019)",
        "--mamlpp turns on --msl --lslr --bnwb --da; each flag turns one on (--bnrs) or off (--no-msl) on its "
        "own. Cosine annealing of the meta learning rate is --lr-schedule cosine (the default here).")
    pp.add_argument("--mamlpp", action="store_true", help="MAML++: --msl --lslr --bnwb --da (add --bnrs for "
                    "per-step statistics at evaluation)")
    on_off = argparse.BooleanOptionalAction
    pp.add_argument("--msl", action=on_off, default=None,
                    help="multi-step loss: the query loss after every inner step, weights annealed to the last")
    pp.add_argument("--msl-fraction", type=float, default=0.1,
                    help="fraction of --steps over which the multi-step weights anneal (default 0.1)")
    pp.add_argument("--lslr", action=on_off, default=None,
                    help="learned inner rates per parameter tensor and per step, from --inner-lr")
    pp.add_argument("--bnwb", action=on_off, default=None, help="per-step batch-norm weights and biases")
    pp.add_argument("--bnrs", action=on_off, default=None,
                    help="per-step batch-norm statistics (from --bnrs-tasks training tasks) used at evaluation")
    pp.add_argument("--bnrs-tasks", type=_fewshot.int_at_least(1), default=64,
                    help="training tasks whose statistics --bnrs uses (default 64)")
    pp.add_argument("--da", action=on_off, default=None,
                    help="derivative-order annealing: first-order for the first --da-fraction of --steps")
    pp.add_argument("--da-fraction", type=float, default=0.3,
                    help="fraction of --steps trained first-order with --da (default 0.3)")
    return p


MAMLPP_PIECES = ("msl", "lslr", "bnwb", "bnrs", "da")
# --bnrs is left out of --mamlpp: a conv4 trained with each task's batch statistics (as MAML++'s own code
# also evaluates) loses its accuracy when evaluation normalises with statistics pooled over tasks
# (measured: 24% instead of 79% validation accuracy after 200 steps); see docs/algorithms.md.
MAMLPP_DEFAULT = ("msl", "lslr", "bnwb", "da")
MAMLPP_ARGS = ("mamlpp", *MAMLPP_PIECES, "msl_fraction", "da_fraction", "bnrs_tasks")


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    for piece in MAMLPP_PIECES:
        if getattr(args, piece) is None:
            setattr(args, piece, args.mamlpp and piece in MAMLPP_DEFAULT)
    return args


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
    args = parse_args(argv)
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
    if args.shift or args.flip:
        train_task = _fewshot.Augmented(train_task, shift=args.shift, flip=args.flip)
    val_task = mb.tasks.classification(data.images[val_idx], args.ways)

    pieces = [piece for piece in MAMLPP_PIECES if getattr(args, piece)]
    if pieces:
        if args.da and args.first_order_steps:
            p.error("--da sets the first-order steps from --da-fraction; drop --first-order-steps.")
        for name in ("msl_fraction", "da_fraction"):
            if not 0 <= getattr(args, name) <= 1:
                p.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}.")
        log(f"MAML++ pieces: {', '.join(pieces)}")

    def model_fn(key):
        return _fewshot.conv4(key, in_channels=1, ways=args.ways, channels=args.channels,
                              image_size=args.image_size, pool="stride", track_running_stats=bool(args.bnrs))

    built = {}

    def method(model):
        built["method"] = mamlpp_method(args, model, train_task, log) if pieces else _fewshot.maml_method(args)
        return built["method"]

    def the_method():
        return built["method"]

    evaluations = []
    if held_out is not None:
        evaluations.append(("test", _fewshot.accuracy_eval(mb.tasks.classification(held_out.images, args.ways),
                                                           args, f"held-out alphabets: {', '.join(left)}",
                                                           the_method)))
    if runs is not None:
        evaluations.append(("one_shot_runs", runs_eval(runs, args, the_method)))
    if not evaluations:
        log("no --eval or --eval-runs: the final accuracy is measured on the validation characters")
        evaluations.append(("test", _fewshot.accuracy_eval(val_task, args, "validation characters", the_method)))
    return _fewshot.run(args, name="MAML++ Omniglot" if pieces else "MAML Omniglot", model_fn=model_fn,
                        train_task=train_task, val_task=val_task, evaluations=evaluations, log=log, method=method)


def mamlpp_method(args, model, train_task, log) -> _fewshot.Method:
    """MAML++'s pieces that args turns on, for `model` (whose batch norms get per-step weights with --bnwb).

    --lslr: `inner.lslr` rates `[steps]` per adapted tensor (not the per-step batch norms), learned by the
    outer Adam with the network; --bnwb: every batch norm's weight and bias become `[steps, C]` parameters of
    the model, selected by `per_step=`; --msl: `step_weights` annealed over --msl-fraction of --steps;
    --da: first-order for the first --da-fraction of --steps; --bnrs: `mamlpp.bn_statistics` of the current
    parameters on --bnrs-tasks fixed training tasks, used (model in eval mode) at validation and test.
    """
    steps = args.inner_steps
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    if args.bnwb:
        for name in norms:
            bn = model.get_submodule(name)
            bn.weight = torch.nn.Parameter(bn.weight.detach().repeat(steps, 1))
            bn.bias = torch.nn.Parameter(bn.bias.detach().repeat(steps, 1))

    def per_bn_param(name):
        module, _, leaf = name.rpartition(".")
        return bool(args.bnwb) and module in norms and leaf in ("weight", "bias")

    def per_step_eval(name):
        return per_bn_param(name) or name.endswith((".running_mean", ".running_var"))

    params = mb.nn.params(model)
    extra = {}
    if args.lslr:
        rates = inner.lslr_rates({k: v for k, v in params.items() if not per_bn_param(k)}, steps, args.inner_lr)
        extra = {f"lslr.{k}": r for k, r in rates.items()}
        opt = inner.lslr(rates)
    else:
        opt = inner.sgd(args.inner_lr)
    msl_steps = max(1, round(args.msl_fraction * args.steps))
    da_steps = round(args.da_fraction * args.steps) if args.da else args.first_order_steps
    loss_fn = mb.nn.objective(model, torch.nn.functional.cross_entropy)
    acc_fn = mb.nn.objective(model, mb.nn.accuracy)

    def meta_loss(model, params, batch, step):
        weights = mamlpp.step_weights(steps, step / msl_steps) if args.msl and steps > 1 else None
        return maml.meta_loss(loss_fn, params, batch["context"], batch["target"], steps=steps, inner=opt,
                              per_step=per_bn_param, step_weights=weights,
                              first_order=args.first_order or step < da_steps, chunk_size=args.chunk_size or None)

    def statistics(params, device):
        n = args.bnrs_tasks
        specs = mb.batch_specs(args.seed + 2, num_tasks=10**6, batch_size=min(n, args.eval_batch), n_ctx=args.shots,
                               n_tgt=args.query, num_batches=-(-n // min(n, args.eval_batch)))
        parts = []
        for batch in mb.task_loader(train_task, specs, num_workers=0):
            batch = _fewshot.to_device(batch, device)
            parts.append(mamlpp.bn_statistics(model, loss_fn, params, batch["context"], batch["target"], steps=steps,
                                              inner=opt, per_step=per_bn_param))
        return {k: torch.stack([part[k] for part in parts]).mean(0) for k in parts[0]}

    def evaluator(model, params, device):
        params = {k: v.detach() for k, v in params.items()}
        per_step = per_bn_param
        if args.bnrs:
            params = {**params, **statistics(params, device)}
            per_step = per_step_eval

        def per_task(batch):
            model.train(not args.bnrs)
            try:
                return maml.evaluate(loss_fn, params, batch["context"], batch["target"], steps=args.test_steps,
                                     inner=opt, per_step=per_step, metric_fn=acc_fn).per_task_metric
            finally:
                model.train()
        return per_task

    log(f"MAML++: {steps} inner steps; " + ", ".join(
        [f"multi-step loss annealed over {msl_steps} steps"] * bool(args.msl) + ["LSLR"] * bool(args.lslr)
        + ["per-step BN weights and biases"] * bool(args.bnwb) + ["per-step BN statistics at evaluation"]
        * bool(args.bnrs) + [f"first-order for {da_steps} steps"] * bool(da_steps)))
    return _fewshot.Method("MAML++", meta_loss, evaluator, extra, MAMLPP_ARGS,
                           adapter(args, model, opt, per_bn_param, statistics if args.bnrs else None, per_step_eval))


def adapter(args, model, opt, per_step, statistics, per_step_eval):
    """`adapt(params, support_x, labels, device) -> apply(query_x)`: one task, MAML++'s inner loop."""
    def adapt(params, x, labels, device):
        loss_fn = mb.nn.objective(model, torch.nn.functional.cross_entropy)
        sel = per_step
        if statistics is not None:
            params = {**params, **statistics(params, device)}
            sel = per_step_eval
        model.train(statistics is None)
        try:
            fast = maml.adapt(loss_fn, params, (x, labels), steps=args.test_steps, inner=opt, per_step=sel,
                              first_order=True)
        finally:
            model.train()
        apply = mb.nn.functional(model)

        def predict(query):
            model.train(statistics is None)
            try:
                with torch.no_grad():
                    return apply(fast, query)
            finally:
                model.train()
        return predict
    return adapt


def runs_eval(runs, args, method=None):
    """An evaluation for _fewshot.run: Lake et al.'s mean percent error over the runs."""
    def fn(model, params, device):
        loss_fn = mb.nn.objective(model, torch.nn.functional.cross_entropy)
        apply = mb.nn.functional(model)
        custom = getattr(method() if method is not None else None, "adapt", None)

        def classify(support, query):  # support[i] is the only example of class i
            labels = torch.arange(len(support), device=device)
            if custom is not None:
                return custom(params, torch.from_numpy(support).to(device), labels, device)(
                    torch.from_numpy(query).to(device))
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
