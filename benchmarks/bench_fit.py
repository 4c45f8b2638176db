"""Training and scoring throughput of ``rae`` (Lightning) against a hand-written PyTorch loop.

One process, interleaved repeats (rae, hand, rae, hand, ...), the same in-memory data and
the same network: a residual autoencoder (RAE) with ``--n-layers`` Linear layers per side
of width ``--hidden-dim`` on ``--dim`` inputs.

fit, per batch size:

- ``rae``: :class:`~rae_lightning.AutoEncoder` and a :class:`~rae_lightning.NoveltyDataModule`
  subclass through ``lightning.Trainer`` as ``rae fit`` runs them: gradient clipping
  (``gradient_clip_val=1.0``), ``g_norm`` logged, a TensorBoard logger with the default
  ``log_every_n_steps``; with the progress bar (``rae-bar``, the default, redrawn every
  10 steps as ``rae`` sets it) and without (``rae-nobar``). Validation and checkpointing
  are off, as the hand loop has none: only training steps are timed.
- ``hand``: the same plain :class:`~rae_lightning.networks.AutoEncoderNet`, batches cut
  from a random permutation of the tensor, Adam, ``clip_grad_norm_`` each step, whose
  return value (the pre-clip norm, that is ``g_norm``) is kept on the device.
- with ``--compile``, ``hand-compiled`` and ``rae-compiled``: the same with the network
  wrapped in ``torch.compile`` (compiled in the untimed first batches).

Each arm trains one epoch from a freshly seeded model; the clock runs from batch
``--skip`` to the end of the epoch. GFLOP/s counts the multiply-adds of the Linear layers,
6 x (weights of every Linear) FLOPs per sample for forward and backward, against the rate
of a large float32 ``torch.mm`` measured in the same process with the same threads.

score: ``Trainer.predict`` of the same module with ``rae predict``'s CSV writer, scoring
by the reconstruction error (``rae-predict-recon``) and by NAP (``rae-predict-nap``),
against a plain batched forward of the network under ``torch.inference_mode`` that
computes the same score and decision and writes the same CSV with NumPy (``hand-recon``,
``hand-nap``).

Peak memory: each arm once more in a fresh subprocess, its peak resident set size
(``ru_maxrss``); on a GPU, ``torch.cuda.max_memory_allocated`` as well.

    python benchmarks/bench_fit.py                     # defaults of the README table
    python benchmarks/bench_fit.py --n 20000 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from rae_lightning import AutoEncoder, NoveltyDataModule
from rae_lightning.cli import PROGRESS_BAR_STEPS
from rae_lightning.networks import AutoEncoderNet
from rae_lightning.prediction import PredictionWriter
from rae_lightning.scoring import pathway_differences

log = logging.getLogger("bench_fit")
CLIP = 1.0
LR = 1e-3


class InMemoryDataModule(NoveltyDataModule):
    """A NoveltyDataModule over a tensor already in memory, every sample normal and for
    training; predict reads the same samples in order.

    The tensor is not an ``__init__`` argument: ``save_hyperparameters`` would keep it,
    and the logger would write all of it to ``hparams.yaml``.
    """

    features: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(protocol="binary", classes=[1], train_frac=1.0, val_frac=0.0, **kwargs)

    @classmethod
    def over(cls, features: Tensor, **kwargs: Any) -> InMemoryDataModule:
        dm = cls(**kwargs)
        dm.features = features
        dm.setup("fit")
        return dm

    @property
    def input_dim(self) -> int:
        return self.features.shape[1]

    def load(self) -> tuple[Tensor, np.ndarray]:
        return self.features, np.zeros(len(self.features), dtype=np.int64)

    def predict_dataloader(self):
        return self._loader("train")


class EpochClock(L.Callback):
    """Time from the start of batch ``skip`` to the end of the run (fit or predict).

    The clock stops in ``on_train_end`` / ``on_predict_end``, after every epoch-end hook:
    the module's last ``g_norm`` flush and the CSV that ``rae predict`` writes count, as
    the hand loop's final norm sync and CSV do. On a GPU it waits for the device first.
    """

    def __init__(self, skip: int, device: torch.device) -> None:
        self.skip = skip
        self.device = device
        self.start = self.stop = 0.0
        self.samples = 0

    def _batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.skip:
            sync(self.device)
            self.start = time.perf_counter()
        if batch_idx >= self.skip:
            self.samples += len(batch[0])

    def _stop(self) -> None:
        sync(self.device)
        self.stop = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start(batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch_start(batch, batch_idx)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._stop()

    @property
    def rate(self) -> float:
        return self.samples / (self.stop - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_kwargs(args: argparse.Namespace) -> dict:
    return {
        "input_dim": args.dim,
        "hidden_dim": args.hidden_dim,
        "latent_dim": args.latent_dim,
        "n_layers": args.n_layers,
        "residual": True,
    }


def linear_weights(net: nn.Module) -> int:
    """Multiply-adds of one sample through every Linear layer: the sum of in x out."""
    return sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a float32 ``size x size`` matrix product: the best of ``repeats``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def trainer(args: argparse.Namespace, root: str, progress_bar: bool, clock: EpochClock, **kw):
    return L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=1,
        gradient_clip_val=CLIP,
        logger=TensorBoardLogger(root, name="bench"),
        enable_progress_bar=progress_bar,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
        **kw,
    )


def fit_rae(
    args: argparse.Namespace, dm: InMemoryDataModule, progress_bar: bool, compiled: bool = False
) -> float:
    torch.manual_seed(1)
    model = AutoEncoder(**model_kwargs(args), lr=LR)
    if compiled:
        model.net = torch.compile(model.net)
    clock = EpochClock(args.skip, torch.device(args.device))
    with tempfile.TemporaryDirectory() as root:
        trainer(args, root, progress_bar, clock).fit(model, datamodule=dm)
    return clock.rate


def fit_hand(args: argparse.Namespace, x: Tensor, compiled: bool = False) -> float:
    device = torch.device(args.device)
    torch.manual_seed(1)
    net = AutoEncoderNet(**model_kwargs(args)).to(device)
    params = list(net.parameters())
    if compiled:
        net = torch.compile(net)
    optimizer = torch.optim.Adam(params, lr=LR)
    x = x.to(device)
    batch_size = args.batch_size
    order = torch.randperm(len(x), device=device)
    g_norms = []
    samples = 0
    for i in range(len(x) // batch_size):
        if i == args.skip:
            sync(device)
            start = time.perf_counter()
        xb = x[order[i * batch_size : (i + 1) * batch_size]]
        loss = (xb - net(xb)).pow(2).mean(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        g_norms.append(nn.utils.clip_grad_norm_(params, CLIP))
        optimizer.step()
        if i >= args.skip:
            samples += len(xb)
    torch.stack(g_norms).tolist()
    sync(device)
    return samples / (time.perf_counter() - start)


def trained_scorer(args: argparse.Namespace, dm: InMemoryDataModule, score: str) -> AutoEncoder:
    """A module scoring by ``score``, with NAP statistics and a threshold, as a checkpoint
    of ``rae fit`` has them."""
    torch.manual_seed(1)
    model = AutoEncoder(**model_kwargs(args), lr=LR, score=score).to(args.device)
    model.fit_nap_statistics(dm._loader("train"))
    model.threshold.fill_(1.0)
    return model.eval()


def score_rae(args: argparse.Namespace, model: AutoEncoder, dm: InMemoryDataModule) -> float:
    clock = EpochClock(args.skip, torch.device(args.device))
    with tempfile.TemporaryDirectory() as root:
        writer = PredictionWriter(Path(root) / "predictions.csv")
        t = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            logger=TensorBoardLogger(root, name="bench"),
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock, writer],
        )
        t.predict(model, datamodule=dm)
    return clock.rate


def score_hand(args: argparse.Namespace, model: AutoEncoder, x: Tensor, score: str) -> float:
    """A plain batched forward of the network under ``torch.inference_mode`` giving
    ``score`` (``recon``: the reconstruction error; ``nap``: RaPP's NAP along the encoder),
    the decision at the threshold, and the same CSV written with NumPy."""
    device = torch.device(args.device)
    net = model.net.eval()
    nap = model.nap
    batch_size = 4 * args.batch_size
    x = x.to(device)
    scores, decisions = [], []
    samples = 0
    with torch.inference_mode(), tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        for i, begin in enumerate(range(0, len(x), batch_size)):
            if i == args.skip:
                sync(device)
                start = time.perf_counter()
            xb = x[begin : begin + batch_size]
            if score == "recon":
                value = (xb - net(xb)).pow(2).mean(dim=1)
            else:
                feats_x = [xb, *net.encoder.features(xb)]
                x_hat = net.decoder(feats_x[-1])
                feats_hat = [x_hat, *net.encoder.features(x_hat)]
                value = nap.score(pathway_differences(feats_x, feats_hat))
            scores.append(value)
            decisions.append(value > model.threshold)
            if i >= args.skip:
                samples += len(xb)
        table_scores = torch.cat(scores).cpu().numpy()
        decision = torch.cat(decisions).cpu().numpy()
        index = np.arange(len(table_scores))
        table = np.column_stack([index, table_scores, decision, np.zeros_like(table_scores)])
        np.savetxt(Path(root) / "p.csv", table, fmt=["%d", "%.9g", "%d", "%d"], delimiter=",")
        sync(device)
        return samples / (time.perf_counter() - start)


def resident_mib(field: str) -> float | None:
    """``VmRSS`` or ``VmHWM`` (peak) of this process from /proc, in MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace) -> None:
    """Run one arm once in this (fresh) process and print its peak memory as JSON."""
    x = make_data(args)
    dm = InMemoryDataModule.over(x, batch_size=args.batch_size)
    base = resident_mib("VmRSS")
    try:
        # Linux: restart the peak (VmHWM) here, so building the data does not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        base = None
    arm = args.memory_child
    if arm == "rae":
        fit_rae(args, dm, progress_bar=False)
    elif arm == "hand":
        fit_hand(args, x)
    elif arm.startswith("rae-predict-"):
        score = arm.rsplit("-", 1)[1]
        score_rae(args, trained_scorer(args, dm, score), dm)
    else:
        score = arm.rsplit("-", 1)[1]
        score_hand(args, trained_scorer(args, dm, score), x, score)
    peak = resident_mib("VmHWM") if base is not None else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    sys.stdout.write(json.dumps({"maxrss_mib": peak, "data_mib": base or 0.0,
                                 "cuda_mib": cuda / 2**20}) + "\n")  # fmt: skip


