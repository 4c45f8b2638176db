"""The ``rae-sweep`` command: depth sweeps of AE against RAE, and a clipping comparison.

Every run of a sweep is a normal ``rae fit`` followed by ``rae test`` on the best
checkpoint, run in this process through :class:`~rae_lightning.cli.RAECLI`, with its own
TensorBoard logs under ``OUT/runs/NAME/lightning_logs``. A finished run leaves
``result.json`` in its folder and is skipped when the sweep is started again.

The sweep writes one results table (``results.csv``), a summary per model and depth
(``summary.md``) and the plots (``depth_train_loss.png``, ``depth_auroc.png``). With
``--clipping`` it trains a deep residual model with gradient clipping off and on instead,
and writes ``clipping.csv``, the per-step traces ``clipping_g_norm.csv`` and the plot
``clipping_g_norm.png``.

Example::

    rae-sweep --config configs/digits_ae.yaml --models ae rae --n-layers 2 4 8 16 \\
        --seeds 0 1 2 --out sweeps/digits -- --trainer.max_epochs=50
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from rae_lightning.cli import MONITOR, PARSER_KWARGS, RAECLI
from rae_lightning.data.base import keep_batch
from rae_lightning.models import AnomalyDetector

log = logging.getLogger(__name__)

# model name -> (LightningModule class path, residual)
MODELS: dict[str, tuple[str, bool]] = {
    "ae": ("rae_lightning.AutoEncoder", False),
    "rae": ("rae_lightning.AutoEncoder", True),
    "vae": ("rae_lightning.VariationalAutoEncoder", False),
    "rvae": ("rae_lightning.VariationalAutoEncoder", True),
}
DEFAULT_CONFIG = "configs/digits_ae.yaml"
DEFAULT_N_LAYERS = (2, 4, 8, 12, 16, 24)
RESULT_FILE = "result.json"
COLUMNS = [
    "model",
    "n_layers",
    "seed",
    "gradient_clip_val",
    "train_loss",
    "train_loss_best",
    "val_auroc",
    "test_auroc",
    "test_auprc",
    "best_epoch",
    "steps",
    "g_norm_max",
    "g_norm_median",
    "g_norm_final",
    "wall_s",
    "run",
]
_EPOCH_IN_NAME = re.compile(r"epoch(\d+)")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a model, a depth, a seed and whether gradients are clipped.

    Args:
        model: a key of :data:`MODELS`.
        n_layers: Linear layers in the encoder (the decoder mirrors it).
        seed: ``seed_everything`` of the run (initialisation and batch order; the data
            split keeps the config's own seed).
        clip: None keeps the config's clipping; a number sets ``gradient_clip_val``;
            0 switches clipping off.
    """

    model: str
    n_layers: int
    seed: int
    clip: float | None = None

    @property
    def name(self) -> str:
        name = f"{self.model}_L{self.n_layers:02d}_s{self.seed}"
        if self.clip is None:
            return name
        return f"{name}_noclip" if self.clip == 0 else f"{name}_clip{self.clip:g}"

    def cli_args(self, config: str | Path, overrides: Sequence[str]) -> list[str]:
        """Arguments for ``rae fit``/``rae test`` (without the subcommand and root dir)."""
        class_path, residual = MODELS[self.model]
        args = [
            "--config",
            str(config),
            f"--model.class_path={class_path}",
            f"--model.init_args.residual={str(residual).lower()}",
            f"--model.init_args.n_layers={self.n_layers}",
            f"--seed_everything={self.seed}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
        if self.clip is not None:
            value = "null" if self.clip == 0 else f"{self.clip:g}"
            args.append(f"--trainer.gradient_clip_val={value}")
        # the user's overrides come last so that they win
        return args + list(overrides)


def train_set_loss(model: AnomalyDetector, dataset: Any, batch_size: int = 512) -> float:
    """Mean per-sample training loss over a whole dataset, in eval mode, without gradients.

    Eval mode matters: BatchNorm uses its running statistics and the VAE decodes the
    posterior mean, so the number is the loss of the trained network itself, not the
    running average of the noisy training steps.
    """
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=keep_batch)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for x, _ in loader:
            loss = model.terms(x.to(device))["loss"]
            total += loss.double().sum()
            count += len(loss)
    model.train(was_training)
    return float(total) / count


