"""MAML in a PyTorch Lightning module: metabatch's task loader and meta-loss inside Lightning's loop.

    pip install 'metabatch[lightning]'                      # or: pip install lightning
    python examples/lightning_maml.py                       # sinusoid regression, no data needed
    python examples/lightning_maml.py --task omniglot --data ../shared/data/omniglot/images_background_small1.zip
    python examples/lightning_maml.py --steps 2000 --resume runs/lightning_maml/checkpoints/last.ckpt

What Lightning needs to know to run MAML, and where this file does it:

- **Manual optimization** (``automatic_optimization = False``): the meta-step is one
  ``maml.meta_loss(...)`` over the whole task batch, then ``manual_backward`` and ``opt.step()``.
  Lightning's automatic loop would work too (learn2learn's ``LightningMAML`` returns its loss to it);
  manual optimization is what lightning-maml does, and it keeps the meta-step explicit.
- **Gradients in validation and test.** Adapting to a task *is* gradient descent, and Lightning runs
  ``validation_step`` / ``test_step`` under ``torch.inference_mode()`` by default. metabatch's ``adapt``
  and ``evaluate`` take their inner gradients with ``torch.func.grad``, which works even there, but
  anything that uses autograd during evaluation fails on inference tensors: a ``torch.autograd.grad``
  inner loop as in MAML-Pytorch or ``higher``, a meta-loss with its graph, gradients with respect to the
  inputs. So the Trainer is built with ``inference_mode=False`` (Lightning then uses ``torch.no_grad()``)
  and evaluation adapts inside ``torch.enable_grad()``, as lightning-maml does. It costs nothing:
  ``maml.evaluate`` keeps no graph for the outer parameters.
- **Data.** ``train_dataloader`` returns ``mb.task_loader(...)`` over an endless ``mb.batch_specs``
  stream; ``max_steps`` ends training. An endless loader has no length, so Lightning never ends an
  "epoch" early and never warns about resuming mid-epoch. Validation and test use fixed-seed specs:
  the same held-out tasks on every run, for any number of workers.
- **Resume.** The batch-spec stream is a pure function of ``(seed, step)``. ``on_save_checkpoint``
  writes the next step (and the stream's settings) into the checkpoint, ``on_load_checkpoint`` reads it
  back, and ``train_dataloader`` rebuilds the specs with ``start=step``: a resumed run sees exactly the
  batches the uninterrupted run would have seen (``tests/test_lightning_example.py`` checks it).

Everything is seeded from ``--seed``: the model initialisation, the task stream (seed), the validation
tasks (seed + 1) and the test tasks (seed + 2).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import warnings

import torch
import torch.nn.functional as F

import metabatch as mb
from metabatch import maml

try:
    import lightning as L
except ImportError:  # an optional extra: --help works without it, and running says how to install it
    L = None

NEEDS_LIGHTNING = ("examples/lightning_maml.py needs PyTorch Lightning, which is not installed: "
                   "pip install 'metabatch[lightning]' (the lightning extra), or pip install lightning.")


# -- models --------------------------------------------------------------------------------------

def _init(model: torch.nn.Module, key) -> torch.nn.Module:
    """Re-draw torch's default initialisation of every Linear / Conv2d layer from ``key``."""
    g = mb.random.torch_generator(key)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                bound = 1 / math.sqrt(layer.weight[0].numel())
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
    return model


def mlp() -> torch.nn.Module:
    """Finn et al.'s sinusoid regressor: 1-40-40-1 with ReLU."""
    return torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                               torch.nn.ReLU(), torch.nn.Linear(40, 1))


def convnet(ways: int, channels: int = 1, hidden: int = 64) -> torch.nn.Module:
    """4 blocks of (3x3 conv, batch norm, ReLU, 2x2 max-pool), then a linear head.

    Finn et al.'s mini-ImageNet layout; their Omniglot net has stride-2 convolutions instead of pooling
    (``examples/_fewshot.py``, ``conv4(pool="stride")``). Weights are drawn by ``_init``, not He-normal.
    """
    blocks = []
    for i in range(4):
        blocks += [torch.nn.Conv2d(channels if i == 0 else hidden, hidden, 3, padding=1),
                   torch.nn.BatchNorm2d(hidden, track_running_stats=False), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*blocks, torch.nn.Flatten(), torch.nn.LazyLinear(ways))


