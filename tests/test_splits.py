"""The novelty split: invariants for every protocol, reproducible from its seed."""

from __future__ import annotations

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
