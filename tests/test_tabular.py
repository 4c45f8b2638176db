"""TabularDataModule on generated CSV and NPZ files: splits, windows, and every bad-data case."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import read_scalars

from rae_lightning import AutoEncoder, TabularDataModule
from rae_lightning.cli import RAECLI, main

TABULAR_CONFIG = Path(__file__).parents[1] / "configs" / "tabular_rae.yaml"
FEATURES = ["temperature", "pressure", "vibration", "current"]


def make_table(n: int = 300, anomaly_every: int = 10, seed: int = 0) -> pd.DataFrame:
    """Sensor-like rows: normals near a 2-D manifold, every tenth row shifted far off it."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(n, 2))
    x = codes @ rng.normal(size=(2, 4)) + 0.05 * rng.normal(size=(n, 4)) + 10.0
    failure = (np.arange(n) % anomaly_every == anomaly_every - 1).astype(int)
    x[failure == 1] += rng.normal(scale=4.0, size=(failure.sum(), 4))
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["failure"] = failure
    return frame


def write_csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def dm_for(path: str | None = None, **kwargs) -> TabularDataModule:
    kwargs.setdefault("label_column", "failure")
    return TabularDataModule(path=path, **kwargs)


def test_csv_split_holds_normals_in_train_and_standardises_from_them(tmp_path: Path) -> None:
    frame = make_table()
    dm = dm_for(write_csv(tmp_path / "t.csv", frame))
    dm.setup()
    split = dm.split

    assert dm.input_dim == 4
    assert (frame["failure"].to_numpy()[split.train] == 0).all()
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert len(all_idx) == len(np.unique(all_idx)) == len(frame)
    raw_train = frame[FEATURES].to_numpy()[split.train]
    np.testing.assert_allclose(dm.mean.numpy(), raw_train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), raw_train.std(axis=0, ddof=1), rtol=1e-4)
    expected_test = (frame[FEATURES].to_numpy()[split.test] - dm.mean.numpy()) / dm.std.numpy()
    np.testing.assert_allclose(dm.datasets["test"].x.numpy(), expected_test, atol=1e-4)
    y = dm.datasets["test"].y.numpy()
    np.testing.assert_array_equal(y, frame["failure"].to_numpy()[split.test])


def test_npz_like_adbench_gives_the_same_split_as_the_csv(tmp_path: Path) -> None:
    frame = make_table()
    np.savez(tmp_path / "t.npz", X=frame[FEATURES].to_numpy(), y=frame["failure"].to_numpy())
    from_npz = TabularDataModule(path=str(tmp_path / "t.npz"))
    from_csv = dm_for(write_csv(tmp_path / "t.csv", frame))
    from_npz.setup()
    from_csv.setup()

    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(from_npz.split, name), getattr(from_csv.split, name))
        torch.testing.assert_close(from_npz.datasets[name].x, from_csv.datasets[name].x)


def test_feature_columns_by_name_and_position(tmp_path: Path) -> None:
    frame = make_table()
    frame.insert(0, "machine", "press-7")  # a text column the features leave out
    path = write_csv(tmp_path / "t.csv", frame)
    by_name = dm_for(path, feature_columns=["vibration", "temperature"])
    by_position = dm_for(path, feature_columns=[3, 1])
    by_name.setup()
    by_position.setup()

    assert by_name.input_dim == by_position.input_dim == 2
    torch.testing.assert_close(by_name.datasets["train"].x, by_position.datasets["train"].x)


