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
SOURCES = ("train", "val", "test")


@dataclass(frozen=True)
class NoveltySplit:
    """Indices into the dataset for each split, and the anomaly flag of every sample.

    ``train`` holds normal (or unlabelled) samples only; ``val`` and ``test`` hold both.
    ``is_anomaly`` has one entry per sample of the whole dataset (1 = anomaly, 0 = normal,
    -1 = unknown: an unlabelled sample).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    is_anomaly: np.ndarray

    def labels(self, split: str) -> np.ndarray:
        """Anomaly labels (int64: 1 anomaly, 0 normal, -1 unknown) of the samples of
        ``split``."""
        return self.is_anomaly[getattr(self, split)].astype(np.int64)

    def describe(self) -> str:
        """One line with the size, anomaly count and anomaly ratio of each split."""
        parts = []
        for name in ("train", "val", "test"):
            flags = self.labels(name)
            n_anom = int((flags == 1).sum())
            n_known = int((flags >= 0).sum())
            ratio = n_anom / n_known if n_known else float("nan")
            part = f"{name}={len(flags)} ({n_anom} anomalies, ratio {ratio:.3f}"
            if n_known < len(flags):
                part += f", {len(flags) - n_known} unlabelled"
            parts.append(part + ")")
        return ", ".join(parts)

    def classes_present(self, split: str) -> list[int]:
        """The known anomaly labels (0 and/or 1) present in ``split``."""
        flags = self.labels(split)
        return sorted(set(np.unique(flags[flags >= 0]).tolist()))


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
    values = _class_values(labels, classes)
    present = np.unique(labels).tolist()
    missing = [c for c, v in zip(classes, values, strict=True) if v not in set(present)]
    if missing and protocol != "binary":
        raise ValueError(f"classes {missing} are absent from the labels; present: {present}")
    # binary: labels of 0 alone are all-normal data (it warns later, where AUROC needs
    # both kinds); any other labels without the anomaly values mean the values are wrong
    if len(missing) == len(classes) and protocol == "binary" and set(present) - {0}:
        raise ValueError(
            f"anomaly label values {list(classes)} are absent from the labels; present: "
            f"{present}; set classes to the label value(s) of the anomalies"
        )
    in_classes = np.isin(labels, values)
    if protocol == "one_vs_rest":
        return ~in_classes
    return in_classes


def _class_values(labels: np.ndarray, classes: Sequence[int | str]) -> list:
    """The classes as values comparable with ``labels``, without a lossy cast: text labels
    compare as text, numeric labels with numbers only."""
    if labels.dtype.kind in "OUS":
        return [str(c) for c in classes]
    values = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, float, np.number)):
            try:
                c = float(c)
            except (TypeError, ValueError):
                raise ValueError(
                    f"classes holds {c!r}, but the labels are numbers "
                    f"({np.unique(labels).tolist()[:10]})"
                ) from None
        values.append(int(c) if float(c).is_integer() else float(c))
    return values


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _balance(
    normals: np.ndarray, anomalies: np.ndarray, ratio: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Drop normals or anomalies so that anomalies make up ``ratio`` of the split.

    A split without normals or without anomalies stays as it is: no ratio can be reached
    by dropping, and trimming would empty it.
    """
    if ratio is None or len(normals) == 0 or len(anomalies) == 0:
        return normals, anomalies
    n_norm, n_anom = len(normals), len(anomalies)
    if n_anom > ratio * (n_norm + n_anom):
        n_anom = max(1, int(round(ratio * n_norm / (1.0 - ratio))))
    else:
        n_norm = max(1, int(round(n_anom * (1.0 - ratio) / ratio)))
    return normals[:n_norm], anomalies[:n_anom]


