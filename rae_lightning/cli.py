"""The ``rae`` command: a LightningCLI with fit, validate, test and predict."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from rae_lightning.data.base import NoveltyDataModule
from rae_lightning.models import AnomalyDetector

log = logging.getLogger(__name__)

MONITOR = "val/auroc"
# "/" in a metric name would make a sub-folder, so the name is spelled out by hand
CHECKPOINT_FILENAME = "epoch{epoch:03d}-auroc{val/auroc:.4f}"
_AUROC_IN_NAME = re.compile(r"-auroc(\d+\.\d+)")


def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_best_checkpoint(root: str | Path) -> Path | None:
    """The best checkpoint of the newest run under a logger root such as ``lightning_logs``.

    Runs are the ``version_N`` folders; the newest with a best checkpoint (one whose file
    name carries the monitored AUROC) wins, and within it the highest AUROC.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    versions = sorted(root.glob("version_*"), key=_version_number, reverse=True)
    for version in versions:
        scored = []
        for ckpt in (version / "checkpoints").glob("*.ckpt"):
            match = _AUROC_IN_NAME.search(ckpt.name)
            if match:
                scored.append((float(match.group(1)), ckpt.stat().st_mtime, ckpt))
        if scored:
            return max(scored)[2]
    return None


class RAECLI(LightningCLI):
    """LightningCLI for rae-lightning's detectors and DataModules.

    Adds a ModelCheckpoint on ``val/auroc`` (mode max, plus ``last.ckpt``), links the
    DataModule's ``input_dim`` into the model, and lets ``test``, ``validate`` and
    ``predict`` find the newest run's best checkpoint when no ``--ckpt_path`` is given.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", AnomalyDetector)
        kwargs.setdefault("datamodule_class", NoveltyDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": CHECKPOINT_FILENAME,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments(
            "data.input_dim", "model.init_args.input_dim", apply_on="instantiate"
        )

    def _resolve_ckpt_path(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            rank_zero_info(f"Using checkpoint {config['ckpt_path']}")
            return
        logger = self.trainer.logger
        root = Path(logger.root_dir) if logger is not None else Path(self.trainer.default_root_dir)
        best = find_best_checkpoint(root)
        if best is None:
            raise FileNotFoundError(
                f"ckpt_path is not set and no best checkpoint was found under {root}; "
                "run `rae fit` first or pass --ckpt_path"
            )
        rank_zero_info(f"Using the best checkpoint of the newest run: {best}")
        config["ckpt_path"] = str(best)

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def before_predict(self) -> None:
        self._resolve_ckpt_path()


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``rae`` command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    RAECLI(args=args)
