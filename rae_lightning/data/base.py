"""The base DataModule: in-memory tensors, a novelty split, batches cut without per-sample work."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from rae_lightning.data.splits import NoveltySplit, novelty_split

log = logging.getLogger(__name__)


class BatchTensorDataset(Dataset):
    """Features and labels held as tensors and indexed a whole batch at a time.

    The DataLoader's fetcher calls ``__getitems__`` with the list of indices of a batch,
    so a batch is one tensor indexing operation instead of one Python call per sample.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        # indices go where the data is (one copy per batch when they come as a list)
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        return self.x[idx], self.y[idx]


class TensorBatchSampler(BatchSampler):
    """A BatchSampler that yields each batch of indices as one int64 tensor.

    For a :class:`RandomSampler` (without replacement) or a :class:`SequentialSampler`
    the order of a whole epoch is one ``randperm`` or ``arange``, cut into slices: no
    Python work per sample. Any other sampler (a ``DistributedSampler`` that Lightning
    puts in) is read in full and cut the same way. Lightning can re-create this class
    with another sampler, as it does for the torch ``BatchSampler``.

    With ``device`` set, the epoch's order is copied there once and every batch of
    indices is a slice of it on that device: a dataset held on a GPU is then indexed
    without a host-to-device copy, or a wait for the GPU, per batch.
    """

    def __init__(
        self,
        sampler: Any,
        batch_size: int,
        drop_last: bool,
        epoch_seed: Callable[[], int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.epoch_seed = epoch_seed
        self.device = device

    def __iter__(self) -> Iterator[Tensor]:
        sampler = self.sampler
        if type(sampler) is RandomSampler and not sampler.replacement:
            generator = sampler.generator
            if generator is None and self.epoch_seed is not None:
                generator = torch.Generator().manual_seed(self.epoch_seed())
            elif generator is None:
                # as RandomSampler does: a fresh seed from torch's global generator
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
                generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(sampler.data_source), generator=generator)
            order = order[: sampler.num_samples]
        elif type(sampler) is SequentialSampler:
            order = torch.arange(len(sampler.data_source))
        else:
            order = torch.as_tensor(list(sampler), dtype=torch.long)
        if self.device is not None:
            order = order.to(self.device)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]


class EvalShardSampler(DistributedSampler):
    """Every ``num_replicas``-th index from ``rank``: each sample on exactly one process.

    Being a DistributedSampler, Lightning keeps it instead of putting in its own, which
    pads uneven shards with repeated samples. Evaluation loops may then run a different
    number of batches per process; the metrics gather their states at the end.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, len(dataset), num_replicas))
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for :class:`BatchTensorDataset`: the batch is already stacked."""
    return batch