def g_norm_stats(history: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Max, median and last of the per-step gradient norms (NaN when there are none)."""
    values = [value for _, value in history]
    if not values:
        return {"g_norm_max": math.nan, "g_norm_median": math.nan, "g_norm_final": math.nan}
    return {
        "g_norm_max": max(values),
        "g_norm_median": statistics.median(values),
        "g_norm_final": values[-1],
    }


def _metric(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return math.nan if value is None else float(value)


def execute_run(spec: RunSpec, run_dir: Path, config: str | Path, overrides: Sequence[str]):
    """Train and test one run in ``run_dir``; return its result row and g_norm trace.

    ``rae fit`` trains; ``rae test`` evaluates the best checkpoint (``val/auroc``). The
    training loss is measured twice in eval mode over the whole training set: with the
    final weights (``train_loss``) and with the best checkpoint (``train_loss_best``).
    """
    args = spec.cli_args(config, overrides)
    root = [f"--trainer.default_root_dir={run_dir}"]
    start = time.perf_counter()

    fit = RAECLI(args=["fit", *args, *root], parser_kwargs=PARSER_KWARGS)
    checkpoint = next(cb for cb in fit.trainer.checkpoint_callbacks if cb.monitor == MONITOR)
    best = checkpoint.best_model_path
    if not best:
        raise RuntimeError(f"run {spec.name} saved no best checkpoint in {run_dir}")
    train_loss = train_set_loss(fit.model, fit.datamodule.datasets["train"])
    history = list(fit.model.g_norm_history)

    test_args = ["test", *args, *root, f"--ckpt_path={best}"]
    test = RAECLI(args=test_args, parser_kwargs=PARSER_KWARGS)
    metrics = test.trainer.callback_metrics
    train_loss_best = train_set_loss(test.model, test.datamodule.datasets["train"])

    epoch = _EPOCH_IN_NAME.search(Path(best).name)
    row = {
        "model": spec.model,
        "n_layers": spec.n_layers,
        "seed": spec.seed,
        "gradient_clip_val": fit.trainer.gradient_clip_val,
        "train_loss": train_loss,
        "train_loss_best": train_loss_best,
        "val_auroc": float(checkpoint.best_model_score),
        "test_auroc": _metric(metrics, "test/auroc"),
        "test_auprc": _metric(metrics, "test/auprc"),
        "best_epoch": int(epoch.group(1)) if epoch else -1,
        "steps": fit.trainer.global_step,
        **g_norm_stats(history),
        "wall_s": time.perf_counter() - start,
        "run": spec.name,
    }
    return row, history


def run_or_load(
    spec: RunSpec, runs_dir: Path, config: str | Path, overrides: Sequence[str]
) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """The result of one run: read from ``result.json`` if it finished before, else run it.

    A folder without ``result.json`` is an interrupted run and is started afresh. A
    finished run made with other arguments is an error, not a silent reuse.
    """
    run_dir = runs_dir / spec.name
    result_file = run_dir / RESULT_FILE
    args = spec.cli_args(config, overrides)
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved["args"] != args:
            raise ValueError(
                f"{run_dir} holds a run made with args {saved['args']}, but this sweep asks "
                f"for {args}; use another --out or delete that folder"
            )
        log.info("skip %s: finished before (%s)", spec.name, result_file)
        return saved["row"], [tuple(item) for item in saved["g_norm"]]
    if run_dir.exists():
        log.info("restart %s: %s has no %s", spec.name, run_dir, RESULT_FILE)
        shutil.rmtree(run_dir)
    log.info("run %s", spec.name)
    row, history = execute_run(spec, run_dir, config, overrides)
    payload = {"args": args, "row": row, "g_norm": history}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    # the result file appears complete or not at all, so an interrupted write is a rerun
    tmp.replace(result_file)
    log.info(
        "done %s: train_loss=%.5f test_auroc=%.4f g_norm_max=%.3g in %.0fs",
        spec.name,
        row["train_loss"],
        row["test_auroc"],
        row["g_norm_max"],
        row["wall_s"],
    )
    return row, history


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per model and depth."""
    metrics = ["train_loss", "val_auroc", "test_auroc", "g_norm_max"]
    grouped = results.groupby(["model", "n_layers"])[metrics]
    summary = grouped.agg(["mean", "std"])
    summary.columns = [f"{name}_{stat}" for name, stat in summary.columns]
    summary["seeds"] = results.groupby(["model", "n_layers"])["seed"].nunique()
    return summary.reset_index()


# plain model and its residual twin: their training-loss ratio is the degradation
PAIRS = (("ae", "rae"), ("vae", "rvae"))


def summary_markdown(results: pd.DataFrame) -> str:
    """A Markdown table with one line per depth: for each model the train loss and test
    AUROC (mean ± standard deviation over seeds) and the largest pre-clip ``g_norm`` of any
    seed; for a plain model beside its residual twin, their train-loss ratio of the means
    and of the medians (the median is robust to one diverged seed)."""
    grouped = results.groupby(["model", "n_layers"])
    mean, std = grouped.mean(numeric_only=True), grouped.std(numeric_only=True)
    median, largest = grouped.median(numeric_only=True), grouped.max(numeric_only=True)
    present = set(results["model"])
    models = [m for m in MODELS if m in present]
    pairs = [(a, b) for a, b in PAIRS if a in present and b in present]
    header = ["n_layers"] + [f"{m.upper()} train loss" for m in models]
    for a, b in pairs:
        header += [f"{a.upper()} / {b.upper()} (mean)", f"{a.upper()} / {b.upper()} (median)"]
    header += [f"{m.upper()} test AUROC" for m in models]
    header += [f"{m.upper()} largest g_norm" for m in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in sorted(results["n_layers"].unique()):
        has = {m: (m, n) in mean.index for m in models}
        cells = [str(n)]
        for m in models:
            loss = (mean.train_loss.get((m, n)), std.train_loss.get((m, n)))
            cells.append(f"{loss[0]:.4f} ± {loss[1]:.4f}" if has[m] else "")
        for a, b in pairs:
            for stat in (mean, median):
                both = has[a] and has[b]
                cells.append(
                    f"{stat.train_loss[a, n] / stat.train_loss[b, n]:.1f}" if both else ""
                )
        for m in models:
            auroc = (mean.test_auroc.get((m, n)), std.test_auroc.get((m, n)))
            cells.append(f"{auroc[0]:.3f} ± {auroc[1]:.3f}" if has[m] else "")
        cells += [f"{largest.g_norm_max[m, n]:.3g}" if has[m] else "" for m in models]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_depth(results: pd.DataFrame, metric: str, ax: Any, log_y: bool = False) -> None:
    """One line per model: the mean of ``metric`` over seeds against ``n_layers``.

    The band spans the lowest to the highest seed and the dots are the single seeds.
    """
    for model in [m for m in MODELS if m in set(results["model"])]:
        rows = results[results["model"] == model]
        stats = rows.groupby("n_layers")[metric].agg(["mean", "min", "max"]).sort_index()
        (line,) = ax.plot(stats.index, stats["mean"], marker="o", label=model.upper())
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=line.get_color())
        ax.scatter(rows["n_layers"], rows[metric], s=10, alpha=0.6, color=line.get_color())
    ax.set_xlabel("n_layers (encoder; the decoder mirrors it)")
    ax.set_ylabel(metric)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()


def logged_scalars(run_dir: str | Path, tag: str, version: int = 0) -> pd.Series:
    """A scalar logged under ``run_dir/lightning_logs/version_<version>`` (in a sweep run,
    version 0 is ``rae fit`` and version 1 ``rae test``), indexed by step; empty when the
    run has no such logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(run_dir) / "lightning_logs" / f"version_{version}"
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags().get("scalars", []):
        return pd.Series(dtype=float, name=tag)
    events = accumulator.Scalars(tag)
    return pd.Series([e.value for e in events], index=[e.step for e in events], name=tag)


def curves_figure(results: pd.DataFrame, runs_dir: str | Path, tag: str = "train/loss") -> Any:
    """One panel per model: ``tag`` against the training step at each depth, read from the
    TensorBoard logs of the lowest seed's runs (``runs_dir/<run>``)."""
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if m in set(results["model"])]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), sharey=True,
                             squeeze=False)  # fmt: skip
    seed = results["seed"].min()
    for ax, model in zip(axes[0], models, strict=True):
        rows = results[(results["model"] == model) & (results["seed"] == seed)]
        for row in rows.sort_values("n_layers").itertuples():
            curve = logged_scalars(Path(runs_dir) / row.run, tag)
            if not curve.empty:
                ax.plot(curve.index, curve.values, label=f"n_layers={row.n_layers}", lw=1)
        ax.set_title(f"{model.upper()}, seed {seed}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel(tag)
    fig.tight_layout()
    return fig


def depth_figures(results: pd.DataFrame) -> dict[str, Any]:
    """The two figures of a depth sweep: training loss, and val and test AUROC."""
    import matplotlib.pyplot as plt

    loss_fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    plot_depth(results, "train_loss", ax, log_y=True)
    ax.set_title("Training loss (eval mode, final weights) against depth")

    auroc_fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, layout="constrained")
    for ax, metric in zip(axes, ["val_auroc", "test_auroc"], strict=True):
        plot_depth(results, metric, ax)
        ax.set_title(f"{metric} (best checkpoint) against depth")
    return {"depth_train_loss": loss_fig, "depth_auroc": auroc_fig}


