"""Test helpers: an independent gradient-norm recorder and TensorBoard event reading."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def total_grad_norm(module: L.LightningModule) -> float:
    """The 2-norm of all gradients, summed in float64 in plain Python."""
    total = 0.0
    for p in module.parameters():
        if p.grad is not None:
            total += float(p.grad.double().pow(2).sum())
    return math.sqrt(total)


class GradNormRecorder(L.Callback):
    """Records the gradient norm before clipping and after it, per optimisation step."""

    def __init__(self) -> None:
        self.pre_clip: dict[int, float] = {}
        self.post_clip: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # callbacks run before the module's hook, and both before the Trainer clips
        self.pre_clip[trainer.global_step] = total_grad_norm(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the optimizer has stepped; the gradients it used (clipped) are still in place
        self.post_clip[trainer.global_step - 1] = total_grad_norm(pl_module)


def read_scalars(log_dir: str | Path, tag: str) -> dict[int, float]:
    """Scalar values of one tag in a TensorBoard log folder, keyed by step."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {event.step: event.value for event in acc.Scalars(tag)}


class SignalAtStep(L.Callback):
    """Sends a signal to its own process after a given optimisation step (a fault in a test)."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonBatch(L.Callback):
    """Puts a NaN into the training batch of one optimisation step (bad data in a test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch[0][0, 0] = float("nan")


def quiet_trainer(tmp_path: str | Path, **kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary; kwargs override."""
    defaults = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    return L.Trainer(**(defaults | kwargs))
