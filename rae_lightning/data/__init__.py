"""DataModules and split functions for one-class novelty detection."""

from rae_lightning.data.base import BatchTensorDataset, NoveltyDataModule
from rae_lightning.data.digits import DigitsDataModule
from rae_lightning.data.images import ImageDataModule
from rae_lightning.data.splits import NoveltySplit, anomaly_flags, novelty_split
from rae_lightning.data.tabular import TabularDataModule

__all__ = [
    "BatchTensorDataset",
    "DigitsDataModule",
    "ImageDataModule",
    "NoveltyDataModule",
    "NoveltySplit",
    "TabularDataModule",
    "anomaly_flags",
    "novelty_split",
]
