"""scikit-learn's digits: 1,797 real 8x8 handwritten digits shipped with the package."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from rae_lightning.data.base import NoveltyDataModule


class DigitsDataModule(NoveltyDataModule):
    """One-class novelty splits of scikit-learn's digits, the offline default.

    Pixels (0..16) are scaled to [0, 1] and flattened to 64 features. The data ships with
    scikit-learn, so nothing is downloaded. All split and loader arguments are those of
    :class:`~rae_lightning.data.base.NoveltyDataModule`.
    """

    @property
    def input_dim(self) -> int:
        return 64

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        features, labels = load_digits(return_X_y=True)
        return (features / 16.0).astype(np.float32), labels.astype(np.int64)