# -- the LightningModule -------------------------------------------------------------------------

class MAML(L.LightningModule if L is not None else object):
    """MAML with manual optimization; the task stream resumes with Lightning's checkpoints."""

    def __init__(self, task: str = "sinusoid", data: str | None = None, eval_data: str | None = None,
                 ways: int = 5, shots: int | None = None, query: int | None = None, image_size: int = 28,
                 hidden: int = 64,
                 meta_batch: int = 4, inner_steps: int = 1, test_steps: int = 10,
                 inner_lr: float = 0.01, meta_lr: float = 1e-3, first_order: bool = False,
                 eval_tasks: int = 100, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if shots is None:  # Finn et al.: K=10 points for sinusoids, 1 shot for Omniglot
            shots = 10 if task == "sinusoid" else 1
        if query is None:
            query = 10 if task == "sinusoid" else 15
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.start = 0     # the first step of the stream; on_load_checkpoint moves it
        self.trace = []    # (step, spec indices, a checksum of the batch): what each step trained on
        key = mb.random.fold_in(mb.random.key(seed), 1)
        if task == "sinusoid":
            self.net = _init(mlp(), key)
            self.loss_fn = mb.nn.objective(self.net, F.mse_loss)
            self.metric_fn = None
        elif task == "omniglot":
            if data is None:
                raise ValueError("--task omniglot needs --data: an Omniglot zip or folder, e.g. "
                                 "images_background_small1.zip.")
            self.net = convnet(ways, 1, hidden)
            self.net(torch.zeros(1, 1, image_size, image_size))  # materialise the lazy head, then initialise
            _init(self.net, key)
            self.loss_fn = mb.nn.objective(self.net, F.cross_entropy)
            self.metric_fn = mb.nn.objective(self.net, mb.nn.accuracy)
        else:
            raise ValueError(f"--task must be 'sinusoid' or 'omniglot', got {task!r}.")
        self._tasks = None

    # -- data ----------------------------------------------------------------------------------
    def _sample_task(self, split: str):
        """The ``sample_task`` of a split: sinusoids, or Omniglot classes held apart by split."""
        hp = self.hparams
        if hp.task == "sinusoid":
            return mb.tasks.sinusoid
        if self._tasks is None:
            from metabatch.tasks import omniglot
            train = omniglot.load(hp.data, size=hp.image_size).images
            if hp.eval_data:
                held_out = omniglot.load(hp.eval_data, size=hp.image_size).images
            else:  # no second file: hold out the last fifth of the classes
                cut = len(train) - max(hp.ways, len(train) // 5)
                train, held_out = train[:cut], train[cut:]
            self._tasks = {"train": mb.tasks.classification(train, hp.ways, rotate=True),
                           "eval": mb.tasks.classification(held_out, hp.ways)}
        return self._tasks["train" if split == "train" else "eval"]

    def _sizes(self, split: str) -> tuple:
        hp = self.hparams
        if hp.task == "sinusoid" and split != "train":  # score a sine on 100 points
            return hp.shots, 100
        return hp.shots, hp.query

    def train_specs(self, start: int = 0) -> mb.BatchSpecs:
        """The endless training stream from global step ``start``."""
        n_ctx, n_tgt = self._sizes("train")
        return mb.batch_specs(self.hparams.seed, num_tasks=10**6, batch_size=self.hparams.meta_batch,
                              n_ctx=n_ctx, n_tgt=n_tgt, start=start)

    def eval_batches(self) -> int:
        """Validation / test meta-batches: ``--eval-tasks`` rounded down to whole batches (at least one)."""
        return max(1, self.hparams.eval_tasks // self.hparams.meta_batch)

    def _eval_loader(self, seed: int):
        n_ctx, n_tgt = self._sizes("eval")
        batches = self.eval_batches()
        specs = mb.batch_specs(seed, num_tasks=batches * self.hparams.meta_batch,
                               batch_size=self.hparams.meta_batch, n_ctx=n_ctx, n_tgt=n_tgt,
                               num_batches=batches)
        return mb.task_loader(self._sample_task("eval"), specs, num_workers=self.hparams.num_workers)

    def train_dataloader(self):
        self.specs = self.train_specs(self.start)
        return mb.task_loader(self._sample_task("train"), self.specs, num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        return self._eval_loader(self.hparams.seed + 1)

    def test_dataloader(self):
        return self._eval_loader(self.hparams.seed + 2)

    # -- steps ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.meta_lr)

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        step = self.trainer.global_step  # optimizer steps done so far = the spec this batch came from
        spec = self.specs[step]
        self.trace.append((step, spec.indices, float(sum(t.double().sum() for t in batch["target"]))))
        opt = self.optimizers()
        loss = maml.meta_loss(self.loss_fn, mb.nn.params(self.net), batch["context"], batch["target"],
                              steps=hp.inner_steps, lr=hp.inner_lr, first_order=hp.first_order)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=hp.meta_batch)
        return loss.detach()

    def _evaluate(self, batch, prefix: str):
        hp = self.hparams
        with torch.enable_grad():  # Lightning evaluates under no_grad; the inner loop needs gradients
            ev = maml.evaluate(self.loss_fn, mb.nn.params(self.net), batch["context"], batch["target"],
                               steps=hp.test_steps, lr=hp.inner_lr, metric_fn=self.metric_fn)
        self.log(f"{prefix}_loss", ev.loss, prog_bar=True, batch_size=hp.meta_batch)
        if ev.metric is not None:
            self.log(f"{prefix}_acc", ev.metric, prog_bar=True, batch_size=hp.meta_batch)
        return ev.loss

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, "test")

    # -- resuming the task stream --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        specs = self.train_specs()
        checkpoint["metabatch"] = {"step": self.trainer.global_step, "seed": specs.seed,
                                   "batch_size": specs.batch_size, "n_ctx": specs.n_ctx, "n_tgt": specs.n_tgt}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("metabatch")
        if saved is None:
            raise ValueError("this checkpoint holds no 'metabatch' entry (the task stream's step); "
                             "it was not written by this module, so the stream cannot resume from it.")
        specs = self.train_specs()
        now = {"seed": specs.seed, "batch_size": specs.batch_size, "n_ctx": specs.n_ctx, "n_tgt": specs.n_tgt}
        changed = {k: (saved[k], v) for k, v in now.items() if saved[k] != v}
        if changed:
            raise ValueError(f"the checkpoint's task stream differs from this run's: {changed} "
                             f"(saved, now); resume with the same --seed, --meta-batch and sizes.")
        self.start = saved["step"]


# -- the script ----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("sinusoid", "omniglot"), default="sinusoid",
                   help="sinusoid regression (no data) or Omniglot classification (default sinusoid)")
    p.add_argument("--data", help="omniglot: the training zip or folder (images_background_small1.zip)")
    p.add_argument("--eval-data", help="omniglot: held-out classes (default: the last fifth of --data)")
    p.add_argument("--steps", type=int, default=1000, help="meta-training steps (default 1000)")
    p.add_argument("--ways", "--n_way", type=int, default=5, help="omniglot: classes per task, N (default 5)")
    p.add_argument("--shots", "--k_spt", type=int, help="support examples per class (omniglot, default 1) "
                   "or support points (sinusoid, default 10)")
    p.add_argument("--query", "--k_qry", type=int, help="query examples per class (omniglot, default 15) "
                   "or query points in training (sinusoid, default 10)")
    p.add_argument("--image-size", "--imgsz", type=int, default=28, help="omniglot: image side (default 28)")
    p.add_argument("--hidden", type=int, default=64, help="omniglot: conv channels (default 64)")
    p.add_argument("--meta-batch", "--task_num", type=int, default=4, help="tasks per meta-step (default 4)")
    p.add_argument("--inner-steps", "--update_step", type=int, default=1,
                   help="inner steps in training (default 1)")
    p.add_argument("--test-steps", "--update_step_test", type=int, default=10,
                   help="inner steps in validation and test (default 10)")
    p.add_argument("--inner-lr", "--update_lr", type=float, default=0.01,
                   help="inner learning rate (default 0.01)")
    p.add_argument("--meta-lr", "--meta_lr", type=float, default=1e-3,
                   help="Adam learning rate (default 1e-3)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (default: second order)")
    p.add_argument("--eval-tasks", type=int, default=100,
                   help="validation / test tasks, rounded down to whole meta-batches (default 100)")
    p.add_argument("--val-every", type=int, default=200, help="validate every N steps (default 200)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="checkpoint every N steps (default 200)")
    p.add_argument("--num-workers", type=int, default=0, help="task-loader worker processes (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the cores this process may use minus "
                        f"--num-workers, at least 1: {mb.runtime.default_threads(0)} here with no worker)")
    p.add_argument("--seed", type=int, default=0, help="the seed of everything (default 0)")
    p.add_argument("--resume", type=pathlib.Path, help="a Lightning checkpoint to resume from (default: none)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/lightning_maml"),
                   help="logs and checkpoints (default runs/lightning_maml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = mb.runtime.default_threads(args.num_workers)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def build(args) -> tuple:
    """The module and its Trainer (``inference_mode=False``: evaluation adapts with gradients)."""
    module = MAML(task=args.task, data=args.data, eval_data=args.eval_data, ways=args.ways,
                  shots=args.shots, query=args.query, image_size=args.image_size, hidden=args.hidden,
                  meta_batch=args.meta_batch, inner_steps=args.inner_steps,
                  test_steps=args.test_steps, inner_lr=args.inner_lr, meta_lr=args.meta_lr,
                  first_order=args.first_order, eval_tasks=args.eval_tasks, num_workers=args.num_workers,
                  seed=args.seed)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=args.out / "checkpoints", every_n_train_steps=args.checkpoint_every, save_top_k=-1,
        save_last=True, filename="{step}")
    trainer = L.Trainer(
        max_steps=args.steps, max_epochs=-1, accelerator="cpu", devices=1, inference_mode=False,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=min(50, args.val_every),
        callbacks=[checkpoints], logger=L.pytorch.loggers.CSVLogger(args.out, name="logs"),
        enable_progress_bar=not args.no_progress, enable_model_summary=False, default_root_dir=args.out)
    return module, trainer


def fit(trainer, module, ckpt_path=None) -> None:
    """``trainer.fit``, minus one Lightning warning that does not apply here.

    With manual optimization and ``every_n_train_steps``, Lightning 2.6 warns that the checkpoint holds
    the model *after* the optimizer step. That is the state we want: after ``k`` steps the checkpoint has
    the parameters and optimizer state of step ``k`` and ``metabatch.step == k``, the next spec to train on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        trainer.fit(module, ckpt_path=ckpt_path)


def main(argv=None):
    args = parse_args(argv)
    if L is None:
        raise SystemExit(NEEDS_LIGHTNING)
    threads = mb.runtime.use_threads(args.threads)
    try:
        module, trainer = build(args)
        fit(trainer, module, ckpt_path=args.resume)
        result = trainer.test(module, verbose=not args.no_progress)[0]
    finally:
        torch.set_num_threads(threads)
    print(f"trained steps {module.start}..{trainer.global_step - 1}; test loss {result['test_loss']:.4f}"
          + (f", accuracy {result['test_acc']:.3f}" if "test_acc" in result else "")
          + f" ({module.eval_batches() * args.meta_batch} tasks, {args.test_steps} inner steps); checkpoints in "
          f"{args.out / 'checkpoints'}")
    return module, trainer, result


if __name__ == "__main__":
    main()
