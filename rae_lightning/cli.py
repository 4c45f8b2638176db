"""The ``rae`` command: a LightningCLI with fit, validate, test and predict."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rae_lightning.checkpoints import (
    ARCHITECTURE_KEYS,
    CheckpointError,
    check_fits,
    check_kind,
    find_best_checkpoint,
    find_last_checkpoint,
    read_checkpoint,
    run_version,
    use_atomic_saves,
)
from rae_lightning.data.base import NoveltyDataModule
from rae_lightning.models import AnomalyDetector, NonFiniteError
from rae_lightning.prediction import PredictionWriter

log = logging.getLogger(__name__)

MONITOR = "val/auroc"
# "/" in a metric name would make a sub-folder, so the name is spelled out by hand
CHECKPOINT_FILENAME = "epoch{epoch:03d}-auroc{val/auroc:.4f}"
# lines of jsonargparse's nested messages that say nothing about the user's mistake
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def one_line(message: str) -> str:
    """Fold a (possibly nested, multi-line) error message into one line."""
    parts = []
    for line in str(message).splitlines():
        line = line.strip()
        if not line or line.startswith(_NOISE):
            continue
        parts.append(line.lstrip("- ").rstrip(":"))
    return ": ".join(parts) if parts else type(message).__name__


class RAECLI(LightningCLI):
    """LightningCLI for rae-lightning's detectors and DataModules.

    Adds a ModelCheckpoint on ``val/auroc`` (mode max) and one that keeps ``last.ckpt``
    after every validation, links the
    DataModule's ``input_dim`` into the model, and lets ``test``, ``validate`` and
    ``predict`` find the newest run's best checkpoint when no ``--ckpt_path`` is given.
    ``predict`` writes a CSV of per-sample scores and decisions (``--predictions.path``;
    see :class:`~rae_lightning.prediction.PredictionWriter`).
    Every checkpoint is read with ``weights_only=True`` and checked against the model the
    config and data build before Lightning loads it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", AnomalyDetector)
        kwargs.setdefault("datamodule_class", NoveltyDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # `rae predict` writes its CSV here: --predictions.path (default: the log folder)
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults(
            {
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": CHECKPOINT_FILENAME,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # Lightning's save_last only follows the saves of the best checkpoint; a resume
        # needs the newest state, so a second callback writes last.ckpt after every
        # validation (atomically, see AtomicCheckpointIO: a kill leaves the previous file whole)
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments(
            "data.input_dim", "model.init_args.input_dim", apply_on="instantiate"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Lightning replaces the model config by the checkpoint's hyperparameters right
        # after parsing; first make sure the file is a checkpoint of the model kind asked for
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        ckpt = read_checkpoint(ckpt_path)
        model = config.get("model")
        if model is not None and model.get("class_path"):
            init_args = model.get("init_args") or {}
            check_kind(ckpt, ckpt_path, model.class_path, init_args.get("residual"))
            saved = ckpt.get("hyper_parameters") or {}
            replaced = [
                f"{key}={saved[key]} (the config says {init_args[key]})"
                for key in ARCHITECTURE_KEYS
                if key in saved and init_args.get(key) is not None and saved[key] != init_args[key]
            ]
            if replaced:
                rank_zero_warn(
                    f"the network is built as ckpt_path {ckpt_path!r} was trained: "
                    + ", ".join(replaced)
                )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer of the config, saving checkpoints atomically in their own folder."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_saves(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        clip = config.trainer.get("gradient_clip_val")
        if clip is not None and clip < 0:
            raise ValueError(f"trainer.gradient_clip_val must be at least 0, got {clip}")

    def _logger_root(self) -> Path:
        logger = self.trainer.logger
        if logger is not None and getattr(logger, "root_dir", None):
            return Path(logger.root_dir)
        return Path(self.trainer.default_root_dir)

    def _check_checkpoint(self, path: str | Path) -> None:
        ckpt = read_checkpoint(path)
        check_fits(ckpt, path, self.model)

    def _check_data(self) -> None:
        """Prepare, load and split the data before the Trainer starts, so that bad data
        ends the command before the logger creates a run folder (the Trainer creates it
        before it calls ``setup``). ``setup`` keeps what it loaded, so the Trainer's own
        call costs nothing. Processes that DDP starts later (``LOCAL_RANK`` > 0) only load:
        the first has prepared (downloaded) the data before it launched them."""
        datamodule = self.datamodule
        if datamodule is None:
            return
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            datamodule.prepare_data()
        datamodule.setup(self.subcommand)

    def _resolve_ckpt_path(self) -> None:
        """Find, read and check the checkpoint that validate, test or predict evaluate."""
        # Each of these commands logs to a run folder of its own, so Lightning warns that the
        # checkpoint's ModelCheckpoint state points elsewhere; that state only matters to fit
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        self._check_data()
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True
        if config.get("ckpt_path"):
            self._check_checkpoint(config["ckpt_path"])
            rank_zero_info(f"Using checkpoint {config['ckpt_path']}")
            return
        root = self._logger_root()
        best = find_best_checkpoint(root)
        if best is None:
            raise FileNotFoundError(
                f"ckpt_path is not set and no best checkpoint was found under {root}; "
                "run `rae fit` first or pass --ckpt_path"
            )
        self._check_checkpoint(best)
        rank_zero_info(f"Using the best checkpoint of the newest run: {best}")
        config["ckpt_path"] = str(best)

    def before_fit(self) -> None:
        """Resume: ``--ckpt_path last`` means the newest run's ``last.ckpt``; a resumed run
        goes on logging and checkpointing in the run folder it came from."""
        self._check_data()
        config = self.config_init["fit"]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        if config.get("weights_only") is None:
            config["weights_only"] = True
        root = self._logger_root()
        if ckpt_path == "last":
            last = find_last_checkpoint(root)
            if last is None:
                raise FileNotFoundError(
                    f"ckpt_path is 'last' but no last.ckpt was found under {root}"
                )
            ckpt_path = config["ckpt_path"] = str(last)
        self._check_checkpoint(ckpt_path)
        version = run_version(ckpt_path, root)
        logger = self.trainer.logger
        if version is not None and isinstance(logger, TensorBoardLogger):
            self.trainer.logger = TensorBoardLogger(
                save_dir=logger.save_dir, name=logger.name, version=version
            )
        rank_zero_info(f"Resuming from {ckpt_path}")

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def before_predict(self) -> None:
        self._resolve_ckpt_path()


# raise instead of exiting, so that main() can say it in one line; and no abbreviated
# options, so that a mistyped key (--trainer.max_epoch) is an error, not a guess
_STRICT = {"exit_on_error": False, "allow_abbrev": False}
PARSER_KWARGS = {**_STRICT, **{name: _STRICT for name in ("fit", "validate", "test", "predict")}}
# errors that carry a message for the user; anything else keeps its traceback
USER_ERRORS = (ArgumentError, ValueError, FileNotFoundError, CheckpointError)
# The progress bar redraws every this many steps unless TQDM_MINITERS says otherwise:
# Lightning's default redraw at every step costs about 1 ms, 10% of a batch-64 MLP step
PROGRESS_BAR_STEPS = "10"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``rae`` command.

    Bad input ends with one line on stderr naming the problem and exit status 2; set
    ``RAE_TRACEBACK=1`` to see the full traceback instead.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_MINITERS", PROGRESS_BAR_STEPS)
    try:
        RAECLI(args=args, parser_kwargs=PARSER_KWARGS)
    except SIGTERMException:
        # Lightning stops at the next step on SIGTERM; a scheduler must see a failure
        sys.stderr.write(
            "rae: stopped by SIGTERM; checkpoints are intact, resume with "
            "`rae fit --config ... --ckpt_path last`\n"
        )
        raise SystemExit(128 + 15) from None
    except NonFiniteError as err:
        sys.stderr.write(f"rae: error: {err}\n")
        raise SystemExit(1) from None
    except USER_ERRORS as err:
        if os.environ.get("RAE_TRACEBACK"):
            raise
        sys.stderr.write(f"rae: error: {one_line(str(err))}\n")
        raise SystemExit(2) from None