class NoveltyDataModule(L.LightningDataModule):
    """Base DataModule for one-class novelty detection on an in-memory dataset.

    Subclasses implement :meth:`load` (features and class labels of every sample) and
    :attr:`input_dim`. The base splits with :meth:`make_split` (by default
    :func:`novelty_split` with the arguments below), scales with statistics of the
    training normals only, and serves batches ``(x, y)`` with ``x`` of shape
    ``(batch, input_dim)`` (float32) and ``y`` of shape ``(batch,)`` (1 = anomaly,
    0 = normal, -1 = unknown label).

    Args:
        protocol: ``one_vs_rest``, ``leave_one_out`` or ``binary`` (see ``novelty_split``).
        classes: the classes the protocol names (normal for one_vs_rest, anomalous for
            leave_one_out, anomaly label values for binary).
        train_frac: share of the normals used for training.
        val_frac: share of the normals used for validation.
        test_frac: share of the normals used for testing; default, all the rest.
        anomaly_val_frac: share of the anomalies that go to validation.
        anomaly_ratio: if set, the share of anomalies in val and in test.
        standardize: z-score each feature with mean and std of the training normals.
        seed: seed of the split.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict; default 4x training.
        num_workers: DataLoader workers; 0 is fastest for in-memory tensors.
        pin_memory: pin host memory for faster copies to a GPU.
        data_on_device: keep the splits in the memory of the Trainer's GPU and cut the
            batches there, so no step waits for a host-to-device copy. ``None`` (the
            default): when training on a CUDA GPU and the splits take at most a quarter
            of its free memory; ``True``: on any accelerator; ``False``: never (batches
            are copied from host memory, pinned with ``pin_memory``). Needs
            ``num_workers=0``; on a CPU it changes nothing.
    """

    def __init__(
        self,
        protocol: str = "one_vs_rest",
        classes: Sequence[int | str] | None = (0,),
        train_frac: float = 0.6,
        val_frac: float = 0.2,
        test_frac: float | None = None,
        anomaly_val_frac: float = 0.5,
        anomaly_ratio: float | None = None,
        standardize: bool = False,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        data_on_device: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        if data_on_device and num_workers > 0:
            raise ValueError(
                f"data_on_device=True needs num_workers=0 (workers cannot share GPU "
                f"tensors), got num_workers={num_workers}"
            )
        self.save_hyperparameters()
        self.split: NoveltySplit | None = None
        self.datasets: dict[str, BatchTensorDataset] = {}
        # copies of the splits on the Trainer's accelerator (see data_on_device)
        self._device_datasets: dict[str, BatchTensorDataset] = {}
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    @property
    def input_dim(self) -> int:
        """Features per sample, as the model sees them."""
        raise NotImplementedError(f"{type(self).__name__} must define input_dim")

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """``(channels, height, width)`` for image data, else None."""
        return None

    def load(self) -> tuple[np.ndarray | Tensor, np.ndarray]:
        """All samples as ``(features (n, input_dim), class labels (n,))``.

        Features may be of any numeric dtype (images stay uint8 here); they are turned
        into float32 one split at a time and multiplied by :attr:`value_scale`.
        """
        raise NotImplementedError(f"{type(self).__name__} must define load()")

    #: factor applied to the features after the float conversion (1/255 for 8-bit images)
    value_scale: float = 1.0

    def split_kwargs(self) -> dict:
        """The arguments of :func:`novelty_split` that the hyperparameters set."""
        hp = self.hparams
        return {
            "protocol": hp.protocol,
            "classes": hp.classes,
            "train_frac": hp.train_frac,
            "val_frac": hp.val_frac,
            "test_frac": hp.test_frac,
            "anomaly_val_frac": hp.anomaly_val_frac,
            "anomaly_ratio": hp.anomaly_ratio,
            "seed": hp.seed,
        }

    def make_split(self, labels: np.ndarray) -> NoveltySplit:
        """The novelty split of the samples that :meth:`load` returned.

        Subclasses whose data ships its own splits or unlabelled samples override this to
        pass ``source`` or ``labelled`` on to :func:`novelty_split`.
        """
        return novelty_split(labels, **self.split_kwargs())

    def describe_classes(self) -> str:
        """Which classes are normal, in words, for the setup log line."""
        hp = self.hparams
        classes = list(hp.classes) if hp.classes is not None else None
        if hp.protocol == "one_vs_rest":
            return f"normal classes {classes}, every other class anomalous"
        if hp.protocol == "leave_one_out":
            return f"anomalous classes {classes}, every other class normal"
        return f"anomaly label values {classes or [1]}"

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        features, labels = self.load()
        split = self.make_split(labels)
        if len(split.train) < 2:
            raise ValueError(
                f"the training split holds {len(split.train)} sample; BatchNorm needs at "
                "least 2: raise train_frac or give more normal data"
            )
        x_all = torch.as_tensor(features)
        y_all = torch.as_tensor(split.is_anomaly, dtype=torch.long)
        xs = {}
        for name in ("train", "val", "test"):
            idx = torch.as_tensor(getattr(split, name), dtype=torch.long)
            xs[name] = x_all[idx].to(torch.float32)
            if self.value_scale != 1.0:
                xs[name].mul_(self.value_scale)
        if self.hparams.standardize:
            self.mean = xs["train"].mean(dim=0)
            std = xs["train"].std(dim=0).nan_to_num(0.0)
            # a feature constant in training is centred, not divided by a tiny number
            # (which would blow its val/test values up by orders of magnitude)
            self.std = torch.where(std > 1e-6, std, torch.ones_like(std))
            for name in xs:
                xs[name].sub_(self.mean).div_(self.std)
        self.split = split
        for name, x in xs.items():
            idx = torch.as_tensor(getattr(split, name), dtype=torch.long)
            self.datasets[name] = BatchTensorDataset(x.contiguous(), y_all[idx].contiguous())
        if rank_zero_only.rank == 0:
            log.info(
                "%s: protocol=%s, %s, input_dim=%d; %s",
                type(self).__name__,
                self.hparams.protocol,
                self.describe_classes(),
                self.input_dim,
                split.describe(),
            )
        for name in ("val", "test"):
            present = split.classes_present(name)
            if len(getattr(split, name)) == 0:
                rank_zero_warn(f"the {name} split is empty: {name}/auroc cannot be computed")
            elif len(present) < 2:
                held = {(): "no labelled sample", (0,): "normals only", (1,): "anomalies only"}
                rank_zero_warn(
                    f"the {name} split holds {held[tuple(present)]}: {name}/auroc needs "
                    "normals and anomalies and will not be meaningful"
                )

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        if name not in self.datasets:
            raise RuntimeError(f"call setup() before asking for the {name} dataloader")
        dataset = self.datasets[name]
        hp = self.hparams
        device = self._data_device()
        if device is not None:
            if name not in self._device_datasets:
                ds = BatchTensorDataset(dataset.x.to(device), dataset.y.to(device))
                self._device_datasets[name] = ds
            dataset = self._device_datasets[name]
        batch_size = hp.batch_size if train else (hp.eval_batch_size or 4 * hp.batch_size)
        sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
        # BatchNorm cannot train on a batch of one sample
        drop_last = train and len(dataset) > batch_size
        trainer = self.trainer
        if not train and trainer is not None and trainer.world_size > 1:
            # Lightning's own sampler for val/test pads the shards with repeated samples,
            # which would count them twice in AUROC and thresholds; this one does not pad
            return DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=EvalShardSampler(dataset, trainer.world_size, trainer.global_rank),
                num_workers=hp.num_workers,
                pin_memory=hp.pin_memory and device is None,
                persistent_workers=hp.num_workers > 0,
                collate_fn=keep_batch,
            )
        epoch_seed = None
        if train:
            self._shuffle_base = torch.initial_seed()
            epoch_seed = self._epoch_seed
        return DataLoader(
            dataset,
            batch_sampler=TensorBatchSampler(sampler, batch_size, drop_last, epoch_seed, device),
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and device is None,
            persistent_workers=hp.num_workers > 0,
            collate_fn=keep_batch,
        )

    def _data_device(self) -> torch.device | None:
        """The accelerator that holds the splits (see ``data_on_device``), or None for host
        memory."""
        choice = self.hparams.get("data_on_device")
        trainer = self.trainer
        if choice is False or trainer is None:
            return None
        device = trainer.strategy.root_device
        if device.type == "cpu":
            return None
        if choice is None:
            if device.type != "cuda" or self.hparams.num_workers > 0:
                return None
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = sum(ds.x.nbytes + ds.y.nbytes for ds in self.datasets.values())
            if nbytes > free // 4:
                return None
        if not self._device_datasets:
            nbytes = sum(ds.x.nbytes + ds.y.nbytes for ds in self.datasets.values())
            log.info("Keeping the splits on %s (%.1f MiB)", device, nbytes / 2**20)
        return device

    def _epoch_seed(self) -> int:
        # The shuffle of an epoch depends only on the run's seed and the epoch number, so
        # a run resumed from a checkpoint sees the batches an uninterrupted run would see.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return (self._shuffle_base * 1_000_003 + epoch) % (2**63 - 1)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
