"""A metabatch 0.9.1 program shaped like 0.9.1's examples/neural_process.py (tests/test_compat.py runs it).

What makes it 0.9.1 code: a ``TaskSet`` subclass built with six positional arguments; ``__gettask__``
drawing from the global ``np.random`` and ``torch`` generators; a tqdm loop over a ``TaskLoader`` with
workers, ``shuffle=True``, no ``seed=`` (the script seeds the global generators instead); a validation
loader on an ``eval`` TaskSet; a conditional neural process trained on it. Synthetic images stand in for
MNIST (no download). It prints one line per epoch with the losses, so that two runs can be compared.
"""

import argparse
import random

import numpy as np
import torch
from tqdm import tqdm

from metabatch import TaskLoader, TaskSet


class ImageCompletion(TaskSet):
    IMG_SIZE = (12, 12)

    def __init__(self, min_ctx_pts, max_ctx_pts, eval, images):
        n = self.IMG_SIZE[0] ** 2
        super().__init__(min_ctx_pts, max_ctx_pts, n, n, eval, False)  # six positional arguments
        self._img_dim = self.IMG_SIZE[0]
        self._samples = images

    def __gettask__(self, index, n_context, n_target):
        img = self._samples[index]
        ctx_x = torch.from_numpy(np.random.randint(0, self._img_dim, size=(n_context, 2)))  # global RNG
        ctx_y = img[ctx_x[:, 0], ctx_x[:, 1]] + 0.01 * torch.randn(n_context, 1)               # global RNG
        axis = torch.arange(0, self._img_dim)
        tgt_x = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=2).reshape(self._img_dim ** 2, 2)
        tgt_y = img[tgt_x[:, 0], tgt_x[:, 1]]
        return ctx_x.float() / (self._img_dim - 1), ctx_y, tgt_x.float() / (self._img_dim - 1), tgt_y

    def __len__(self):
        return len(self._samples)


class CNP(torch.nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(),
                                           torch.nn.Linear(width, width))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(width + 2, width), torch.nn.ReLU(),
                                           torch.nn.Linear(width, 2))

    def forward(self, ctx_x, ctx_y, tgt_x):
        r = self.encoder(torch.cat((ctx_x, ctx_y), dim=-1)).mean(dim=1)
        out = self.decoder(torch.cat((r.unsqueeze(1).expand(-1, tgt_x.shape[1], -1), tgt_x), dim=-1))
        mu, log_sigma = out[..., :1], out[..., 1:]
        sigma = 0.1 + 0.9 * torch.nn.functional.softplus(log_sigma)
        return torch.distributions.Independent(torch.distributions.Normal(mu, sigma), 1)


def main(batch_size, workers, epochs):
    images = torch.rand(48, *ImageCompletion.IMG_SIZE, 1, generator=torch.Generator().manual_seed(0))
    max_ctx_pts = int(0.3 * ImageCompletion.IMG_SIZE[0] ** 2)
    cnp = CNP()
    opt = torch.optim.Adam(cnp.parameters(), lr=1e-3)
    train_loader = TaskLoader(ImageCompletion(5, max_ctx_pts, False, images[:40]), num_workers=workers,
                              batch_size=batch_size, shuffle=True)
    val_loader = TaskLoader(ImageCompletion(5, max_ctx_pts, True, images[40:]), num_workers=workers,
                            batch_size=batch_size, shuffle=False)
    for epoch in range(epochs):
        epoch_loss, batches = 0.0, 0
        for batch in tqdm(train_loader, disable=True):
            opt.zero_grad()
            ctx_x, ctx_y, tgt_x, tgt_y = batch
            loss = -torch.mean(cnp(ctx_x, ctx_y, tgt_x).log_prob(tgt_y))
            epoch_loss += loss.detach().item()
            batches += 1
            loss.backward()
            opt.step()
        with torch.no_grad():
            val_loss = sum(-torch.mean(cnp(c, cy, t).log_prob(ty)).item() for c, cy, t, ty in val_loader)
        print(f"epoch {epoch} loss {epoch_loss / batches!r} val {val_loss!r} batches {batches}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-b", dest="batch_size", type=int, default=8)
    parser.add_argument("-w", dest="workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    main(args.batch_size, args.workers, args.epochs)
