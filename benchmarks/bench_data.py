"""Throughput of one training epoch through a NoveltyDataModule against a plain tensor loop.

The dataset is 60,000 x 784 random float32 values held in memory (the size of MNIST's
training set). Three ways to feed an epoch are timed, each as samples per second:

- ``plain``: a hand-written loop that slices a random permutation of the tensor;
- ``datamodule``: the batches of ``NoveltyDataModule.train_dataloader()``
  (``BatchTensorDataset``: one indexing operation per batch);
- ``tensordataset``: torch's ``TensorDataset`` with the default collate (one Python call
  per sample), for reference.

``--step`` adds the same autoencoder training step (forward, backward, Adam) to every
batch, so the figures are those of a training epoch; without it only the data path runs.
``--trainer`` also times ``Trainer.fit`` for one epoch on the DataModule.

    python benchmarks/bench_data.py            # data path only
    python benchmarks/bench_data.py --step     # with a training step
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from rae_lightning import AutoEncoder, NoveltyDataModule
from rae_lightning.networks import AutoEncoderNet

log = logging.getLogger("bench_data")


class InMemoryDataModule(NoveltyDataModule):
    """A NoveltyDataModule over a tensor already in memory; every sample normal."""

    def __init__(self, features: torch.Tensor, **kwargs) -> None:
        super().__init__(protocol="binary", classes=[1], train_frac=1.0, val_frac=0.0, **kwargs)
        self.features = features

    @property
    def input_dim(self) -> int:
        return self.features.shape[1]

    def load(self) -> tuple[torch.Tensor, np.ndarray]:
        return self.features, np.zeros(len(self.features), dtype=np.int64)


def plain_batches(x: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    perm = torch.randperm(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
        yield x[perm[start : start + batch_size]]


def epoch_rate(batches: Callable[[], Iterable], step: Callable[[torch.Tensor], None]) -> float:
    """Samples per second of one pass over ``batches()``, calling ``step`` on each batch."""
    n = 0
    start = time.perf_counter()
    for batch in batches():
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        step(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step", action="store_true", help="add an AE training step")
    parser.add_argument("--trainer", action="store_true", help="also time Trainer.fit")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.rand(args.n, args.dim)
    dm = InMemoryDataModule(x, batch_size=args.batch_size)
    dm.setup("fit")
    loader = dm.train_dataloader()
    reference = DataLoader(TensorDataset(x), batch_size=args.batch_size, shuffle=True,
                           drop_last=True)  # fmt: skip

    if args.step:
        net = AutoEncoderNet(args.dim, 256, 32, 4, True, "leaky_relu")
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

        def step(batch: torch.Tensor) -> None:
            loss = (net(batch) - batch).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:

        def step(batch: torch.Tensor) -> None:
            del batch

    feeds = {
        "plain": lambda: plain_batches(x, args.batch_size),
        "datamodule": lambda: iter(loader),
        "tensordataset": lambda: iter(reference),
    }
    rates: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(args.repeats):
        for name, feed in feeds.items():
            rates[name].append(epoch_rate(feed, step))
    median = {name: float(np.median(values)) for name, values in rates.items()}

    what = "training epoch (AE step)" if args.step else "data path only"
    log.info("%d x %d float32, batch %d, %s, median of %d epochs, %d threads",
             args.n, args.dim, args.batch_size, what, args.repeats,
             torch.get_num_threads())  # fmt: skip
    for name, rate in median.items():
        log.info("  %-14s %12.0f samples/s", name, rate)
    log.info("  ratio datamodule / plain:    %.3f", median["datamodule"] / median["plain"])
    log.info("  ratio tensordataset / plain: %.3f", median["tensordataset"] / median["plain"])

    if args.trainer:
        model = AutoEncoder(input_dim=args.dim, hidden_dim=256, latent_dim=32, n_layers=4,
                            residual=True)  # fmt: skip
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", limit_val_batches=0)  # fmt: skip
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        rate = len(dm.datasets["train"]) / (time.perf_counter() - start)
        log.info("  %-14s %12.0f samples/s (Trainer.fit, one epoch, AutoEncoder)", "trainer", rate)


if __name__ == "__main__":
    main()
