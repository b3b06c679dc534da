"""Prototypical networks (Snell et al. 2017) on Omniglot, on the protocol of examples/maml_omniglot.py.

    python examples/protonet_omniglot.py --train DATA/images_background_small1.zip \\
        --eval DATA/images_background_small2.zip --time-budget 30       # the recipe below, on 2 CPU cores

The data, splits, augmentation, validation, checkpoints, resume and the test protocol are those of
examples/maml_omniglot.py (examples/_fewshot.py): trained on images_background_small1.zip (116 characters,
20 more held out for validation), tested 5-way 1-shot on --eval-tasks fixed tasks (15 query images per
class) over the 106 characters of images_background_small2.zip that small1 lacks, mean ± 95 % CI.

Model and algorithm: the conv4 body of the MAML example (64 channels, 3x3 stride-2 convolutions, BatchNorm
with batch statistics, ReLU) without its linear head: a 256-d embedding of a 28x28 image.
`metabatch.protonet.loss` embeds each task's support and query images together, takes the mean
support embedding of each class as its prototype and the negative squared Euclidean distances to the
prototypes as logits; Adam minimises the mean query cross-entropy over --meta-batch tasks per step. No
inner loop: a step costs one forward and backward pass over the task's images.

As in the paper, training episodes have more classes than test episodes (--train-ways; the paper used
60-way episodes for Omniglot); random 90-degree rotations make new classes; every training image moves
by up to --shift pixels.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fewshot  # examples/_fewshot.py: the training loop, checkpoints and evaluation shared with the MAML scripts
import maml_omniglot  # the Omniglot loading and splits

import metabatch as mb
from metabatch import protonet
from metabatch.tasks import omniglot

DEFAULTS = {"ways": 5, "shots": 1, "query": 5, "image_size": 28, "meta_batch": 2, "meta_lr": 2e-3,
            "lr_schedule": "cosine", "steps": 6000, "chunk_size": 0, "val_tasks": 200, "val_every": 500,
            "out": pathlib.Path("runs/protonet_omniglot")}


def make_parser():
    p = _fewshot.parser(__doc__, DEFAULTS, None, inner_loop=False)
    p.add_argument("--train", type=pathlib.Path, nargs="+", required=True, metavar="PATH",
                   help="Omniglot zips or folders to train on")
    p.add_argument("--eval", type=pathlib.Path, nargs="+", default=None, metavar="PATH",
                   help="evaluate on the characters of these zips/folders whose alphabets are not in --train")
    p.add_argument("--train-ways", type=_fewshot.int_at_least(2), default=20,
                   help="classes per training episode (default 20; the paper used 60)")
    p.add_argument("--distance", choices=("sqeuclidean", "cosine"), default="sqeuclidean",
                   help="distance to the prototypes (default sqeuclidean, the paper's)")
    maml_omniglot.add_data_flags(p)
    return p


def protonet_method(args) -> _fewshot.Method:
    """Prototypical networks as a _fewshot.Method: the model is the embedding, there is no extra parameter."""
    def meta_loss(model, params, batch, step):
        return protonet.loss(mb.nn.functional(model), params, batch["context"], batch["target"],
                             ways=args.train_ways, distance=args.distance,
                             chunk_size=args.chunk_size or None).loss

    def evaluator(model, params, device):
        embed = mb.nn.functional(model)

        def per_task(batch):
            return protonet.evaluate(embed, params, batch["context"], batch["target"], ways=args.ways,
                                     distance=args.distance).per_task_metric
        return per_task

    return _fewshot.Method("ProtoNet", meta_loss, evaluator, {}, ("train_ways", "distance"))


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    log = print
    for path in args.train + (args.eval or []):
        if not path.exists() and not args.download:
            p.error(f"{path} does not exist; pass an Omniglot zip or folder (or --download for the official zips).")
    data = maml_omniglot.join(args.train, args, log)
    if args.val_classes >= len(data.images):
        p.error(f"--val-classes {args.val_classes} leaves no training class out of {len(data.images)}; lower it.")
    train_idx, val_idx = _fewshot.split_classes(len(data.images), args.val_classes, args.seed)
    _fewshot.check(p, args, num_classes=len(train_idx), per_class=data.images.shape[1])
    if args.train_ways > len(train_idx):
        p.error(f"--train-ways {args.train_ways} is more than the {len(train_idx)} training characters; lower it.")
    if args.val_classes < args.ways:
        p.error(f"--val-classes {args.val_classes} cannot make {args.ways}-way validation tasks; raise it to "
                f"at least {args.ways}.")
    held_out = left = None
    if args.eval is not None:
        every = maml_omniglot.join(args.eval, args, log)
        left = [a for a in dict.fromkeys(every.alphabets) if a not in set(data.alphabets)]
        if not left:
            p.error(f"--eval: every alphabet of {[str(e) for e in args.eval]} is in the training data; "
                    f"pass other alphabets (e.g. images_background_small2.zip for small1).")
        held_out = omniglot.select(every, left)
        if args.ways > len(held_out.images):
            p.error(f"--eval has {len(held_out.images)} held-out characters, fewer than --ways {args.ways}.")
        log(f"evaluation: {len(held_out.images)} characters of {', '.join(left)}")
    log(f"training: {len(train_idx)} characters, {args.train_ways}-way episodes, {args.val_classes} more held out "
        f"for validation")

    train_task = mb.tasks.classification(data.images[train_idx], args.train_ways, rotate=not args.no_rotate)
    if args.shift or args.flip:
        train_task = _fewshot.Augmented(train_task, shift=args.shift, flip=args.flip)
    val_task = mb.tasks.classification(data.images[val_idx], args.ways)
    method = protonet_method(args)

    def model_fn(key):
        conv4 = _fewshot.conv4(key, in_channels=1, ways=args.ways, channels=args.channels,
                               image_size=args.image_size, pool="stride")
        return torch.nn.Sequential(*list(conv4)[:-1])  # the embedding: conv4 without its linear head

    if held_out is not None:
        test = (mb.tasks.classification(held_out.images, args.ways), f"held-out alphabets: {', '.join(left)}")
    else:
        log("no --eval: the final accuracy is measured on the validation characters")
        test = (val_task, "validation characters")
    evaluations = [("test", _fewshot.accuracy_eval(test[0], args, test[1], method))]
    return _fewshot.run(args, name="ProtoNet Omniglot", model_fn=model_fn, train_task=train_task,
                        val_task=val_task, evaluations=evaluations, log=log, method=method)


if __name__ == "__main__":
    main()