def clipping_figure(traces: pd.DataFrame) -> Any:
    """g_norm per step with clipping off (left) and on (right), one line per seed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, layout="constrained")
    for ax, clipped in zip(axes, [False, True], strict=True):
        part = traces[traces["clipped"] == clipped]
        for seed, rows in part.groupby("seed"):
            ax.plot(rows["step"], rows["g_norm"], lw=0.7, label=f"seed {seed}")
        peak = part["g_norm"].max() if not part.empty else math.nan
        state = "on" if clipped else "off"
        ax.set_title(f"clipping {state}: largest g_norm {peak:.3g}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("g_norm (before clipping)")
    return fig


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)


def depth_sweep(
    config: str | Path,
    models: Sequence[str],
    n_layers: Sequence[int],
    seeds: Sequence[int],
    out: Path,
    report_dir: Path,
    overrides: Sequence[str] = (),
) -> pd.DataFrame:
    """Run (or resume) models x n_layers x seeds and write the table, summary and plots."""
    rows = []
    # seeds outermost: a sweep stopped early still holds every model at every depth
    for seed in seeds:
        for depth in n_layers:
            for model in models:
                row, _ = run_or_load(RunSpec(model, depth, seed), out / "runs", config, overrides)
                rows.append(row)
                # the table grows as runs finish, so a long sweep can be watched
                pd.DataFrame(rows, columns=COLUMNS).to_csv(report_dir / "results.csv", index=False)
    results = pd.DataFrame(rows, columns=COLUMNS)
    (report_dir / "summary.md").write_text(summary_markdown(results))
    for name, fig in depth_figures(results).items():
        _save(fig, report_dir / f"{name}.png")
    return results


def clipping_comparison(
    config: str | Path,
    model: str,
    n_layers: int,
    seeds: Sequence[int],
    clip_val: float,
    out: Path,
    report_dir: Path,
    overrides: Sequence[str] = (),
) -> pd.DataFrame:
    """Train ``model`` at ``n_layers`` with clipping off and at ``clip_val``; plot g_norm."""
    rows = []
    traces = []
    for clip in (0.0, clip_val):
        for seed in seeds:
            spec = RunSpec(model, n_layers, seed, clip)
            row, history = run_or_load(spec, out / "clipping", config, overrides)
            rows.append(row)
            for step, value in history:
                traces.append({"seed": seed, "clipped": clip > 0, "step": step, "g_norm": value})
    results = pd.DataFrame(rows, columns=COLUMNS)
    trace_table = pd.DataFrame(traces, columns=["seed", "clipped", "step", "g_norm"])
    results.to_csv(report_dir / "clipping.csv", index=False)
    # six significant digits keep the traces file small and lose nothing a plot shows
    trace_table.to_csv(report_dir / "clipping_g_norm.csv", index=False, float_format="%.6g")
    _save(clipping_figure(trace_table), report_dir / "clipping_g_norm.png")
    for clipped, part in results.groupby(results["gradient_clip_val"].notna()):
        log.info(
            "clipping %s: largest g_norm %.4g over %d seeds",
            "on" if clipped else "off",
            part["g_norm_max"].max(),
            len(part),
        )
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rae-sweep",
        description=(
            "Depth sweep of autoencoders (each run is `rae fit` + `rae test`), resumable. "
            "Arguments after `--` go to every run, e.g. -- --trainer.max_epochs=30."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config of every run")
    parser.add_argument(
        "--models", nargs="+", default=["ae", "rae"], choices=sorted(MODELS), help="models"
    )
    parser.add_argument(
        "--n-layers", nargs="+", type=int, default=list(DEFAULT_N_LAYERS), help="depths"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    parser.add_argument("--out", type=Path, default=Path("sweeps/digits"), help="run folder")
    parser.add_argument(
        "--report-dir", type=Path, default=None, help="tables and plots; default: --out"
    )
    parser.add_argument(
        "--clipping",
        action="store_true",
        help="instead of the depth sweep, train --clip-model at the deepest --n-layers "
        "with clipping off and at --clip-val, and plot the g_norm traces",
    )
    parser.add_argument("--clip-model", default="rae", choices=sorted(MODELS))
    parser.add_argument("--clip-val", type=float, default=1.0, help="gradient_clip_val when on")
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads; default: torch's"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``rae-sweep`` command."""
    run_sweep(argv)


def run_sweep(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Parse the ``rae-sweep`` arguments, run the sweep, and return its results table."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    overrides = [arg for arg in overrides if arg != "--"]
    for arg in overrides:
        if arg.startswith("--") and arg.split("=")[0] in {"--ckpt_path", "--config"}:
            parser.error(f"{arg} cannot be an override: the sweep sets it per run")
    if args.clip_val <= 0:
        parser.error(f"--clip-val must be positive, got {args.clip_val}")
    if min(args.n_layers) < 1:
        parser.error(f"--n-layers must be at least 1, got {args.n_layers}")
    if not Path(args.config).is_file():
        parser.error(f"--config must be an existing file, got {args.config}")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    # LightningCLI warns when it gets args while sys.argv holds this command's own arguments
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")

    report_dir = args.report_dir or args.out
    report_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.clipping:
        return clipping_comparison(
            args.config,
            args.clip_model,
            max(args.n_layers),
            args.seeds,
            args.clip_val,
            args.out,
            report_dir,
            overrides,
        )
    return depth_sweep(
        args.config, args.models, args.n_layers, args.seeds, args.out, report_dir, overrides
    )
