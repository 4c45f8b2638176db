"""torchvision's image benchmarks (MNIST, Fashion-MNIST, KMNIST, CIFAR-10) as novelty splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.utils import extract_archive

from rae_lightning.data.base import NoveltyDataModule
from rae_lightning.data.splits import NoveltySplit, novelty_split

log = logging.getLogger(__name__)

# name -> (torchvision class, image shape (channels, height, width))
IMAGE_DATASETS: dict[str, tuple[type, tuple[int, int, int]]] = {
    "mnist": (datasets.MNIST, (1, 28, 28)),
    "fashion_mnist": (datasets.FashionMNIST, (1, 28, 28)),
    "kmnist": (datasets.KMNIST, (1, 28, 28)),
    "cifar10": (datasets.CIFAR10, (3, 32, 32)),
}
SPLIT_MODES = ("official", "pooled")


class ImageDataModule(NoveltyDataModule):
    """One-class novelty splits of a torchvision image dataset, held as tensors.

    The whole dataset is read once in :meth:`setup` from the torchvision dataset's
    ``.data`` and ``.targets`` (no per-sample PIL work), flattened to
    ``channels * height * width`` features and scaled to [0, 1]. Batches are
    ``(x (batch, input_dim), y (batch,))`` with ``y`` 1 for an anomaly.

    Two protocols decide which samples the split may use:

    - ``official`` (Deep SVDD): the training normals come from the official training set;
      ``val_frac`` of its normals and ``anomaly_val_frac`` of its anomalies are held out
      to validate; the test split is the whole official test set.
    - ``pooled`` (RaPP): the official training and test sets are pooled, then cut by the
      fractions; RaPP trims val and test to ``anomaly_ratio`` 0.5 (one-vs-rest) or 0.35
      (leave-one-out).

    Args:
        dataset: ``mnist``, ``fashion_mnist``, ``kmnist`` or ``cifar10``.
        root: folder that holds the dataset as torchvision lays it out (for MNIST,
            ``root/MNIST/raw/train-images-idx3-ubyte`` and the other three IDX files,
            plain or gzip-compressed; for CIFAR-10, ``root/cifar-10-batches-py``).
        download: fetch the dataset into ``root`` in :meth:`prepare_data` if it is absent.
        split_mode: ``official`` or ``pooled``, see above.
        **kwargs: the split and loader arguments of
            :class:`~rae_lightning.data.base.NoveltyDataModule`.
    """

    value_scale = 1.0 / 255.0

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        download: bool = False,
        split_mode: str = "official",
        protocol: str = "one_vs_rest",
        classes: Sequence[int | str] | None = (0,),
        train_frac: float = 0.8,
        val_frac: float = 0.2,
        test_frac: float | None = None,
        anomaly_val_frac: float = 0.1,
        anomaly_ratio: float | None = None,
        standardize: bool = False,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        data_on_device: bool | None = None,
    ) -> None:
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"dataset must be one of {list(IMAGE_DATASETS)}, got {dataset!r}")
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {list(SPLIT_MODES)}, got {split_mode!r}")
        super().__init__(
            protocol=protocol,
            classes=classes,
            train_frac=train_frac,
            val_frac=val_frac,
            test_frac=test_frac,
            anomaly_val_frac=anomaly_val_frac,
            anomaly_ratio=anomaly_ratio,
            standardize=standardize,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            data_on_device=data_on_device,
        )
        self._source: np.ndarray | None = None

    @property
    def dataset_class(self) -> type:
        """The torchvision dataset class."""
        return IMAGE_DATASETS[self.hparams.dataset][0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return IMAGE_DATASETS[self.hparams.dataset][1]

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.image_shape))

    def _raw_folder(self) -> Path | None:
        if issubclass(self.dataset_class, datasets.MNIST):
            return Path(self.hparams.root) / self.dataset_class.__name__ / "raw"
        return None

    def prepare_data(self) -> None:
        """Download the dataset if asked to, and unpack gzip-compressed IDX files."""
        hp = self.hparams
        if hp.download:
            for train in (True, False):
                self.dataset_class(hp.root, train=train, download=True)
        raw = self._raw_folder()
        if raw is None or not raw.is_dir():
            return
        # torchvision reads the plain IDX files; copies of the original .gz files are
        # unpacked next to them, as its own download does
        for archive in sorted(raw.glob("*-ubyte.gz")):
            if not archive.with_suffix("").exists():
                log.info("unpacking %s", archive)
                extract_archive(str(archive), str(raw))

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        try:
            ds = self.dataset_class(hp.root, train=train, download=False)
        except RuntimeError as err:
            where = self._raw_folder() or Path(hp.root) / "cifar-10-batches-py"
            raise FileNotFoundError(
                f"{hp.dataset}: dataset files not found under {where} ({err}); "
                "set download: true or copy the files there (gzip-compressed IDX files are "
                "unpacked by prepare_data, which the Trainer calls before setup)"
            ) from None
        data = torch.as_tensor(np.asarray(ds.data))
        if data.ndim == 4:
            # CIFAR ships (n, height, width, channels); flatten channel-first like torch
            data = data.permute(0, 3, 1, 2)
        targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
        return data.reshape(len(data), -1), targets

    def load(self) -> tuple[Tensor, np.ndarray]:
        """Official training then test images (uint8, ``(n, input_dim)``) and labels."""
        train_x, train_y = self._read(train=True)
        test_x, test_y = self._read(train=False)
        self._source = np.array(["train"] * len(train_y) + ["test"] * len(test_y))
        x = torch.cat([train_x, test_x])
        y = torch.cat([train_y, test_y]).numpy()
        return x, y

    def make_split(self, labels: np.ndarray) -> NoveltySplit:
        source = self._source if self.hparams.split_mode == "official" else None
        return novelty_split(labels, **self.split_kwargs(), source=source)

    def describe_classes(self) -> str:
        hp = self.hparams
        return f"dataset={hp.dataset}, split_mode={hp.split_mode}, {super().describe_classes()}"
