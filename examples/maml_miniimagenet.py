"""MAML on mini-ImageNet (Finn et al. 2017): 5-way 1-shot (or K-shot) classification of 84x84 photos.

    python examples/maml_miniimagenet.py --data DATA/miniimagenet            # the paper's protocol
    python examples/maml_miniimagenet.py --data DATA/miniimagenet --k_spt 5  # MAML-Pytorch's flags work too
    python examples/maml_miniimagenet.py --data ... --resume runs/maml_miniimagenet/last.pt

--data is a folder in Ravi & Larochelle's layout: images/*.jpg plus train.csv, val.csv and test.csv
(`filename,label` rows; 64, 16 and 20 classes of 600 images). metabatch.tasks.miniimagenet decodes each
split once, resized to --image-size, and caches it as a uint8 array; images are normalised with
ImageNet's mean and standard deviation, as MAML-Pytorch does.

Model and algorithm, as in the paper: conv4 with 32 filters (3x3 convolutions, BatchNorm with batch
statistics, ReLU, 2x2 max-pooling; 84 -> 5x5x32 features), second-order MAML with 5 inner SGD steps
(lr 0.01) in training and 10 at test time, Adam (1e-3) on the meta-objective, 4 tasks per meta-step,
15 query images per class. The best model by accuracy on --val-tasks tasks of the val split (checked
every --val-every steps; best.pt) is evaluated on --eval-tasks fixed tasks of the test split (mean ±
95 % CI). last.pt holds the model, the optimizer state, the step, the seed and the hyper-parameters;
--resume continues the exact batch stream from its step.

On CUDA (--device auto picks it when present) the loader pins memory, batches are copied with
non_blocking=True, cudnn.benchmark is on and --tf32 enables TF32; none of this applies on CPU. On a
2-core CPU one meta-step of the defaults takes 2.3-4.6 s (1.2-2.2 s first-order): the 60 000 steps take
days there; --first-order-steps, a smaller --query and --chunk-size help (docs/examples-fewshot.md).

MAML-Pytorch (dragen1860) flag names are accepted as aliases, with their defaults
(miniimagenet_train.py) for comparison:

    metabatch          MAML-Pytorch           default here   MAML-Pytorch default
    --ways             --n_way                5              5
    --shots            --k_spt                1              1
    --query            --k_qry                15             15
    --image-size       --imgsz                84             84
    --meta-batch       --task_num             4              4
    --meta-lr          --meta_lr              0.001          0.001
    --inner-lr         --update_lr            0.01           0.01
    --inner-steps      --update_step          5              5
    --test-steps       --update_step_test     10             10
    --steps            (--epoch)              60000          60000 tasks = 15000 meta-steps of 4
"""

from __future__ import annotations

import os
import pathlib
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fewshot  # examples/_fewshot.py: the code shared with maml_omniglot.py

DEFAULTS = {"ways": 5, "shots": 1, "query": 15, "image_size": 84, "meta_batch": 4, "meta_lr": 1e-3,
            "inner_lr": 0.01, "inner_steps": 5, "test_steps": 10, "steps": 60000, "first_order_steps": 0,
            "chunk_size": 0, "val_tasks": 300, "val_every": 1000, "out": pathlib.Path("runs/maml_miniimagenet")}
UPSTREAM = {"n_way": 5, "k_spt": 1, "k_qry": 15, "imgsz": 84, "task_num": 4, "meta_lr": 1e-3, "update_lr": 0.01,
            "update_step": 5, "update_step_test": 10}  # MAML-Pytorch's miniimagenet_train.py


def make_parser():
    p = _fewshot.parser(__doc__, DEFAULTS, UPSTREAM)
    p.add_argument("--data", type=pathlib.Path, required=True, metavar="DIR",
                   help="mini-ImageNet in the Ravi & Larochelle layout (images/, train.csv, val.csv, test.csv)")
    p.add_argument("--channels", type=_fewshot._int_at_least(1), default=32, help="conv filters (default 32)")
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def main(argv=None):
    from metabatch.tasks import miniimagenet

    p = make_parser()
    args = p.parse_args(argv)
    if not (args.data / "train.csv").is_file():
        p.error(f"--data {args.data}: no train.csv there; pass the folder holding images/, train.csv, val.csv "
                f"and test.csv (Ravi & Larochelle's layout).")
    splits = {s: miniimagenet.load(args.data, s, size=args.image_size) for s in ("train", "val", "test")}
    for s, d in splits.items():
        print(f"{s}: {d.images.shape[0]} classes x {d.images.shape[1]} images of {d.images.shape[2:]}")
    train = splits["train"].images
    _fewshot.check(p, args, num_classes=len(train), per_class=min(d.images.shape[1] for d in splits.values()))
    for s in ("val", "test"):
        if args.ways > len(splits[s].images):
            p.error(f"the {s} split has {len(splits[s].images)} classes, fewer than --ways {args.ways}; lower --ways.")
    tasks = {s: miniimagenet.sampler(d, args.ways) for s, d in splits.items()}

    def model_fn(key):
        return _fewshot.conv4(key, in_channels=train.shape[2], ways=args.ways, channels=args.channels,
                              image_size=args.image_size, pool="max")

    test = _fewshot.accuracy_eval(tasks["test"], args, f"test split ({len(splits['test'].images)} classes)")
    return _fewshot.run(args, name="MAML mini-ImageNet", model_fn=model_fn, train_task=tasks["train"],
                        val_task=tasks["val"], evaluations=[("test", test)])


if __name__ == "__main__":
    main()
