"""The novelty split: invariants for every protocol, reproducible from its seed."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rae_lightning.data.splits import anomaly_flags, novelty_split

LABELS = np.repeat(np.arange(10), 50)  # 10 classes of 50 samples
CASES = [
    pytest.param("one_vs_rest", [3], None, id="one_vs_rest"),
    pytest.param("one_vs_rest", [3, 7], 0.5, id="one_vs_rest-two-normal-ratio"),
    pytest.param("leave_one_out", [3], None, id="leave_one_out"),
    pytest.param("leave_one_out", [3], 0.35, id="leave_one_out-ratio"),
    pytest.param("binary", [1], None, id="binary"),
]


@pytest.mark.parametrize(("protocol", "classes", "ratio"), CASES)
def test_split_invariants(protocol: str, classes: list[int], ratio: float | None) -> None:
    split = novelty_split(LABELS, protocol, classes, anomaly_ratio=ratio, seed=1)

    assert split.is_anomaly[split.train].sum() == 0
    assert len(split.train) > 0
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert len(all_idx) == len(np.unique(all_idx))
    for name in ("val", "test"):
        assert split.labels(name).sum() > 0
        assert (split.labels(name) == 0).sum() > 0
        if ratio is not None:
            n_anom = split.labels(name).sum()
            expected = ratio * len(getattr(split, name))
            assert abs(n_anom - expected) <= 1


@pytest.mark.parametrize(("protocol", "classes", "ratio"), CASES)
def test_split_is_reproducible_from_seed(protocol: str, classes: list[int], ratio) -> None:
    a = novelty_split(LABELS, protocol, classes, anomaly_ratio=ratio, seed=5)
    b = novelty_split(LABELS, protocol, classes, anomaly_ratio=ratio, seed=5)
    c = novelty_split(LABELS, protocol, classes, anomaly_ratio=ratio, seed=6)

    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.train, c.train)


def test_fractions_of_normals() -> None:
    split = novelty_split(LABELS, "leave_one_out", [0], train_frac=0.5, val_frac=0.2, seed=0)
    n_normal = 450

    assert len(split.train) == round(0.5 * n_normal)
    assert (split.labels("val") == 0).sum() == round(0.2 * n_normal)
    assert (split.labels("test") == 0).sum() == n_normal - 225 - 90


def test_protocol_flags() -> None:
    labels = np.array([0, 1, 2, 1])

    np.testing.assert_array_equal(anomaly_flags(labels, "one_vs_rest", [1]), [1, 0, 1, 0])
    np.testing.assert_array_equal(anomaly_flags(labels, "leave_one_out", [1]), [0, 1, 0, 1])
    np.testing.assert_array_equal(anomaly_flags(labels, "binary", None), [0, 1, 0, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "one_vs_all"}, "protocol must be one of"),
        ({"classes": [42]}, r"classes \[42\] are absent"),
        ({"train_frac": 1.5}, "train_frac must be in"),
        ({"train_frac": 0.7, "val_frac": 0.2, "test_frac": 0.2}, "at most 1"),
        ({"train_frac": 0.0}, "the training split is empty"),
        ({"anomaly_ratio": 1.0}, "anomaly_ratio must be in"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        novelty_split(LABELS, **({"protocol": "one_vs_rest", "classes": [0]} | kwargs))


# Data that ships its own splits: 300 "official" training samples, 200 test samples
SOURCE = np.array(["train"] * 300 + ["test"] * 200)
SHIPPED = np.concatenate([np.arange(300) % 10, np.arange(200) % 10])
SOURCE_CASES = [
    pytest.param(protocol, classes, ratio, id=f"{protocol}-{ratio}")
    for protocol, classes in (("one_vs_rest", [3]), ("leave_one_out", [3]), ("binary", [1]))
    for ratio in (None, 0.35)
]


@pytest.mark.parametrize(("protocol", "classes", "ratio"), SOURCE_CASES)
def test_shipped_splits_keep_their_samples(protocol: str, classes: list[int], ratio) -> None:
    split = novelty_split(
        SHIPPED, protocol, classes, train_frac=0.8, val_frac=0.2, anomaly_val_frac=0.1,
        anomaly_ratio=ratio, seed=3, source=SOURCE,
    )  # fmt: skip

    assert split.is_anomaly[split.train].sum() == 0
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert len(all_idx) == len(np.unique(all_idx))
    assert (split.train < 300).all() and (split.val < 300).all()
    assert (split.test >= 300).all()
    n_normal = int((split.is_anomaly[:300] == 0).sum())
    assert abs(len(split.train) - 0.8 * n_normal) <= 1
    if ratio is None:
        # the whole shipped test set, and the requested share of the held-out anomalies
        np.testing.assert_array_equal(split.test, np.arange(300, 500))
        n_anom = int(split.is_anomaly[:300].sum())
        assert abs(split.labels("val").sum() - 0.1 * n_anom) <= 1
    else:
        for name in ("val", "test"):
            assert abs(split.labels(name).sum() - ratio * len(getattr(split, name))) <= 1
    again = novelty_split(
        SHIPPED, protocol, classes, train_frac=0.8, val_frac=0.2, anomaly_val_frac=0.1,
        anomaly_ratio=ratio, seed=3, source=SOURCE,
    )  # fmt: skip
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(split, name), getattr(again, name))


def test_shipped_val_and_test_files() -> None:
    source = np.array(["train"] * 100 + ["val"] * 30 + ["test"] * 40)
    labels = np.concatenate([np.zeros(100), np.arange(30) % 2, np.arange(40) % 4 == 0])
    split = novelty_split(labels, "binary", [1], train_frac=1.0, val_frac=0.0, source=source)

    np.testing.assert_array_equal(split.train, np.arange(100))
    np.testing.assert_array_equal(split.val, np.arange(100, 130))
    np.testing.assert_array_equal(split.test, np.arange(130, 170))


@pytest.mark.parametrize("n_anomalies", [1, 5, 9, 45])
def test_default_fractions_use_every_sample(n_anomalies: int) -> None:
    labels = np.concatenate([np.zeros(97, int), np.ones(n_anomalies, int)])
    split = novelty_split(labels, "binary", [1], anomaly_val_frac=0.5, seed=0)

    assert len(split.train) + len(split.val) + len(split.test) == len(labels)


def test_unlabelled_samples_train_and_are_flagged_unknown() -> None:
    labels = np.zeros(200, int)
    labelled = np.arange(200) >= 120  # the first 120 samples have no label
    labels[180:] = 1
    split = novelty_split(labels, "binary", [1], labelled=labelled, seed=0)

    np.testing.assert_array_equal(split.is_anomaly[:120], -1)
    assert (split.is_anomaly[split.train] <= 0).all()
    assert (split.is_anomaly[split.train] == -1).any()
    assert split.classes_present("test") == [0, 1]
    assert "unlabelled" in split.describe()


def test_all_unlabelled_data_needs_no_class_to_be_present() -> None:
    split = novelty_split(np.zeros(50, int), "one_vs_rest", [4], labelled=np.zeros(50, bool))

    assert len(split.train) == 30 and (split.is_anomaly == -1).all()
    assert split.classes_present("val") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": np.array(["train"] * 499 + ["holdout"])}, r"source values must be in"),
        ({"source": np.array(["train"] * 3)}, r"source must have shape \(500,\)"),
        ({"anomaly_val_frac": 0.6, "anomaly_test_frac": 0.6}, "at most 1"),
        ({"labelled": np.ones(3, bool)}, r"labelled must have shape \(500,\)"),
    ],
)
def test_bad_source_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        novelty_split(LABELS, "one_vs_rest", [0], **kwargs)


def test_anomaly_ratio_never_empties_a_split_with_one_kind() -> None:
    split = novelty_split(LABELS, "leave_one_out", [3], anomaly_val_frac=0.0, anomaly_ratio=0.5)

    assert len(split.val) == round(0.2 * 450)
    assert split.classes_present("val") == [0]
    assert abs(split.labels("test").mean() - 0.5) <= 1 / len(split.test)


def test_samples_left_by_the_fractions_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rae_lightning.data.splits"):
        novelty_split(LABELS, "leave_one_out", [3], train_frac=0.5, val_frac=0.2, test_frac=0.2)

    assert "45 normal and 0 anomalous samples of the pool that the fractions cut are in no" in (
        caplog.text
    )


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("sizes", [(13, 4), (101, 9), (57, 1)], ids=["13+4", "101+9", "57+1"])
@pytest.mark.parametrize("protocol", ["one_vs_rest", "leave_one_out", "binary"])
def test_every_fraction_holds_to_one_sample(protocol: str, sizes: tuple, seed: int) -> None:
    n_normal, n_anomaly = sizes
    # class 0 is normal and class 5 anomalous, whatever the protocol calls them
    labels = np.r_[np.zeros(n_normal, int), np.full(n_anomaly, 5)]
    labels = np.random.default_rng(seed).permutation(labels)
    if protocol == "binary":
        labels = (labels == 5).astype(int)
    classes = {"one_vs_rest": [0], "leave_one_out": [5], "binary": [1]}[protocol]
    fracs = {"train_frac": 0.5, "val_frac": 0.3, "test_frac": 0.2, "anomaly_val_frac": 0.4}
    split = novelty_split(labels, protocol, classes, seed=seed, **fracs)
    again = novelty_split(labels, protocol, classes, seed=seed, **fracs)

    anomalous = labels == (1 if protocol == "binary" else 5)
    np.testing.assert_array_equal(split.is_anomaly, anomalous)
    assert not anomalous[split.train].any()
    used = np.concatenate([split.train, split.val, split.test])
    assert len(used) == len(np.unique(used)) == len(labels)
    assert abs(len(split.train) - 0.5 * n_normal) <= 1
    assert abs((split.labels("val") == 0).sum() - 0.3 * n_normal) <= 1
    assert abs(split.labels("val").sum() - 0.4 * n_anomaly) <= 1
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(split, name), getattr(again, name))


@pytest.mark.parametrize("ratio", [0.1, 0.35, 0.5])
def test_anomaly_ratio_holds_to_one_sample_at_odd_sizes(ratio: float) -> None:
    labels = np.r_[np.zeros(77, int), np.ones(23, int)]

    split = novelty_split(labels, "binary", [1], anomaly_ratio=ratio, seed=3)

    for name in ("val", "test"):
        flags = split.labels(name)
        assert abs(flags.sum() - ratio * len(flags)) <= 1
        assert flags.sum() >= 1 and (flags == 0).sum() >= 1
