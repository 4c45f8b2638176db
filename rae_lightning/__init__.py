"""rae-lightning: anomaly detection with deep (residual, variational) autoencoders."""

from rae_lightning.data import (
    DigitsDataModule,
    ImageDataModule,
    NoveltyDataModule,
    TabularDataModule,
    novelty_split,
)
from rae_lightning.models import AnomalyDetector, AutoEncoder, VariationalAutoEncoder
from rae_lightning.networks import AutoEncoderNet, VAENet

__version__ = "0.1.0"

__all__ = [
    "AnomalyDetector",
    "AutoEncoder",
    "AutoEncoderNet",
    "DigitsDataModule",
    "ImageDataModule",
    "NoveltyDataModule",
    "TabularDataModule",
    "VAENet",
    "VariationalAutoEncoder",
    "novelty_split",
]