def test_explicit_files_keep_their_rows(tmp_path: Path) -> None:
    normal = make_table(200, anomaly_every=10**6, seed=1).drop(columns="failure")
    val, test = make_table(60, seed=2), make_table(80, seed=3)
    dm = TabularDataModule(
        train_path=write_csv(tmp_path / "normal.csv", normal),  # no label column at all
        val_path=write_csv(tmp_path / "val.csv", val),
        test_path=write_csv(tmp_path / "test.csv", test),
        label_column="failure", train_frac=1.0, val_frac=0.0,
    )  # fmt: skip
    dm.setup()

    assert len(dm.datasets["train"]) == 200
    np.testing.assert_array_equal(dm.split.val, np.arange(200, 260))
    np.testing.assert_array_equal(dm.datasets["val"].y.numpy(), val["failure"].to_numpy())
    np.testing.assert_array_equal(dm.split.test, np.arange(260, 340))
    np.testing.assert_array_equal(dm.datasets["test"].y.numpy(), test["failure"].to_numpy())
    raw = test[FEATURES].to_numpy()
    restored = dm.datasets["test"].x.numpy() * dm.std.numpy() + dm.mean.numpy()
    np.testing.assert_allclose(restored, raw, rtol=1e-4)


def test_training_file_alone_is_carved_into_val_and_test(tmp_path: Path) -> None:
    dm = TabularDataModule(train_path=write_csv(tmp_path / "a.csv", make_table()),
                           label_column="failure")  # fmt: skip
    dm.setup()

    assert len(dm.datasets["train"]) == round(0.6 * 270)
    assert set(dm.datasets["test"].y.tolist()) == {0, 1}


def test_unlabelled_file_trains_on_every_row_and_predicts(tmp_path: Path) -> None:
    frame = make_table().drop(columns="failure")
    path = write_csv(tmp_path / "u.csv", frame)
    # no validation split: with no label there is nothing to validate (or checkpoint) on
    dm = TabularDataModule(path=path, label_column=None, train_frac=0.7, val_frac=0.0)
    with pytest.warns(UserWarning, match="the test split holds no labelled sample"):
        dm.setup()

    assert sum(len(d) for d in dm.datasets.values()) == len(frame)
    assert all((d.y == -1).all() for d in dm.datasets.values())
    model = AutoEncoder(input_dim=4, hidden_dim=16, latent_dim=2, n_layers=2)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    out = trainer.predict(model, datamodule=dm)
    scores = torch.cat([batch["score"] for batch in out])
    assert scores.shape == (len(dm.datasets["test"]),) and torch.isfinite(scores).all()


def test_windows_flatten_consecutive_rows_and_flag_any_anomaly(tmp_path: Path) -> None:
    frame = make_table(50, anomaly_every=10)
    dm = dm_for(write_csv(tmp_path / "s.csv", frame), window=5, stride=5, standardize=False,
                train_frac=0.5, val_frac=0.25)  # fmt: skip
    dm.setup()

    assert dm.input_dim == 20
    x = np.concatenate([dm.datasets[n].x.numpy() for n in ("train", "val", "test")])
    y = np.concatenate([dm.datasets[n].y.numpy() for n in ("train", "val", "test")])
    order = np.argsort(np.concatenate([dm.split.train, dm.split.val, dm.split.test]))
    rows = frame[FEATURES].to_numpy(dtype=np.float32)
    np.testing.assert_allclose(x[order], rows.reshape(10, 20), rtol=1e-6)
    expected = frame["failure"].to_numpy().reshape(10, 5).max(axis=1)
    np.testing.assert_array_equal(y[order], expected)


