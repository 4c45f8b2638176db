"""One-class novelty splits: which samples train, validate and test a detector.

Every split here is a pure function of the labels, the protocol, the fractions and the
seed: the same arguments give the same indices on every machine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

PROTOCOLS = ("one_vs_rest", "leave_one_out", "binary")


@dataclass(frozen=True)
class NoveltySplit:
    """Indices into the dataset for each split, and the anomaly flag of every sample.

    ``train`` holds normal samples only; ``val`` and ``test`` hold both. ``is_anomaly``
    has one entry per sample of the whole dataset (1 = anomaly, 0 = normal).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    is_anomaly: np.ndarray

    def labels(self, split: str) -> np.ndarray:
        """Anomaly labels (0/1, int64) of the samples of ``split``."""
        return self.is_anomaly[getattr(self, split)].astype(np.int64)

    def describe(self) -> str:
        """One line with the size and anomaly count of each split."""
        parts = []
        for name in ("train", "val", "test"):
            idx = getattr(self, name)
            parts.append(f"{name}={len(idx)} ({int(self.is_anomaly[idx].sum())} anomalies)")
        return ", ".join(parts)


def anomaly_flags(
    labels: np.ndarray, protocol: str, classes: Sequence[int | str] | None
) -> np.ndarray:
    """Per-sample anomaly flags (bool) under a protocol.

    Args:
        labels: class label of every sample, shape ``(n,)``.
        protocol: ``one_vs_rest`` (``classes`` are normal, the rest anomalies),
            ``leave_one_out`` (``classes`` are anomalies, the rest normal) or ``binary``
            (``classes`` are the anomaly label values, default ``[1]``).
        classes: the class values the protocol names.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    labels = np.asarray(labels)
    if classes is None or len(classes) == 0:
        if protocol != "binary":
            raise ValueError(f"classes must name at least one class for protocol {protocol!r}")
        classes = [1]
    present = set(np.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing and protocol != "binary":
        raise ValueError(
            f"classes {missing} are absent from the labels; present: {sorted(present)}"
        )
    in_classes = np.isin(labels, np.asarray(list(classes), dtype=labels.dtype))
    if protocol == "one_vs_rest":
        return ~in_classes
    return in_classes


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _balance(normals: np.ndarray, anomalies: np.ndarray, ratio: float | None):
    """Drop normals or anomalies so that anomalies make up ``ratio`` of the split."""
    if ratio is None or len(normals) + len(anomalies) == 0:
        return normals, anomalies
    n_norm, n_anom = len(normals), len(anomalies)
    if n_anom > ratio * (n_norm + n_anom):
        n_anom = int(round(ratio * n_norm / (1.0 - ratio)))
    else:
        n_norm = int(round(n_anom * (1.0 - ratio) / ratio))
    return normals[:n_norm], anomalies[:n_anom]


def novelty_split(
    labels: np.ndarray,
    protocol: str = "one_vs_rest",
    classes: Sequence[int | str] | None = (0,),
    train_frac: float = 0.6,
    val_frac: float = 0.2,
    test_frac: float | None = None,
    anomaly_val_frac: float = 0.5,
    anomaly_ratio: float | None = None,
    seed: int = 0,
) -> NoveltySplit:
    """Split a labelled dataset for one-class novelty detection.

    The normal samples are shuffled and cut into train, val and test by the fractions
    (``test_frac`` defaults to the rest). The anomalies are shuffled and shared between
    val and test by ``anomaly_val_frac``. With ``anomaly_ratio``, val and test are each
    trimmed (anomalies or normals dropped, never moved) so that anomalies make up that
    share of the split. Train never holds an anomaly.

    Args:
        labels: class label of every sample, shape ``(n,)``.
        protocol: see :func:`anomaly_flags`.
        classes: the classes the protocol names.
        train_frac: share of the normals used for training.
        val_frac: share of the normals used for validation.
        test_frac: share of the normals used for testing; default, all the rest.
        anomaly_val_frac: share of the anomalies that go to validation.
        anomaly_ratio: if set, the share of anomalies in val and in test, in (0, 1).
        seed: seed of the shuffles.

    Returns:
        The indices of each split and the anomaly flag of every sample.
    """
    _check_fraction("train_frac", train_frac)
    _check_fraction("val_frac", val_frac)
    _check_fraction("anomaly_val_frac", anomaly_val_frac)
    if test_frac is None:
        test_frac = max(0.0, 1.0 - train_frac - val_frac)
    _check_fraction("test_frac", test_frac)
    if train_frac + val_frac + test_frac > 1.0 + 1e-9:
        raise ValueError(
            "train_frac + val_frac + test_frac must be at most 1, got "
            f"{train_frac} + {val_frac} + {test_frac}"
        )
    if anomaly_ratio is not None and not 0.0 < anomaly_ratio < 1.0:
        raise ValueError(f"anomaly_ratio must be in (0, 1) or None, got {anomaly_ratio}")

    flags = anomaly_flags(labels, protocol, classes)
    rng = np.random.default_rng(seed)
    normals = rng.permutation(np.flatnonzero(~flags))
    anomalies = rng.permutation(np.flatnonzero(flags))
    if len(normals) == 0:
        raise ValueError(f"no normal samples under protocol {protocol!r} with classes {classes}")

    n = len(normals)
    n_train = int(round(train_frac * n))
    n_val = int(round(val_frac * n))
    n_test = min(int(round(test_frac * n)), n - n_train - n_val)
    if n_train == 0:
        raise ValueError(
            f"the training split is empty: train_frac={train_frac} of {n} normal samples"
        )
    train = normals[:n_train]
    val_norm = normals[n_train : n_train + n_val]
    test_norm = normals[n_train + n_val : n_train + n_val + n_test]

    n_anom_val = int(round(anomaly_val_frac * len(anomalies)))
    val_anom, test_anom = anomalies[:n_anom_val], anomalies[n_anom_val:]
    val_norm, val_anom = _balance(val_norm, val_anom, anomaly_ratio)
    test_norm, test_anom = _balance(test_norm, test_anom, anomaly_ratio)

    return NoveltySplit(
        train=np.sort(train),
        val=np.sort(np.concatenate([val_norm, val_anom])),
        test=np.sort(np.concatenate([test_norm, test_anom])),
        is_anomaly=flags.astype(np.int64),
    )
