"""Ranking metrics for anomaly scores that survive splits without both classes."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision
from torchmetrics.utilities import dim_zero_cat


def _both_classes(target: list[Tensor] | Tensor) -> bool:
    target = dim_zero_cat(target) if isinstance(target, list) else target
    if target.numel() == 0:
        return False
    return bool(target.min() != target.max())


class _RankMixin:
    """Scores are unbounded: rank them as they are (no sigmoid), leave out samples labelled
    -1 (unknown), and give NaN with one warning when the labelled samples do not hold both
    normals and anomalies, instead of torchmetrics' error or a meaningless 0."""

    _warned = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("normalization", None)
        kwargs.setdefault("ignore_index", -1)
        super().__init__(**kwargs)

    def compute(self) -> Tensor:
        if not _both_classes(self.target):
            if not self._warned:
                rank_zero_warn(
                    f"{type(self).__name__}: the labelled samples do not hold both normals "
                    "and anomalies, so the metric is undefined and logged as NaN"
                )
                self._warned = True
            return torch.tensor(float("nan"))
        return super().compute()


class AnomalyAUROC(_RankMixin, BinaryAUROC):
    """AUROC of anomaly scores (anomaly = positive class)."""


class AnomalyAveragePrecision(_RankMixin, BinaryAveragePrecision):
    """Average precision (area under the precision-recall curve) of anomaly scores."""