def test_windows_stay_inside_each_file_and_overlap_is_warned(tmp_path: Path, caplog) -> None:
    dm = TabularDataModule(
        train_path=write_csv(tmp_path / "a.csv", make_table(40, anomaly_every=10**6)),
        test_path=write_csv(tmp_path / "b.csv", make_table(23)),
        label_column="failure", window=4, stride=2,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        dm.setup()

    assert len(dm.split.is_anomaly) == (40 - 4) // 2 + 1 + (23 - 4) // 2 + 1
    assert "windows overlap" in caplog.text


def test_drop_and_fill_policies(tmp_path: Path) -> None:
    frame = make_table(100).astype({"pressure": object})
    frame.loc[3, "temperature"] = np.nan
    frame.loc[7, "pressure"] = "n/a"
    frame.loc[11, "current"] = np.inf
    path = write_csv(tmp_path / "bad.csv", frame)
    dropped = dm_for(path, nan_policy="drop", standardize=False)
    filled = dm_for(path, nan_policy="fill", fill_value=-1.0, standardize=False)
    dropped.setup()
    filled.setup()

    assert len(dropped.split.is_anomaly) == 97
    assert len(filled.split.is_anomaly) == 100
    x = torch.cat([filled.datasets[n].x for n in ("train", "val", "test")])
    assert (x == -1.0).sum() == 3 and torch.isfinite(x).all()


def test_drop_policy_drops_every_window_that_touches_a_bad_row(tmp_path: Path) -> None:
    frame = make_table(40)
    frame.loc[10, "vibration"] = np.nan
    dm = dm_for(write_csv(tmp_path / "w.csv", frame), window=4, stride=2, nan_policy="drop")
    dm.setup()

    # windows start at 0, 2, ..., 36; those starting at 8 and 10 hold row 10
    assert len(dm.split.is_anomaly) == 19 - 2


def _bad(tmp_path: Path, case: str) -> tuple[dict, type[Exception], str]:
    """A broken input and the one-line error it must raise."""
    frame = make_table(60)
    csv = tmp_path / "bad.csv"
    if case == "missing file":
        return (
            {"path": str(tmp_path / "nope.csv")},
            FileNotFoundError,
            r"nope\.csv: file not found",
        )
    if case == "missing label column":
        write_csv(csv, frame.drop(columns="failure"))
        return {"path": str(csv)}, ValueError, r"bad\.csv: label column 'failure' not found"
    if case == "missing npz label key":
        np.savez(tmp_path / "bad.npz", X=frame[FEATURES].to_numpy())
        return (
            {"path": str(tmp_path / "bad.npz"), "label_column": "y"},
            ValueError,
            r"bad\.npz: label column 'y' not found; keys: \['X'\]",
        )
    if case == "missing npz X":
        np.savez(tmp_path / "bad.npz", features=frame[FEATURES].to_numpy())
        return {"path": str(tmp_path / "bad.npz")}, ValueError, r"bad\.npz: key 'X' not found"
    if case == "non-numeric":
        frame = frame.astype({"pressure": object})
        frame.loc[5, "pressure"] = "broken"
        write_csv(csv, frame)
        return (
            {"path": str(csv)},
            ValueError,
            r"column 'pressure': non-numeric value 'broken' in row 5",
        )
    if case == "nan":
        frame.loc[8, "current"] = np.nan
        write_csv(csv, frame)
        return {"path": str(csv)}, ValueError, r"bad\.csv: column 'current': NaN .* in row 8"
    if case == "inf":
        frame.loc[9, "temperature"] = -np.inf
        write_csv(csv, frame)
        return {"path": str(csv)}, ValueError, r"column 'temperature': infinite value in row 9"
    if case == "absent normal class":
        write_csv(csv, frame)
        kwargs = {"path": str(csv), "protocol": "one_vs_rest", "classes": [7]}
        return kwargs, ValueError, r"bad\.csv: label column 'failure': classes \[7\] are absent"
    if case == "empty training split":
        frame["failure"] = 1
        write_csv(csv, frame)
        return {"path": str(csv)}, ValueError, r"bad\.csv: no normal training samples"
    if case == "missing labels":
        frame = frame.astype({"failure": float})
        frame.loc[4, "failure"] = np.nan
        write_csv(csv, frame)
        return (
            {"path": str(csv)},
            ValueError,
            r"label column 'failure': 1 missing labels, first in row 4",
        )
    if case == "unknown feature column":
        write_csv(csv, frame)
        kwargs = {"path": str(csv), "feature_columns": ["temperature", "humidity"]}
        return kwargs, ValueError, r"bad\.csv: feature column 'humidity' not found"
    if case == "empty file":
        csv.write_text("")
        return {"path": str(csv)}, ValueError, r"bad\.csv: the file is empty"
    if case == "header only":
        csv.write_text(",".join([*FEATURES, "failure"]) + "\n")
        return {"path": str(csv)}, ValueError, r"bad\.csv: the file has no rows"
    if case == "different widths":
        write_csv(tmp_path / "train.csv", frame)
        write_csv(csv, frame.drop(columns="current"))
        kwargs = {"train_path": str(tmp_path / "train.csv"), "test_path": str(csv)}
        return kwargs, ValueError, "different numbers of feature columns"
    if case == "too few rows for a window":
        write_csv(csv, frame.head(3))
        return (
            {"path": str(csv), "window": 5},
            ValueError,
            r"bad\.csv: 3 rows, fewer than window=5",
        )
    raise AssertionError(case)


BAD_CASES = [
    "missing file", "missing label column", "missing npz label key", "missing npz X",
    "non-numeric", "nan", "inf", "absent normal class", "empty training split",
    "missing labels", "unknown feature column", "empty file", "header only",
    "different widths", "too few rows for a window",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_raises_one_line_naming_file_column_and_problem(tmp_path: Path, case: str):
    kwargs, error, message = _bad(tmp_path, case)
    kwargs.setdefault("label_column", "failure")
    dm = TabularDataModule(**kwargs)

    with pytest.raises(error, match=message) as info:
        dm.setup()
    assert "\n" not in str(info.value)


def test_one_class_test_split_warns_and_goes_on(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", make_table(100))
    test = write_csv(tmp_path / "test.csv", make_table(30, anomaly_every=10**6))
    dm = TabularDataModule(train_path=train, test_path=test, label_column="failure")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    messages = [str(w.message) for w in caught if "split holds" in str(w.message)]
    assert messages == ["the test split holds normals only: test/auroc needs normals and "
                        "anomalies and will not be meaningful"]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of path and train_path"),
        ({"path": "a.csv", "train_path": "b.csv"}, "give exactly one of path and train_path"),
        ({"path": "a.csv", "test_path": "b.csv"}, "val_path and test_path go with train_path"),
        ({"path": "a.parquet"}, r"path must end in .csv or .npz, got 'a.parquet'"),
        ({"path": "a.csv", "nan_policy": "ignore"}, "nan_policy must be one of"),
        ({"path": "a.csv", "window": 0}, "window must be at least 1"),
        ({"path": "a.csv", "stride": 0}, "stride must be at least 1"),
    ],
)
def test_bad_arguments_fail_in_init_without_io(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TabularDataModule(**kwargs)


def test_input_dim_from_the_header_alone(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", make_table())

    assert dm_for(path).input_dim == 4
    assert dm_for(path, window=3).input_dim == 12
    assert dm_for(str(tmp_path / "absent.csv"), feature_columns=FEATURES[:3]).input_dim == 3


def test_tabular_config_fits_and_tests_through_the_cli(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "readings.csv", make_table(300))
    args = [
        "--config", str(TABULAR_CONFIG), f"--data.init_args.path={path}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
    ]  # fmt: skip

    cli = RAECLI(args=args, run=False)
    assert cli.model.hparams.input_dim == 4
    main(["fit", *args])
    main(["test", *args])

    auroc = read_scalars(tmp_path / "lightning_logs" / "version_1", "test/auroc")
    assert len(auroc) == 1 and 0.0 <= next(iter(auroc.values())) <= 1.0


def test_text_labels_and_multiclass_protocols(tmp_path: Path) -> None:
    frame = make_table(120)
    frame["state"] = np.array(["idle", "run", "fault"])[np.arange(120) % 3]
    path = write_csv(tmp_path / "m.csv", frame.drop(columns="failure"))
    binary = dm_for(path, label_column="state", classes=["fault"])
    one_vs_rest = dm_for(path, label_column="state", protocol="one_vs_rest", classes=["run"])
    binary.setup()
    one_vs_rest.setup()

    state = frame["state"].to_numpy()
    np.testing.assert_array_equal(binary.split.is_anomaly, state == "fault")
    np.testing.assert_array_equal(one_vs_rest.split.is_anomaly, state != "run")
    assert (state[one_vs_rest.split.train] == "run").all()


def test_explicit_files_with_default_fractions_lose_no_row(tmp_path: Path) -> None:
    normal = make_table(200, anomaly_every=10**6, seed=1)
    normal.loc[[5, 50], "failure"] = 1  # labelled failures in the training file validate
    val, test = make_table(60, seed=2), make_table(80, seed=3)
    dm = TabularDataModule(
        train_path=write_csv(tmp_path / "normal.csv", normal),
        val_path=write_csv(tmp_path / "val.csv", val),
        test_path=write_csv(tmp_path / "test.csv", test),
        label_column="failure",
    )
    dm.setup()

    assert len(dm.datasets["train"]) == 198
    assert len(dm.datasets["val"]) == 60 + 2
    np.testing.assert_array_equal(dm.split.test, np.arange(260, 340))


def test_training_and_test_files_carve_validation_from_training_rows(tmp_path: Path) -> None:
    normal = make_table(200, anomaly_every=10**6, seed=1)
    dm = TabularDataModule(
        train_path=write_csv(tmp_path / "normal.csv", normal),
        test_path=write_csv(tmp_path / "test.csv", make_table(80, seed=3)),
        label_column="failure",
    )
    dm.setup()

    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (160, 40)
    assert len(dm.datasets["test"]) == 80


def test_feature_constant_in_training_is_centred_not_blown_up(tmp_path: Path) -> None:
    frame = make_table()
    frame["current"] = np.where(frame["failure"] == 1, 13.0, 12.0)  # constant among normals
    dm = dm_for(write_csv(tmp_path / "c.csv", frame))
    dm.setup()

    assert float(dm.std[3]) == 1.0
    test = dm.datasets["test"]
    np.testing.assert_allclose(test.x[:, 3].numpy(), test.y.numpy().astype(float), atol=1e-6)


@pytest.mark.parametrize(
    ("labels", "classes", "message"),
    [
        (["no", "yes"], [1], r"anomaly label values \[1\] are absent from the labels; "
                             r"present: \['no', 'yes'\]"),
        (["fail", "ok"], ["failure"], r"anomaly label values \['failure'\] are absent"),
        ([0, 1], ["fault"], r"classes holds 'fault', but the labels are numbers"),
    ],
)  # fmt: skip
def test_anomaly_label_values_that_do_not_occur_are_an_error(
    tmp_path: Path, labels: list, classes: list, message: str
) -> None:
    frame = make_table(100)
    frame["failure"] = [labels[i % 2] for i in range(len(frame))]
    dm = dm_for(write_csv(tmp_path / "l.csv", frame), classes=classes)

    with pytest.raises(ValueError, match=r"l\.csv: label column 'failure': " + message) as info:
        dm.setup()
    assert "\n" not in str(info.value)


def test_no_normal_rows_names_the_protocol_of_the_config(tmp_path: Path) -> None:
    frame = make_table(100)
    frame["failure"] = np.arange(100) % 2
    dm = dm_for(write_csv(tmp_path / "a.csv", frame), protocol="leave_one_out", classes=[0, 1])

    with pytest.raises(ValueError, match=r"under protocol 'leave_one_out' with classes \[0, 1\]"):
        dm.setup()


def test_npz_of_python_objects_or_not_an_npz_is_named(tmp_path: Path) -> None:
    objects = tmp_path / "objects.npz"
    np.savez(objects, X=np.array([[1, "a"], [2, "b"]], dtype=object), y=np.array([0, 1]))
    broken = tmp_path / "broken.npz"
    broken.write_text("not a zip archive\n")

    with pytest.raises(ValueError, match=r"objects\.npz: key 'X' holds Python objects"):
        TabularDataModule(path=str(objects)).setup()
    with pytest.raises(ValueError, match=r"broken\.npz: not a readable NPZ file"):
        TabularDataModule(path=str(broken)).setup()


def test_stride_without_window_is_refused() -> None:
    with pytest.raises(ValueError, match="stride goes with window; set window too, got stride=4"):
        TabularDataModule(path="t.csv", stride=4)