def make_data(args: argparse.Namespace) -> Tensor:
    """Structured data: a low-rank signal in [0, 1] plus noise, like flattened images."""
    gen = torch.Generator().manual_seed(0)
    code = torch.randn(args.n, 16, generator=gen)
    mixing = torch.randn(16, args.dim, generator=gen) / 4
    noise = 0.05 * torch.randn(args.n, args.dim, generator=gen)
    return torch.sigmoid(code @ mixing + noise).contiguous()


def peak_memory(args: argparse.Namespace, arm: str, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", arm, "--batch-sizes", str(batch_size)]
    for key in ("n", "dim", "hidden_dim", "latent_dim", "n_layers", "skip", "threads",
                "accelerator"):  # fmt: skip
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000, help="samples (in memory)")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", type=int, default=5, help="untimed batches at the start")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: rae's")
    parser.add_argument("--accelerator", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-score", action="store_true", help="skip the scoring benchmark")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--no-bar-arm", action="store_true", help="skip rae-nobar")
    parser.add_argument(
        "--compile", action="store_true", help="also torch.compile the network in both loops"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = "cuda" if args.accelerator in ("cuda", "gpu") else "cpu"
    args.accelerator = "gpu" if args.device == "cuda" else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # the progress bar redraws as often as under `rae fit`
    os.environ.setdefault("TQDM_MINITERS", PROGRESS_BAR_STEPS)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for name in ("lightning", "lightning.pytorch", "rae_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.memory_child:
        args.batch_size = args.batch_sizes[0]
        memory_child(args)
        return

    device = torch.device(args.device)
    x = make_data(args)
    flops_per_sample = 6 * linear_weights(AutoEncoderNet(**model_kwargs(args)))
    peak = matmul_peak(device)
    log.info(
        "RAE %d-%d x %d layers/side, latent %d; %d x %d float32 in memory; %s, %d threads",
        args.dim, args.hidden_dim, args.n_layers, args.latent_dim, args.n, args.dim,
        args.device, torch.get_num_threads(),
    )  # fmt: skip
    log.info("float32 matmul peak (2048^3 torch.mm): %.1f GFLOP/s", peak)
    results: dict[str, Any] = {"peak_gflops": peak, "threads": torch.get_num_threads(),
                               "n": args.n, "fit": {}, "score": {}}  # fmt: skip

    for batch_size in args.batch_sizes:
        args.batch_size = batch_size
        dm = InMemoryDataModule.over(x, batch_size=batch_size)
        arms = {
            "rae-bar": lambda dm=dm: fit_rae(args, dm, progress_bar=True),
            "hand": lambda: fit_hand(args, x),
        }
        if not args.no_bar_arm:
            arms["rae-nobar"] = lambda dm=dm: fit_rae(args, dm, progress_bar=False)
        if args.compile:
            arms["hand-compiled"] = lambda: fit_hand(args, x, compiled=True)
            arms["rae-compiled"] = lambda dm=dm: fit_rae(args, dm, False, compiled=True)
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, arm in arms.items():
                with contextlib.redirect_stderr(open(os.devnull, "w")):
                    rates[name].append(arm())
        med = {name: statistics.median(values) for name, values in rates.items()}
        row = {"rates": rates, "median": med}
        log.info("fit, batch %d (samples/s; median of %d; GFLOP/s; %% of peak):",
                 batch_size, args.repeats)  # fmt: skip
        for name, rate in med.items():
            gflops = rate * flops_per_sample / 1e9
            log.info("  %-10s %9.0f  %6.1f  %5.1f%%   all: %s", name, rate, gflops,
                     100 * gflops / peak, " ".join(f"{r:.0f}" for r in rates[name]))  # fmt: skip
        for name in med:
            if name != "hand":
                # each rae epoch against the hand epoch next to it in time: load drifts
                ratios = [a / b for a, b in zip(rates[name], rates["hand"], strict=True)]
                row[f"ratio_{name}"] = statistics.median(ratios)
                log.info("  ratio %s / hand: %.3f median of repeats (%s); of medians %.3f",
                         name, statistics.median(ratios), " ".join(f"{r:.3f}" for r in ratios),
                         med[name] / med["hand"])  # fmt: skip
        results["fit"][batch_size] = row

    if not args.no_score:
        args.batch_size = args.batch_sizes[0]
        dm = InMemoryDataModule.over(x, batch_size=args.batch_size)
        models = {score: trained_scorer(args, dm, score) for score in ("recon", "nap")}
        arms = {}
        for score, model in models.items():
            arms[f"rae-predict-{score}"] = lambda m=model: score_rae(args, m, dm)
            arms[f"hand-{score}"] = lambda m=model, s=score: score_hand(args, m, x, s)
        rates = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, arm in arms.items():
                rates[name].append(arm())
        med = {name: statistics.median(values) for name, values in rates.items()}
        log.info("score, batch %d (samples/s; median of %d):", 4 * args.batch_size,
                 args.repeats)  # fmt: skip
        for name, rate in med.items():
            log.info("  %-16s %9.0f   all: %s", name, rate,
                     " ".join(f"{r:.0f}" for r in rates[name]))  # fmt: skip
        results["score"] = {"rates": rates, "median": med}
        for score in models:
            pairs = zip(rates[f"rae-predict-{score}"], rates[f"hand-{score}"], strict=True)
            ratios = [a / b for a, b in pairs]
            results["score"][f"ratio_{score}"] = statistics.median(ratios)
            log.info("  ratio rae-predict-%s / hand-%s: %.3f median of repeats (%s)",
                     score, score, statistics.median(ratios),
                     " ".join(f"{r:.3f}" for r in ratios))  # fmt: skip

    if not args.no_memory:
        for arm in ("rae", "hand", "rae-predict-recon", "hand-recon"):
            mem = peak_memory(args, arm, args.batch_sizes[0])
            results.setdefault("memory", {})[arm] = mem
            log.info("peak memory %-12s resident %.0f MiB (before the arm: %.0f MiB)%s",
                     arm, mem["maxrss_mib"], mem["data_mib"],
                     f", CUDA {mem['cuda_mib']:.0f} MiB" if mem["cuda_mib"] else "")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
