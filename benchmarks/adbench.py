"""Test AUROC of the tabular AE and RAE on ADBench files, against two classic baselines.

Each run trains configs/tabular_rae.yaml on one NPZ file (keys X and y, 1 = anomaly),
with `residual` true (RAE) or false (AE) and one seed for both the model and the split
(the config's binary protocol: 60% of the normals train, 20% validate, the rest and half
of the anomalies each test and validate), and tests the weights of the last epoch, so no
checkpoint is chosen with the validation labels. On the same split and standardisation,
a PCA reconstruction error (as many components as the autoencoder's code) and an
IsolationForest (scikit-learn defaults) trained on the training normals give a baseline.

    python benchmarks/adbench.py --data-dir ../shared/data/adbench --max-epochs 100

Finished runs are appended to ``adbench.csv`` at once and skipped when the command is run
again; the summary goes to ``adbench.md`` and to the log. Runs use one CPU thread each.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path
from statistics import mean, stdev

from runs import fit_and_test_last, run_missing

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tabular_rae.yaml"
MODELS = {"AE": False, "RAE": True}
METRICS = {
    "recon": "test/auroc",
    "nap": "test/auroc_nap",
    "recon_auprc": "test/auprc",
}
BASELINES = ("pca", "iforest")

log = logging.getLogger("adbench")


def baselines(datamodule, latent_dim: int, seed: int) -> dict[str, float]:
    """AUROC of PCA reconstruction error and IsolationForest on the run's own split."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score

    train = datamodule.datasets["train"].x.numpy()
    test = datamodule.datasets["test"]
    x, y = test.x.numpy(), test.y.numpy()
    pca = PCA(n_components=min(latent_dim, train.shape[1]), random_state=seed).fit(train)
    recon_error = np.square(x - pca.inverse_transform(pca.transform(x))).mean(axis=1)
    forest = IsolationForest(random_state=seed).fit(train)
    return {
        "pca": round(float(roc_auc_score(y, recon_error)), 4),
        "iforest": round(float(roc_auc_score(y, -forest.score_samples(x))), 4),
    }


def run_one(path: Path, model: str, seed: int, max_epochs: int) -> dict:
    """Fit the tabular config on one file and split, test the last weights."""
    start = time.perf_counter()
    overrides = [
        f"--model.init_args.residual={str(MODELS[model]).lower()}",
        f"--data.init_args.path={path}",
        "--data.init_args.feature_columns=null",
        "--data.init_args.label_column=y",
        f"--data.init_args.seed={seed}",
    ]
    cli, metrics = fit_and_test_last(CONFIG, seed, max_epochs, overrides)
    seconds = time.perf_counter() - start
    row = {"dataset": path.stem, "model": model, "seed": seed, "epochs": max_epochs}
    row |= {name: round(float(metrics[key]), 4) for name, key in METRICS.items()}
    row |= baselines(cli.datamodule, cli.model.hparams.latent_dim, seed)
    row["seconds"] = round(seconds, 1)
    return row


def read_rows(path: Path) -> dict[tuple, dict]:
    """Finished runs in the CSV, keyed by (dataset, model, seed, epochs)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("seed", "epochs"):
            row[key] = int(row[key])
        for key in (*METRICS, *BASELINES, "seconds"):
            row[key] = float(row[key])
    return {(r["dataset"], r["model"], r["seed"], r["epochs"]): r for r in rows}


def summarise(rows: list[dict], datasets: list[str]) -> str:
    """One markdown row per dataset: mean ± standard deviation over seeds."""

    def cell(values: list[float]) -> str:
        spread = stdev(values) if len(values) > 1 else 0.0
        return f"{mean(values):.3f} ± {spread:.3f}"

    columns = [(m, s) for m in MODELS for s in METRICS] + [("AE", b) for b in BASELINES]
    names = [f"{m} {s}" for m, s in columns[: -len(BASELINES)]] + list(BASELINES)
    lines = ["| dataset | " + " | ".join(names) + " |", "|---|" + "---|" * len(columns)]
    for dataset in datasets:
        cells = [
            cell([float(r[s]) for r in rows if r["dataset"] == dataset and r["model"] == m])
            for m, s in columns
        ]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of ADBench .npz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    files = sorted(opts.data_dir.glob("*.npz"))
    if not files:
        sys.exit(f"adbench: no .npz file in --data-dir {opts.data_dir}")
    opts.out.mkdir(parents=True, exist_ok=True)
    csv_path = opts.out / "adbench.csv"
    done = read_rows(csv_path)
    jobs = [(f, m, s) for f in files for s in opts.seeds for m in MODELS]
    rows = run_missing(
        jobs,
        lambda job: (job[0].stem, job[1], job[2], opts.max_epochs),
        done,
        run_one,
        lambda row: (row["dataset"], row["model"], row["seed"], row["epochs"]),
        csv_path,
        opts.workers,
        opts.max_epochs,
    )
    table = summarise(rows, [f.stem for f in files])
    minutes = sum(float(r["seconds"]) for r in rows) / 60
    header = (
        f"{len(rows)} runs ({len(files)} files x {len(opts.seeds)} seeds x {len(MODELS)} "
        f"models), {opts.max_epochs} epochs each, last-epoch weights, {minutes:.0f} min of "
        f"single-thread run time in all; baselines on the same splits"
    )
    (opts.out / "adbench.md").write_text(header + "\n\n" + table + "\n")
    log.info("%s\n\n%s", header, table)


if __name__ == "__main__":
    main()
