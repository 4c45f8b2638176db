"""Tables of features (CSV or NPZ) as novelty splits: ADBench files, sensor logs, own splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rae_lightning.data.base import NoveltyDataModule
from rae_lightning.data.splits import NoveltySplit, anomaly_flags, novelty_split

log = logging.getLogger(__name__)

NAN_POLICIES = ("error", "drop", "fill")
SUFFIXES = (".csv", ".npz")


@dataclass
class _Table:
    """One file read: features ``(rows, features)`` float64, class labels or None."""

    path: Path
    role: str
    features: np.ndarray
    labels: np.ndarray | None
    columns: list[str]


class TabularDataModule(NoveltyDataModule):
    """One-class novelty splits of a table of features read from CSV or NPZ files.

    Either one file (``path``) is split by the protocol, or the data comes already split:
    ``train_path`` holds normal training data (a label column is optional there: without
    it every row is normal), ``val_path`` and ``test_path`` hold labelled evaluation data.
    Without ``val_path`` the validation split is carved out of the training file by
    ``val_frac``; without ``test_path`` the test split is too.

    CSV files have a header row; NPZ files hold the features under key ``X`` and the labels
    under the key ``label_column`` (``y`` in ADBench files). With ``label_column: null``
    the data is unlabelled: every row is taken as normal for training and carries the
    label -1 (unknown), so ``rae predict`` scores it but no AUROC can be computed.

    Rows must be in time order for ``window``: each file is cut into windows of
    ``window`` consecutive rows every ``stride`` rows; a window is flattened to
    ``window * features`` values (row after row) and is an anomaly if any of its rows is.
    Windows never cross from one file into the next.

    Standardisation (on by default) uses the mean and standard deviation of the training
    normals only.

    Args:
        path: one CSV or NPZ file, split by the protocol.
        train_path: a file of normal training data (instead of ``path``).
        val_path: a labelled validation file (with ``train_path``).
        test_path: a labelled test file (with ``train_path``).
        label_column: CSV column or NPZ key of the labels; None for unlabelled data.
        feature_columns: CSV column names, or positions (CSV and NPZ), of the features;
            default, every column except the label column.
        nan_policy: what to do with missing, non-numeric or infinite feature values:
            ``error`` (default), ``drop`` the row (or every window that touches it), or
            ``fill`` it with ``fill_value``.
        fill_value: the value ``fill`` writes.
        window: rows per sample for time-ordered data; default, one row is one sample.
        stride: rows between the starts of consecutive windows.
        train_frac: share of the normal rows of ``path`` or ``train_path`` that train;
            default, 0.6 of one file, and all of a ``train_path`` that is not cut for
            a missing ``val_path`` or ``test_path`` (then 0.8).
        val_frac: share that validates; default 0.2, or 0 when ``val_path`` is given.
        test_frac: share that tests; default, the rest (0 when ``test_path`` is given).
        anomaly_val_frac: share of the anomalies of ``path`` or ``train_path`` that
            validate; default 0.5, or 1 when ``test_path`` is given (the rest test).
        **kwargs: the split and loader arguments of
            :class:`~rae_lightning.data.base.NoveltyDataModule`; ``protocol`` defaults to
            ``binary`` with anomaly label ``1``, as in ADBench and ODDS files.
    """

    def __init__(
        self,
        path: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        label_column: str | None = "y",
        feature_columns: Sequence[str | int] | None = None,
        nan_policy: str = "error",
        fill_value: float = 0.0,
        window: int | None = None,
        stride: int = 1,
        protocol: str = "binary",
        classes: Sequence[int | str] | None = (1,),
        train_frac: float | None = None,
        val_frac: float | None = None,
        test_frac: float | None = None,
        anomaly_val_frac: float | None = None,
        anomaly_ratio: float | None = None,
        standardize: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        data_on_device: bool | None = None,
    ) -> None:
        if (path is None) == (train_path is None):
            raise ValueError(
                f"give exactly one of path and train_path, got path={path!r}, "
                f"train_path={train_path!r}"
            )
        if path is not None and (val_path is not None or test_path is not None):
            raise ValueError(
                f"val_path and test_path go with train_path, not with path={path!r}; "
                "a single file is split by the protocol"
            )
        for name, value in (("path", path), ("train_path", train_path),
                            ("val_path", val_path), ("test_path", test_path)):  # fmt: skip
            if value is not None and Path(value).suffix.lower() not in SUFFIXES:
                raise ValueError(f"{name} must end in {' or '.join(SUFFIXES)}, got {value!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {list(NAN_POLICIES)}, got {nan_policy!r}")
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1 or None, got {window}")
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        if window is None and stride != 1:
            raise ValueError(f"stride goes with window; set window too, got stride={stride}")
        if feature_columns is not None and len(feature_columns) == 0:
            raise ValueError("feature_columns must name at least one column, or be None")
        super().__init__(
            protocol=protocol,
            classes=classes,
            train_frac=train_frac,
            val_frac=val_frac,
            test_frac=test_frac,
            anomaly_val_frac=anomaly_val_frac,
            anomaly_ratio=anomaly_ratio,
            standardize=standardize,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            data_on_device=data_on_device,
        )
        self._n_features: int | None = None
        self._source: np.ndarray | None = None
        self._labelled: np.ndarray | None = None

    # -- files -----------------------------------------------------------------------

    @property
    def files(self) -> dict[str, Path]:
        """The files by role: ``train`` (also for ``path``), ``val``, ``test``."""
        hp = self.hparams
        roles = {"train": hp.path or hp.train_path, "val": hp.val_path, "test": hp.test_path}
        return {role: Path(p) for role, p in roles.items() if p is not None}

    def _label_optional(self, role: str) -> bool:
        # an explicit training file is normal data by definition: its labels may be absent
        return role == "train" and self.hparams.train_path is not None

    @property
    def input_dim(self) -> int:
        """Features per sample: feature columns times ``window`` rows."""
        if self._n_features is None:
            if self.hparams.feature_columns is not None:
                self._n_features = len(self.hparams.feature_columns)
            else:
                self._n_features = len(self._feature_names(self.files["train"], "train"))
        return self._n_features * (self.hparams.window or 1)

    def _feature_names(self, path: Path, role: str) -> list[str]:
        """Column names of the features of a file, from its header only."""
        _check_exists(path, role)
        if path.suffix.lower() == ".csv":
            columns = [str(c) for c in _read_csv(path, nrows=0).columns]
        else:
            with _open_npz(path) as npz:
                x = _npz_array(npz, path, "X")
                columns = [str(i) for i in range(x.shape[1] if x.ndim == 2 else 0)]
        label = self.hparams.label_column
        return [c for c in columns if c != label]

    def _read(self, path: Path, role: str) -> _Table:
        hp = self.hparams
        _check_exists(path, role)
        if path.suffix.lower() == ".csv":
            frame = _read_csv(path)
            columns = [str(c) for c in frame.columns]
            frame.columns = columns
            labels = None
            if hp.label_column is not None and hp.label_column in columns:
                labels = _clean_labels(frame[hp.label_column], path, hp.label_column)
            elif hp.label_column is not None and not self._label_optional(role):
                raise ValueError(
                    f"{path}: label column {hp.label_column!r} not found; columns: {columns}"
                )
            names = self._pick(columns, path, exclude=hp.label_column)
            values = frame[names].apply(pd.to_numeric, errors="coerce")
            _check_numeric(frame[names], values, path, hp.nan_policy)
            features = values.to_numpy(dtype=np.float64)
        else:
            with _open_npz(path) as npz:
                x = _npz_array(npz, path, "X")
                if x.ndim != 2:
                    raise ValueError(
                        f"{path}: key 'X' must be 2-D (rows, features), got {x.shape}"
                    )
                labels = None
                if hp.label_column is not None and hp.label_column in npz.files:
                    y = _npz_array(npz, path, hp.label_column).reshape(-1)
                    if len(y) != len(x):
                        raise ValueError(
                            f"{path}: label key {hp.label_column!r} has {len(y)} values for "
                            f"{len(x)} rows of X"
                        )
                    labels = _clean_labels(pd.Series(y), path, hp.label_column)
                elif hp.label_column is not None and not self._label_optional(role):
                    raise ValueError(
                        f"{path}: label column {hp.label_column!r} not found; keys: {npz.files}"
                    )
            columns = [str(i) for i in range(x.shape[1])]
            names = self._pick(columns, path, exclude=None)
            if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
                raise ValueError(f"{path}: key 'X' holds non-numeric values (dtype {x.dtype})")
            features = x[:, [columns.index(n) for n in names]].astype(np.float64)
        if len(features) == 0:
            raise ValueError(f"{path}: the file has no rows")
        if not np.isfinite(features).all() and hp.nan_policy == "error":
            _raise_first_bad(features, names, path)
        return _Table(path, role, features, labels, names)

    def _pick(self, columns: list[str], path: Path, exclude: str | None) -> list[str]:
        """The feature column names of a file, in the order the features are used."""
        wanted = self.hparams.feature_columns
        if wanted is None:
            return [c for c in columns if c != exclude]
        names = []
        for col in wanted:
            if isinstance(col, int) and not isinstance(col, bool):
                if not 0 <= col < len(columns):
                    raise ValueError(
                        f"{path}: feature column {col} is out of range for {len(columns)} columns"
                    )
                names.append(columns[col])
            elif str(col) in columns:
                names.append(str(col))
            else:
                raise ValueError(f"{path}: feature column {col!r} not found; columns: {columns}")
        if exclude is not None and exclude in names:
            raise ValueError(f"{path}: column {exclude!r} is both the label and a feature")
        return names

    # -- rows to samples ---------------------------------------------------------------

    def _samples(self, table: _Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples, anomaly flags and known-label mask of one file, after the NaN policy."""
        hp = self.hparams
        features = table.features
        bad_rows = ~np.isfinite(features).all(axis=1)
        if hp.nan_policy == "fill":
            features = np.where(np.isfinite(features), features, hp.fill_value)
        if table.labels is not None:
            flags = self._flags(table.labels, table.path)
            known = np.ones(len(features), bool)
        elif hp.label_column is not None:
            # explicit training file without labels: normal by definition
            flags = np.zeros(len(features), bool)
            known = np.ones(len(features), bool)
        else:
            flags = np.zeros(len(features), bool)
            known = np.zeros(len(features), bool)
        drop = bad_rows if hp.nan_policy == "drop" else np.zeros(len(features), bool)

        if hp.window is None:
            keep = ~drop
            samples, flags, known = features[keep], flags[keep], known[keep]
        else:
            samples, flags, known = self._windows(table, features, flags, known, drop)
        if len(samples) == 0:
            raise ValueError(
                f"{table.path}: no samples left after dropping rows with missing, "
                f"non-numeric or infinite values ({int(drop.sum())} of {len(drop)} rows)"
            )
        if drop.any():
            log.info("%s: dropped %d rows with missing values", table.path, int(drop.sum()))
        return samples, flags, known

    def _windows(self, table, features, flags, known, drop):
        hp = self.hparams
        n_rows = len(features)
        if n_rows < hp.window:
            raise ValueError(f"{table.path}: {n_rows} rows, fewer than window={hp.window}")
        # (n_windows, features, window) -> (n_windows, window, features): row after row
        windows = torch.as_tensor(features).unfold(0, hp.window, hp.stride).transpose(1, 2)
        samples = windows.reshape(len(windows), -1).numpy()

        def any_in_window(mask: np.ndarray) -> np.ndarray:
            rows = torch.as_tensor(mask, dtype=torch.uint8).unfold(0, hp.window, hp.stride)
            return rows.amax(dim=1).numpy().astype(bool)

        keep = ~any_in_window(drop)
        window_flags = any_in_window(flags)
        window_known = ~any_in_window(~known)
        return samples[keep], window_flags[keep], window_known[keep]

    def _flags(self, labels: np.ndarray, path: Path) -> np.ndarray:
        hp = self.hparams
        try:
            return anomaly_flags(labels, hp.protocol, hp.classes)
        except ValueError as err:
            raise ValueError(f"{path}: label column {hp.label_column!r}: {err}") from None

    # -- the NoveltyDataModule hooks -----------------------------------------------------

    def split_kwargs(self) -> dict:
        """The split arguments, with the fraction defaults that fit the files given: rows
        of a train file go to the splits that no file of their own provides."""
        kwargs = super().split_kwargs()
        hp = self.hparams
        own_val, own_test = hp.val_path is not None, hp.test_path is not None
        if hp.path is not None or not (own_val or own_test):
            defaults = {"train_frac": 0.6, "val_frac": 0.2, "anomaly_val_frac": 0.5}
        else:
            defaults = {
                "train_frac": 1.0 if own_val and own_test else 0.8,
                "val_frac": 0.0 if own_val else 0.2,
                "anomaly_val_frac": 1.0 if own_test else 0.5,
            }
        for name, value in defaults.items():
            if kwargs[name] is None:
                kwargs[name] = value
        return kwargs

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``(n, input_dim)`` of every file and their anomaly flags ``(n,)``."""
        tables = [self._read(path, role) for role, path in self.files.items()]
        n_features = {len(t.columns) for t in tables}
        if len(n_features) > 1:
            counts = ", ".join(f"{t.path}: {len(t.columns)}" for t in tables)
            raise ValueError(f"the files have different numbers of feature columns ({counts})")
        self._n_features = n_features.pop()

        parts = [self._samples(t) for t in tables]
        samples = np.concatenate([p[0] for p in parts]).astype(np.float32)
        flags = np.concatenate([p[1] for p in parts]).astype(np.int64)
        self._labelled = np.concatenate([p[2] for p in parts])
        self._source = np.concatenate(
            [np.full(len(p[0]), t.role) for t, p in zip(tables, parts, strict=True)]
        )
        hp = self.hparams
        fracs = self.split_kwargs()
        random_cut = (
            fracs["val_frac"] > 0 or (fracs["test_frac"] or 0) > 0 or "test" not in self.files
        )
        if hp.window is not None and hp.stride < hp.window and random_cut:
            log.warning(
                "windows overlap (stride=%d < window=%d) and part of the data is split at "
                "random: val/test windows share rows with training windows; give separate "
                "val_path and test_path or stride >= window for disjoint splits",
                hp.stride,
                hp.window,
            )
        return samples, flags

    def make_split(self, labels: np.ndarray) -> NoveltySplit:
        # labels are already anomaly flags (the protocol was applied per row)
        kwargs = self.split_kwargs() | {"protocol": "binary", "classes": [1]}
        files = ", ".join(str(p) for p in self.files.values())
        # checked here, not left to novelty_split, whose message would name the binary
        # flags it is given rather than the protocol of the config; unlabelled rows are normal
        hp = self.hparams
        normal = (self._source == "train") & ~(self._labelled & (labels == 1))
        if not normal.any():
            raise ValueError(
                f"{files}: no normal training samples under protocol {hp.protocol!r} with "
                f"classes {[1] if hp.classes is None else list(hp.classes)}"
            )
        try:
            return novelty_split(labels, **kwargs, source=self._source, labelled=self._labelled)
        except ValueError as err:
            raise ValueError(f"{files}: {err}") from None

    def describe_classes(self) -> str:
        hp = self.hparams
        if hp.path is not None:
            files = f"file={hp.path}"
        else:
            files = ", ".join(f"{role}={path}" for role, path in self.files.items())
        if hp.label_column is None:
            return f"{files}, unlabelled: every row normal"
        return f"{files}, label column {hp.label_column!r}, {super().describe_classes()}"


# -- helpers that name the file, the column and the problem ------------------------------


def _where(row: int, path: Path) -> str:
    """A row, counted from 0 over the data rows, and for a CSV its line in the file."""
    if path.suffix.lower() == ".csv":
        return f"row {row} (line {row + 2} of the file)"
    return f"row {row}"


def _check_exists(path: Path, role: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found ({role} file)")


def _read_csv(path: Path, nrows: int | None = None) -> pd.DataFrame:
    try:
        return pd.read_csv(path, nrows=nrows)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty (a CSV needs a header row)") from None
    except pd.errors.ParserError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ValueError(f"{path}: not a readable CSV file ({reason})") from None


def _open_npz(path: Path) -> Any:
    """The NPZ archive at ``path`` (without pickles), or a one-line error naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable NPZ file ({err})") from None


