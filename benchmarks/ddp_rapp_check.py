"""Check that NAP statistics, the threshold and `rae predict` agree between DDP and one process.

Fits a small digits RAE with DDP on 2 CPU processes (gloo), then, in one process:
recomputes the NAP statistics from the checkpoint's weights, re-validates to re-derive the
threshold, and predicts; compares all of them with what the DDP runs saved and wrote.

    python benchmarks/ddp_rapp_check.py --root /tmp/ddp_check
"""

from __future__ import annotations

import argparse
import csv
import logging
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("ddp_rapp_check")


def rae(subcommand: str, root: Path, *extra: str) -> None:
    args = [
        sys.executable,
        "-m",
        "rae_lightning",
        subcommand,
        "--config",
        str(ROOT / "configs" / "digits_rae.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=8",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.threshold=f1",
        *extra,
    ]
    subprocess.run(args, check=True)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("ddp_check"))
    root = parser.parse_args().root
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    single = ["--trainer.devices=1"]

    rae("fit", root, *ddp)
    ckpt = next((root / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt"))
    rae("predict", root, *ddp, f"--ckpt_path={ckpt}", f"--predictions.path={root}/ddp.csv")
    rae("predict", root, *single, f"--ckpt_path={ckpt}", f"--predictions.path={root}/one.csv")

    from rae_lightning import AutoEncoder, DigitsDataModule

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = AutoEncoder.load_from_checkpoint(ckpt, map_location="cpu")
    hparams = {k: v for k, v in state["datamodule_hyper_parameters"].items() if k[0] != "_"}
    data = DigitsDataModule(**hparams)
    data.setup("fit")
    x_test = data.datasets["test"].x
    with torch.no_grad():
        nap_ddp = model.eval().score_batch(x_test)[0]["nap"]
    model.fit_nap_statistics([(data.datasets["train"].x,)])
    with torch.no_grad():
        nap_one = model.eval().score_batch(x_test)[0]["nap"]
    rel = ((nap_ddp - nap_one).abs() / nap_one.abs().clamp_min(1e-12)).max().item()
    log.info("NAP test scores, DDP statistics vs one process: largest relative difference %.2e",
             rel)  # fmt: skip
    worst = max(
        (model.state_dict()[k].double() - v.double()).abs().max().item()
        for k, v in state["state_dict"].items()
        if k.startswith("nap.")
    )
    log.info("NAP statistics, DDP checkpoint vs one process: largest difference %.2e", worst)

    with torch.no_grad():
        model.eval()
        val = data.datasets["val"]
        model.choose_threshold(model(val.x), val.y)
    saved = state["state_dict"]["threshold"].item()
    log.info("threshold: DDP %.6g, one process %.6g", saved, model.threshold.item())

    ddp_rows, one_rows = read_csv(root / "ddp.csv"), read_csv(root / "one.csv")
    indices = [int(r["index"]) for r in ddp_rows]
    same = all(
        a["index"] == b["index"]
        and a["decision"] == b["decision"]
        and a["label"] == b["label"]
        and abs(float(a["score"]) - float(b["score"])) <= 1e-5 * (1 + abs(float(b["score"])))
        for a, b in zip(ddp_rows, one_rows, strict=True)
    )
    log.info(
        "predict: %d rows under DDP, %d in one process, indices in order and once each: %s, "
        "rows agree: %s",
        len(ddp_rows), len(one_rows), indices == list(range(len(one_rows))), same,
    )  # fmt: skip


if __name__ == "__main__":
    main()
