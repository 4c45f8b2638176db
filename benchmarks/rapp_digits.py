"""AUROC of recon, SAP and NAP for the digits AE and RAE, over anomaly digits and seeds.

Each run trains one config (configs/digits_ae.yaml or configs/digits_rae.yaml) with one
anomaly digit (leave-one-out) and one seed (the model seed and the split seed), then
tests the weights of the last epoch, so no score type is favoured by checkpoint choice.
Every finished run is appended to ``rapp_digits.csv`` at once, and runs already there
(same model, digit, seed and epochs) are skipped, so an interrupted benchmark resumes.
The summary goes to ``rapp_digits.md`` and to the log.

    python benchmarks/rapp_digits.py --digits 0 1 2 3 4 --max-epochs 50 --workers 2

Runs use one CPU thread each; ``--workers`` runs that many at once.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path
from statistics import mean, stdev

from runs import fit_and_test_last, run_missing

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"AE": ROOT / "configs" / "digits_ae.yaml", "RAE": ROOT / "configs" / "digits_rae.yaml"}
SCORES = {"recon": "test/auroc", "sap": "test/auroc_sap", "nap": "test/auroc_nap"}

log = logging.getLogger("rapp_digits")


def run_one(model: str, digit: int, seed: int, max_epochs: int) -> dict:
    """Fit one config on one split and test the last weights; returns the AUROCs."""
    start = time.perf_counter()
    overrides = [f"--data.init_args.classes=[{digit}]", f"--data.init_args.seed={seed}"]
    _, metrics = fit_and_test_last(CONFIGS[model], seed, max_epochs, overrides)
    row = {"model": model, "digit": digit, "seed": seed, "epochs": max_epochs}
    row |= {score: round(float(metrics[key]), 4) for score, key in SCORES.items()}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def read_rows(path: Path) -> dict[tuple, dict]:
    """Finished runs in the CSV, keyed by (model, digit, seed, epochs)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("digit", "seed", "epochs"):
            row[key] = int(row[key])
        for key in (*SCORES, "seconds"):
            row[key] = float(row[key])
    return {(r["model"], r["digit"], r["seed"], r["epochs"]): r for r in rows}


def summarise(rows: list[dict], seeds: list[int], digits: list[int]) -> str:
    """Markdown tables: mean over digits and seeds (with the spread), and per digit."""
    lines = [
        "| model | " + " | ".join(f"AUROC {s}" for s in SCORES) + " |",
        "|---|" + "---|" * len(SCORES),
    ]
    for model in CONFIGS:
        cells = []
        for score in SCORES:
            values = [r[score] for r in rows if r["model"] == model]
            per_seed = [
                mean(r[score] for r in rows if r["model"] == model and r["seed"] == s)
                for s in seeds
            ]
            spread = stdev(per_seed) if len(per_seed) > 1 else 0.0
            cells.append(f"{mean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| anomaly digit | " + " | ".join(f"{m} {s}" for m in CONFIGS for s in SCORES) + " |",
        "|---|" + "---|" * (len(CONFIGS) * len(SCORES)),
    ]
    for digit in digits:
        cells = [
            f"{mean(r[s] for r in rows if r['model'] == m and r['digit'] == digit):.3f}"
            for m in CONFIGS
            for s in SCORES
        ]
        lines.append(f"| {digit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    opts.out.mkdir(parents=True, exist_ok=True)
    csv_path = opts.out / "rapp_digits.csv"
    done = read_rows(csv_path)
    jobs = [(m, d, s) for s in opts.seeds for d in opts.digits for m in CONFIGS]
    rows = run_missing(
        jobs,
        lambda job: (*job, opts.max_epochs),
        done,
        run_one,
        lambda row: (row["model"], row["digit"], row["seed"], row["epochs"]),
        csv_path,
        opts.workers,
        opts.max_epochs,
    )
    table = summarise(rows, opts.seeds, opts.digits)
    minutes = sum(float(r["seconds"]) for r in rows) / 60
    header = (
        f"{len(rows)} runs ({len(opts.digits)} anomaly digits x {len(opts.seeds)} seeds x "
        f"{len(CONFIGS)} models), {opts.max_epochs} epochs each, {minutes:.0f} min of "
        f"single-thread run time in all"
    )
    (opts.out / "rapp_digits.md").write_text(header + "\n\n" + table + "\n")
    log.info("%s\n\n%s", header, table)


if __name__ == "__main__":
    main()
