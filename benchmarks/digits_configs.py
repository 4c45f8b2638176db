"""The README's main job for each digits config: ``rae fit`` then ``rae test``, timed.

Runs the two commands of the README exactly as a user types them (the ``rae`` console
script in a fresh process, the config as it is, torch's default threads unless
``--threads`` sets ``OMP_NUM_THREADS``), each config in a folder of its own under
``--work``, and reads the test metrics of the best checkpoint back from the test run's
TensorBoard logs. Writes ``digits_configs.csv`` (one row per config) and
``digits_configs.md`` (the table and the machine) to ``--out``.

    python benchmarks/digits_configs.py
    python benchmarks/digits_configs.py --configs digits_rae --threads 1
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from runs import append_row

from rae_lightning.sweep import logged_scalars

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("digits_ae", "digits_rae", "digits_vae", "digits_rvae")
METRICS = ("test/auroc", "test/auprc", "test/auroc_sap", "test/auroc_nap", "test/f1")

log = logging.getLogger("digits_configs")


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rae(*args: str, cwd: Path, env: dict) -> float:
    """Run the ``rae`` console script in ``cwd``; return its wall time in seconds."""
    script = shutil.which("rae") or str(Path(sys.executable).with_name("rae"))
    start = time.perf_counter()
    result = subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"rae {' '.join(args)} failed in {cwd}:\n{result.stderr[-3000:]}")
    return seconds


def run_config(name: str, work: Path, env: dict) -> dict:
    """``rae fit`` and ``rae test`` of one config in ``work/name``; the row of results."""
    folder = work / name
    folder.mkdir(parents=True)
    config = str(ROOT / "configs" / f"{name}.yaml")
    fit_s = rae("fit", "--config", config, cwd=folder, env=env)
    test_s = rae("test", "--config", config, cwd=folder, env=env)
    row = {"config": name, "fit_seconds": round(fit_s, 1), "test_seconds": round(test_s, 1)}
    for tag in METRICS:
        values = logged_scalars(folder, tag, version=1)
        row[tag.split("/")[1]] = round(float(values.iloc[-1]), 4) if len(values) else ""
    best = sorted((folder / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*"))
    row["best_checkpoint"] = best[-1].name if best else ""
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for rae")
    parser.add_argument("--work", type=Path, default=None, help="run folders; default: a temp")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    env = dict(os.environ)
    if opts.threads is not None:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    threads = env.get("OMP_NUM_THREADS", f"torch default ({torch.get_num_threads()})")
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores, threads: {threads}, torch {torch.__version__}"
    )
    log.info("%s", machine)
    opts.out.mkdir(parents=True, exist_ok=True)
    csv_path = opts.out / "digits_configs.csv"
    csv_path.unlink(missing_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = opts.work or Path(tmp)
        for name in opts.configs:
            row = run_config(name, work, env)
            log.info("%s", row)
            append_row(csv_path, row)
            rows.append(row)

    lines = [
        "| config | test AUROC | test AUPRC | AUROC sap | AUROC nap | F1 | `rae fit` wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["auroc"], r["auprc"], r["auroc_sap"], r["auroc_nap"], r["f1"]]
        cells = [f"{c:.3f}" if c != "" else "" for c in cells]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {r['fit_seconds']:.0f} s |")
    text = f"Machine: {machine}\n\n" + "\n".join(lines) + "\n"
    (opts.out / "digits_configs.md").write_text(text)
    log.info("\n%s", text)


if __name__ == "__main__":
    main()
