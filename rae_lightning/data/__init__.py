"""DataModules and split functions for one-class novelty detection."""

from rae_lightning.data.base import BatchTensorDataset, NoveltyDataModule
from rae_lightning.data.digits import DigitsDataModule
from rae_lightning.data.images import ImageDataModule
from rae_lightning.data.splits import NoveltySplit, anomaly_flags, novelty_split

__all__ = [
    "BatchTensorDataset",
    "DigitsDataModule",
    "ImageDataModule",
    "NoveltyDataModule",
    "NoveltySplit",
    "anomaly_flags",
    "novelty_split",
]
