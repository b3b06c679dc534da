"""MAML on mini-ImageNet (Finn et al. 2017): 5-way 1-shot (or K-shot) classification of 84x84 photos.

    python examples/maml_miniimagenet.py --data DATA/miniimagenet            # the paper's protocol
    python examples/maml_miniimagenet.py --data DATA/miniimagenet --k_spt 5  # MAML-Pytorch's flags work too
    python examples/maml_miniimagenet.py --data ... --resume runs/maml_miniimagenet/last.pt
    python examples/maml_miniimagenet.py --dataset tieredimagenet --data DATA/tiered-imagenet

--dataset tieredimagenet trains on tiered-ImageNet instead (Ren et al. 2018; 351/97/160 classes of 732-1300
images): --data then holds train/, val/, test/ class folders or Ren et al.'s <split>_labels.pkl with
<split>_images_png.pkl or <split>_images.npz (metabatch.tasks.tieredimagenet reads both and never runs code
from the pickles). Its decoded training split is 9.5 GB at 84x84: it is cached once, memory-mapped, and
shared by every loader worker, so it needs disk, not memory.

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

import numpy as np

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
                   help="mini-ImageNet in the Ravi & Larochelle layout (images/, train.csv, val.csv, test.csv), "
                        "or with --dataset tieredimagenet, tiered-ImageNet's folder")
    p.add_argument("--dataset", choices=("miniimagenet", "tieredimagenet"), default="miniimagenet",
                   help="the data set in --data (default miniimagenet)")
    p.add_argument("--channels", type=_fewshot.int_at_least(1), default=32, help="conv filters (default 32)")
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def _load_tiered(p, args):
    from metabatch.tasks import tieredimagenet

    try:
        splits = {s: tieredimagenet.load(args.data, s, size=args.image_size) for s in ("train", "val", "test")}
    except FileNotFoundError as err:
        p.error(f"--data {args.data}: {err}")
    for s, d in splits.items():
        counts = np.bincount(d.labels)
        print(f"{s}: {len(d.classes)} classes, {len(d.images)} images of {d.images.shape[1:]} (tiered-ImageNet, "
              f"{counts.min()}-{counts.max()} per class)")
    per_class = min(int(np.bincount(d.labels).min()) for d in splits.values())
    num_classes = {s: len(d.classes) for s, d in splits.items()}
    return splits, num_classes, per_class, splits["train"].images.shape[1], tieredimagenet.sampler


def _load_mini(p, args):
    from metabatch.tasks import miniimagenet

    if not (args.data / "train.csv").is_file():
        p.error(f"--data {args.data}: no train.csv there; pass the folder holding images/, train.csv, val.csv "
                f"and test.csv (Ravi & Larochelle's layout).")
    splits = {s: miniimagenet.load(args.data, s, size=args.image_size) for s in ("train", "val", "test")}
    for s, d in splits.items():
        print(f"{s}: {d.images.shape[0]} classes x {d.images.shape[1]} images of {d.images.shape[2:]}")
    per_class = min(d.images.shape[1] for d in splits.values())
    num_classes = {s: len(d.images) for s, d in splits.items()}
    return splits, num_classes, per_class, splits["train"].images.shape[2], miniimagenet.sampler


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    load = _load_tiered if args.dataset == "tieredimagenet" else _load_mini
    splits, num_classes, per_class, in_channels, sampler = load(p, args)
    _fewshot.check(p, args, num_classes=num_classes["train"], per_class=per_class)
    for s in ("val", "test"):
        if args.ways > num_classes[s]:
            p.error(f"the {s} split has {num_classes[s]} classes, fewer than --ways {args.ways}; lower --ways.")
    tasks = {s: sampler(d, args.ways) for s, d in splits.items()}

    def model_fn(key):
        return _fewshot.conv4(key, in_channels=in_channels, ways=args.ways, channels=args.channels,
                              image_size=args.image_size, pool="max")

    name = "MAML tiered-ImageNet" if args.dataset == "tieredimagenet" else "MAML mini-ImageNet"
    test = _fewshot.accuracy_eval(tasks["test"], args, f"test split ({num_classes['test']} classes)")
    return _fewshot.run(args, name=name, model_fn=model_fn, train_task=tasks["train"], val_task=tasks["val"],
                        evaluations=[("test", test)])  # it applies --threads and puts the caller's count back


if __name__ == "__main__":
    main()
