"""Batches of the base DataModule: one tensor index per batch, every sample once an epoch."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from rae_lightning import AutoEncoder
from rae_lightning.data.base import BatchTensorDataset, TensorBatchSampler
from rae_lightning.data.digits import DigitsDataModule


def test_training_batches_cover_every_sample_once_and_drop_the_last() -> None:
    dm = DigitsDataModule(protocol="leave_one_out", classes=[1], batch_size=100)
    dm.setup()
    n = len(dm.datasets["train"])

    batches = list(dm.train_dataloader())

    assert all(x.shape == (100, 64) and y.shape == (100,) for x, y in batches)
    assert len(batches) == n // 100
    rows = torch.cat([x for x, _ in batches])
    assert len(torch.unique(rows, dim=0)) == len(rows)


def test_evaluation_batches_keep_order_and_the_last_batch() -> None:
    dm = DigitsDataModule(protocol="leave_one_out", classes=[1], eval_batch_size=50)
    dm.setup()

    x = torch.cat([xb for xb, _ in dm.val_dataloader()])

    torch.testing.assert_close(x, dm.datasets["val"].x)


def test_shuffle_follows_the_global_seed() -> None:
    dm = DigitsDataModule(protocol="leave_one_out", classes=[1], batch_size=32)
    dm.setup()

    torch.manual_seed(7)
    first = next(iter(dm.train_dataloader()))[0]
    torch.manual_seed(7)
    again = next(iter(dm.train_dataloader()))[0]
    torch.manual_seed(8)
    other = next(iter(dm.train_dataloader()))[0]

    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, dm.datasets["train"].x[:32])  # shuffled at all


def test_lightning_can_swap_in_a_distributed_sampler() -> None:
    dataset = BatchTensorDataset(torch.arange(40.0).unsqueeze(1), torch.zeros(40))
    dm = DigitsDataModule(batch_size=8)
    dm.datasets["train"] = dataset
    loader = dm.train_dataloader()

    halves = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        updated = _update_dataloader(loader, sampler)
        assert isinstance(updated.batch_sampler, TensorBatchSampler)
        halves.append(torch.cat([x for x, _ in updated]).flatten())

    assert all(len(half) == 16 for half in halves)  # 20 each, the last partial batch dropped
    assert not set(halves[0].tolist()) & set(halves[1].tolist())


def test_training_never_asks_the_dataset_for_one_sample(monkeypatch, tmp_path) -> None:
    def one_sample(self, index):
        raise AssertionError(f"per-sample access to sample {index} in the data path")

    monkeypatch.setattr(BatchTensorDataset, "__getitem__", one_sample)
    dm = DigitsDataModule(protocol="leave_one_out", classes=[1], batch_size=64)
    model = AutoEncoder(input_dim=64, hidden_dim=16, latent_dim=4, n_layers=2)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=tmp_path,
    )  # fmt: skip

    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    trainer.predict(model, dm)

    assert trainer.global_step == 4
