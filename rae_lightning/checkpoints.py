"""Finding, reading and checking checkpoints before Lightning loads them.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
plain containers only, so a file from an untrusted source cannot run code while it loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from rae_lightning.files import atomic_write

_AUROC_IN_NAME = re.compile(r"-auroc(\d+\.\d+)")
# hyperparameters that fix the shape and kind of the network
ARCHITECTURE_KEYS = ("input_dim", "hidden_dim", "latent_dim", "n_layers", "residual")


class CheckpointError(ValueError):
    """A checkpoint that is not readable, or that does not fit the model and data."""


def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def run_folders(root: str | Path) -> list[Path]:
    """The ``version_N`` folders under a logger root, newest (highest N) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(root.glob("version_*"), key=_version_number, reverse=True)


def find_best_checkpoint(root: str | Path) -> Path | None:
    """The best checkpoint of the newest run under a logger root such as ``lightning_logs``.

    Runs are the ``version_N`` folders; the newest that holds any checkpoint is the run.
    Within it, the file whose name carries the highest monitored AUROC wins; a single
    other checkpoint besides ``last.ckpt`` (one named ``auroc=nan`` because validation had
    no labels, or a custom ``checkpoint.filename``) is taken as it is. An older run is
    never taken in place of the newest.

    Raises:
        CheckpointError: the newest run has no best checkpoint, or several with no AUROC
            in their names, so which one is best cannot be told from the folder.
    """
    for version in run_folders(root):
        ckpts = sorted((version / "checkpoints").glob("*.ckpt"))
        if not ckpts:
            continue
        candidates = [c for c in ckpts if c.name != "last.ckpt"]
        scored = []
        for ckpt in candidates:
            match = _AUROC_IN_NAME.search(ckpt.name)
            if match:
                scored.append((float(match.group(1)), ckpt.stat().st_mtime, ckpt))
        if scored:
            return max(scored)[2]
        if len(candidates) == 1:
            return candidates[0]
        names = [c.name for c in ckpts]
        raise CheckpointError(
            f"the newest run {version} holds no checkpoint that can be told to be the best "
            f"({names}); pass --ckpt_path"
        )
    return None


def find_last_checkpoint(root: str | Path) -> Path | None:
    """``last.ckpt`` of the newest run under a logger root that has one."""
    for version in run_folders(root):
        last = version / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
    return None


def run_version(ckpt_path: str | Path, root: str | Path) -> int | None:
    """N when ``ckpt_path`` lies in ``root/version_N/checkpoints``, else None."""
    ckpt_path = Path(ckpt_path).resolve()
    folder = ckpt_path.parent
    if folder.name != "checkpoints" or folder.parent.parent != Path(root).resolve():
        return None
    number = _version_number(folder.parent)
    return number if number >= 0 else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``, or say why it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's messages run to several paragraphs; the first sentence says enough
        reason = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"ckpt_path {str(path)!r} is not a checkpoint that loads with weights_only=True "
            f"({type(err).__name__}: {reason})"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt_path {str(path)!r} is not a Lightning checkpoint")
    return ckpt


def _kind(class_path: str, residual: Any) -> str:
    name = class_path.rsplit(".", 1)[-1]
    return f"{name}(residual={residual})" if residual is not None else name


def check_kind(
    ckpt: dict[str, Any], path: str | Path, class_path: str, residual: bool | None
) -> None:
    """Raise a CheckpointError when the checkpoint holds another kind of model than the
    config names (another class, or residual where the config is plain, or the reverse)."""
    hparams = ckpt.get("hyper_parameters") or {}
    saved_path = hparams.get("_class_path")
    if not saved_path:
        return
    saved_residual = hparams.get("residual")
    same_class = saved_path.rsplit(".", 1)[-1] == class_path.rsplit(".", 1)[-1]
    same_residual = residual is None or saved_residual is None or saved_residual == residual
    if not (same_class and same_residual):
        raise CheckpointError(
            f"ckpt_path {str(path)!r} holds a {_kind(saved_path, saved_residual)}, "
            f"but the config names a {_kind(class_path, residual)}"
        )


def check_fits(ckpt: dict[str, Any], path: str | Path, model: nn.Module) -> None:
    """Raise a CheckpointError when a checkpoint's model kind or sizes differ from ``model``.

    ``model`` is the LightningModule built from the config and the data, so its
    ``input_dim`` is the one the data gives.
    """
    hparams = ckpt.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if class_path and class_path.rsplit(".", 1)[-1] != type(model).__name__:
        raise CheckpointError(
            f"ckpt_path {str(path)!r} holds a {class_path.rsplit('.', 1)[-1]}, "
            f"but the config builds a {type(model).__name__}"
        )
    own = getattr(model, "hparams", {})
    for key in ARCHITECTURE_KEYS:
        if key in hparams and key in own and hparams[key] != own[key]:
            raise CheckpointError(
                f"ckpt_path {str(path)!r} was trained with {key}={hparams[key]}, "
                f"but the config and data give {key}={own[key]}"
            )
    state = model.state_dict()
    for name, tensor in ckpt["state_dict"].items():
        if name in state and state[name].shape != tensor.shape:
            raise CheckpointError(
                f"ckpt_path {str(path)!r} has {name} of shape {tuple(tensor.shape)}, "
                f"but the model has {tuple(state[name].shape)}"
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each local checkpoint to a temporary file in the same folder, flushes it to
    disk and renames it over the target, so a process killed at any moment leaves either
    the previous file or the new one, never a truncated one.

    Lightning's own save writes the temporary file in the system's temp folder and moves it
    into place, which is a copy, not an atomic rename, when that folder lies on another
    file system than the logs. Remote paths (``s3://`` and the like) keep Lightning's save.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` (see the class docstring)."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)


def use_atomic_saves(trainer: Any) -> None:
    """Give the Trainer's strategy :class:`AtomicCheckpointIO` unless another CheckpointIO
    than Lightning's default was chosen (a plugin of the user's, or a distributed one)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