def _cut(items: np.ndarray, *fractions: float | None) -> list[np.ndarray]:
    """Consecutive pieces of ``items`` holding the given shares of it (rounded); a share of
    None takes all the rest, and so does the last share when the shares add up to 1, so
    that rounding leaves no item out (each piece stays within one item of its share)."""
    if None not in fractions and abs(sum(fractions) - 1.0) < 1e-9:
        fractions = (*fractions[:-1], None)
    pieces, start = [], 0
    for frac in fractions:
        size = len(items) - start if frac is None else int(round(frac * len(items)))
        stop = min(start + size, len(items))
        pieces.append(items[start:stop])
        start = stop
    return pieces


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
    anomaly_test_frac: float | None = None,
    source: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
) -> NoveltySplit:
    """Split a labelled dataset for one-class novelty detection.

    The normal samples are shuffled and cut into train, val and test by the fractions
    (``test_frac`` defaults to the rest). The anomalies are shuffled and shared between
    val and test by ``anomaly_val_frac`` (``anomaly_test_frac`` defaults to the rest).
    With ``anomaly_ratio``, val and test are each trimmed (anomalies or normals dropped,
    never moved) so that anomalies make up that share of the split. Train never holds an
    anomaly.

    ``source`` says where a sample comes from when the data ships its own splits:
    samples from ``"val"`` all go to val and samples from ``"test"`` all go to test; only
    the ``"train"`` samples are cut by the fractions. When some sample comes from
    ``"test"``, ``test_frac`` and ``anomaly_test_frac`` default to 0, so the held-out
    ``"train"`` samples validate and the test split is exactly the shipped one. This is
    the classic image protocol (train on the normal class of the official training set,
    validate on held-out training samples, test on the whole official test set) and the
    protocol of a user's own train / val / test files.

    Unlabelled samples (``labelled`` False) count as normal for the split, so they may
    train, and get the flag -1 (unknown) in ``is_anomaly``.

    Args:
        labels: class label of every sample, shape ``(n,)``.
        protocol: see :func:`anomaly_flags`.
        classes: the classes the protocol names.
        train_frac: share of the normals used for training.
        val_frac: share of the normals used for validation.
        test_frac: share of the normals used for testing; default, all the rest (0 when
            the data ships test samples).
        anomaly_val_frac: share of the anomalies that go to validation.
        anomaly_ratio: if set, the share of anomalies in val and in test, in (0, 1).
        seed: seed of the shuffles.
        anomaly_test_frac: share of the anomalies that go to testing; default, all the
            rest (0 when the data ships test samples).
        source: ``"train"``, ``"val"`` or ``"test"`` for every sample, shape ``(n,)``;
            default, all ``"train"``.
        labelled: whether each sample's label is known, shape ``(n,)``; default, all.

    Returns:
        The indices of each split and the anomaly flag of every sample.
    """
    labels = np.asarray(labels)
    n_samples = len(labels)
    source = _check_source(source, n_samples)
    labelled = np.ones(n_samples, bool) if labelled is None else np.asarray(labelled, bool)
    if labelled.shape != (n_samples,):
        raise ValueError(f"labelled must have shape ({n_samples},), got {labelled.shape}")
    ships_test = bool((source == "test").any())
    _check_fraction("train_frac", train_frac)
    _check_fraction("val_frac", val_frac)
    _check_fraction("anomaly_val_frac", anomaly_val_frac)
    # None: the rest of the shuffled samples (0 when the data ships its own test split)
    if test_frac is None and ships_test:
        test_frac = 0.0
    if test_frac is not None:
        _check_fraction("test_frac", test_frac)
    if train_frac + val_frac + (test_frac or 0.0) > 1.0 + 1e-9:
        raise ValueError(
            "train_frac + val_frac + test_frac must be at most 1, got "
            f"{train_frac} + {val_frac} + {test_frac}"
        )
    if anomaly_test_frac is None and ships_test:
        anomaly_test_frac = 0.0
    if anomaly_test_frac is not None:
        _check_fraction("anomaly_test_frac", anomaly_test_frac)
    if anomaly_val_frac + (anomaly_test_frac or 0.0) > 1.0 + 1e-9:
        raise ValueError(
            "anomaly_val_frac + anomaly_test_frac must be at most 1, got "
            f"{anomaly_val_frac} + {anomaly_test_frac}"
        )
    if anomaly_ratio is not None and not 0.0 < anomaly_ratio < 1.0:
        raise ValueError(f"anomaly_ratio must be in (0, 1) or None, got {anomaly_ratio}")

    flags = np.zeros(n_samples, bool)
    if labelled.any():
        flags[labelled] = anomaly_flags(labels[labelled], protocol, classes)
    rng = np.random.default_rng(seed)
    pool = source == "train"
    normals = rng.permutation(np.flatnonzero(~flags & pool))
    anomalies = rng.permutation(np.flatnonzero(flags & pool))
    if len(normals) == 0:
        raise ValueError(
            f"no normal training samples under protocol {protocol!r} with classes {classes}"
        )

    train, val_norm, test_norm = _cut(normals, train_frac, val_frac, test_frac)
    if len(train) == 0:
        raise ValueError(
            f"the training split is empty: train_frac={train_frac} of {len(normals)} "
            "normal samples"
        )
    val_anom, test_anom = _cut(anomalies, anomaly_val_frac, anomaly_test_frac)
    unused_norm = len(normals) - len(train) - len(val_norm) - len(test_norm)
    unused_anom = len(anomalies) - len(val_anom) - len(test_anom)
    if unused_norm or unused_anom:
        log.info(
            "%d normal and %d anomalous samples of the pool that the fractions cut are in no "
            "split (train_frac=%s, val_frac=%s, test_frac=%s, anomaly_val_frac=%s, "
            "anomaly_test_frac=%s)",
            unused_norm, unused_anom, train_frac, val_frac, test_frac, anomaly_val_frac,
            anomaly_test_frac,
        )  # fmt: skip
    for name, norm, anom in (("val", val_norm, val_anom), ("test", test_norm, test_anom)):
        shipped = rng.permutation(np.flatnonzero(source == name))
        norm = np.concatenate([norm, shipped[~flags[shipped]]])
        anom = np.concatenate([anom, shipped[flags[shipped]]])
        if name == "val":
            val_norm, val_anom = _balance(norm, anom, anomaly_ratio)
        else:
            test_norm, test_anom = _balance(norm, anom, anomaly_ratio)

    is_anomaly = flags.astype(np.int64)
    is_anomaly[~labelled] = -1
    return NoveltySplit(
        train=np.sort(train),
        val=np.sort(np.concatenate([val_norm, val_anom]).astype(np.int64)),
        test=np.sort(np.concatenate([test_norm, test_anom]).astype(np.int64)),
        is_anomaly=is_anomaly,
    )


def _check_source(source: np.ndarray | None, n_samples: int) -> np.ndarray:
    if source is None:
        return np.full(n_samples, "train")
    source = np.asarray(source).astype(str)
    if source.shape != (n_samples,):
        raise ValueError(f"source must have shape ({n_samples},), got {source.shape}")
    unknown = sorted(set(np.unique(source).tolist()) - set(SOURCES))
    if unknown:
        raise ValueError(f"source values must be in {list(SOURCES)}, got {unknown}")
    return source