def _npz_array(npz: Any, path: Path, key: str) -> np.ndarray:
    if key not in npz.files:
        raise ValueError(f"{path}: key {key!r} not found; keys: {npz.files}")
    try:
        return npz[key]
    except ValueError:
        # object arrays need pickle, which a data file must not run
        raise ValueError(
            f"{path}: key {key!r} holds Python objects, not numbers; save it as a numeric "
            "array (np.savez with X.astype(float))"
        ) from None


def _clean_labels(column: pd.Series, path: Path, name: str) -> np.ndarray:
    """Labels as int64 when they are whole numbers, else as strings; no missing value."""
    missing = column.isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"{path}: label column {name!r}: {int(missing.sum())} missing labels, first in "
            f"{_where(row, path)}"
        )
    values = column.to_numpy()
    if np.issubdtype(values.dtype, np.number) or values.dtype == bool:
        as_int = values.astype(np.int64)
        if np.array_equal(as_int, values):
            return as_int
    return values.astype(str)


def _check_numeric(raw: pd.DataFrame, values: pd.DataFrame, path: Path, policy: str) -> None:
    """Error on the first cell that is text but not a number, unless a policy handles it."""
    if policy != "error":
        return
    text = values.isna() & raw.notna()
    if not text.to_numpy().any():
        return
    column = text.any(axis=0).idxmax()
    row = int(np.flatnonzero(text[column].to_numpy())[0])
    raise ValueError(
        f"{path}: column {column!r}: non-numeric value {raw[column].iloc[row]!r} in "
        f"{_where(row, path)}; list feature_columns without it or set nan_policy: drop or fill"
    )


def _raise_first_bad(features: np.ndarray, names: list[str], path: Path) -> None:
    bad = ~np.isfinite(features)
    col = int(np.flatnonzero(bad.any(axis=0))[0])
    row = int(np.flatnonzero(bad[:, col])[0])
    kind = "NaN (missing)" if np.isnan(features[row, col]) else "infinite"
    raise ValueError(
        f"{path}: column {names[col]!r}: {kind} value in {_where(row, path)} "
        f"({int(bad.sum())} bad values in all); set nan_policy: drop or fill"
    )
