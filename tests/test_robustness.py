"""Bad input, faults and reproducibility, through the `rae` entry point."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_scalars

from rae_lightning.cli import main

ROOT = Path(__file__).parents[1]
DIGITS_RAE = ROOT / "configs" / "digits_rae.yaml"
DIGITS_VAE = ROOT / "configs" / "digits_vae.yaml"
DIGITS_AE = ROOT / "configs" / "digits_ae.yaml"
SMALL = ["--model.init_args.n_layers=4", "--model.init_args.hidden_dim=32"]


def _quick(root: Path, epochs: int = 1) -> list[str]:
    return [
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=6",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *SMALL,
    ]


def _fails(args: list[str], capsys) -> str:
    """Run `rae` with args, expect exit status 2, return its one-line message."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rae:")]
    assert len(lines) == 1
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished RAE run on digits; returns its best checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", str(DIGITS_RAE), *_quick(root)])
    (best,) = (root / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    return best


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.n_layer=3"], "Option 'n_layer' is not accepted"),
        (["--data.init_args.batchsize=3"], "Option 'batchsize' is not accepted"),
        (["--trainer.max_epoch=3"], "unrecognized arguments: --trainer.max_epoch"),
        (["--model.init_args.n_layers=abc"], "Expected a <class 'int'>. Got value: abc"),
        (["--model.init_args.n_layers=0"], "n_layers must be at least 1, got 0"),
        (["--model.init_args.latent_dim=64"], "latent_dim must be smaller than input_dim=64"),
        (["--model.init_args.hidden_dim=0"], "hidden_dim must be at least 1, got 0"),
        (["--trainer.gradient_clip_val=-1"], "gradient_clip_val must be at least 0, got -1.0"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message) -> None:
    args = ["fit", "--config", str(DIGITS_RAE), f"--trainer.default_root_dir={tmp_path}"]

    line = _fails([*args, *extra], capsys)

    assert line.startswith("rae: error: ")
    assert message in line
    assert not (tmp_path / "lightning_logs").exists()


def test_mistyped_key_in_a_config_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: rae_lightning.AutoEncoder\n  init_args:\n    lr_: 0.1\n")

    line = _fails(["fit", "--config", str(DIGITS_RAE), "--config", str(bad)], capsys)

    assert "Option 'lr_' is not accepted" in line


def test_missing_checkpoint(tmp_path, capsys) -> None:
    missing = tmp_path / "nothing.ckpt"

    args = ["test", "--config", str(DIGITS_RAE), f"--trainer.default_root_dir={tmp_path}"]
    line = _fails([*args, f"--ckpt_path={missing}"], capsys)
    assert not (tmp_path / "lightning_logs").exists()

    assert f"ckpt_path '{missing}' does not exist" in line


def test_file_that_is_not_a_checkpoint(tmp_path, capsys) -> None:
    fake = tmp_path / "fake.ckpt"
    fake.write_text("not a checkpoint\n")

    args = ["test", "--config", str(DIGITS_RAE), f"--trainer.default_root_dir={tmp_path}"]
    line = _fails([*args, f"--ckpt_path={fake}"], capsys)
    assert not (tmp_path / "lightning_logs").exists()

    assert f"ckpt_path '{fake}' is not a checkpoint that loads with weights_only=True" in line


def test_a_pickle_with_code_is_refused(tmp_path, capsys) -> None:
    # a checkpoint from an untrusted source must not run code while it loads
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": os.system}, evil)

    args = ["test", "--config", str(DIGITS_RAE), f"--trainer.default_root_dir={tmp_path}"]
    line = _fails([*args, f"--ckpt_path={evil}"], capsys)
    assert not (tmp_path / "lightning_logs").exists()

    assert "is not a checkpoint that loads with weights_only=True" in line


@pytest.mark.parametrize(
    ("config", "kind"),
    [(DIGITS_AE, "AutoEncoder(residual=False)"), (DIGITS_VAE, "VariationalAutoEncoder")],
)
@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_checkpoint_of_another_model_kind(
    trained, tmp_path, capsys, config, kind, subcommand
) -> None:
    args = [subcommand, "--config", str(config), f"--ckpt_path={trained}", *_quick(tmp_path)]

    line = _fails(args, capsys)

    assert "holds a AutoEncoder(residual=True), but the config names a " + kind in line
    assert not (tmp_path / "lightning_logs").exists()


def test_checkpoint_architecture_replaces_the_config_with_a_warning(trained, tmp_path) -> None:
    # SMALL in _quick trained 4 layers of width 32; the config asks for 8 of 128
    args = ["test", "--config", str(DIGITS_RAE), f"--ckpt_path={trained}"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]

    with pytest.warns(UserWarning, match=r"built as ckpt_path .* was trained: hidden_dim=32 "
                      r"\(the config says 128\), n_layers=4 \(the config says 8\)"):  # fmt: skip
        main(args)


def test_checkpoint_of_another_input_size(trained, tmp_path, capsys) -> None:
    ckpt = torch.load(trained, weights_only=True)
    ckpt["hyper_parameters"]["input_dim"] = 32
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    args = ["test", "--config", str(DIGITS_RAE), f"--ckpt_path={other}", *_quick(tmp_path)]

    line = _fails(args, capsys)

    assert "was trained with input_dim=32, but the config and data give input_dim=64" in line


def _rae(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), **(env_extra or {}))
    cmd = [sys.executable, "-m", "rae_lightning", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _final_state(root: Path) -> dict:
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True)


@pytest.mark.parametrize(
    ("signal", "config"), [("SIGKILL", DIGITS_RAE), ("SIGTERM", DIGITS_VAE)], ids=["rae", "vae"]
)
def test_killed_run_resumes_to_the_same_result(tmp_path, signal, config) -> None:
    args = ["fit", "--config", str(config), *_quick(tmp_path, epochs=4)[1:]]
    whole = _rae(*args, f"--trainer.default_root_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]

    # killed in the middle of the third epoch (6 steps an epoch)
    broken = tmp_path / "broken"
    kill = ["--trainer.callbacks+=helpers.SignalAtStep", "--trainer.callbacks.step=15"]
    killed = _rae(
        *args,
        f"--trainer.default_root_dir={broken}",
        *kill,
        f"--trainer.callbacks.signal={signal}",
    )
    assert killed.returncode == (143 if signal == "SIGTERM" else -9), killed.stderr[-2000:]
    if signal == "SIGTERM":
        assert "rae: stopped by SIGTERM; checkpoints are intact" in killed.stderr
    assert _final_state(broken)["global_step"] == 12  # the end of the second epoch
    resumed = _rae(*args, f"--trainer.default_root_dir={broken}", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = _final_state(tmp_path / "whole"), _final_state(broken)
    assert a["global_step"] == b["global_step"] == 24
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-5, atol=1e-6)
    logs_a = read_scalars(tmp_path / "whole" / "lightning_logs" / "version_0", "val/auroc")
    logs_b = read_scalars(broken / "lightning_logs" / "version_0", "val/auroc")
    assert logs_b == pytest.approx(logs_a, abs=1e-6)


def test_same_seed_same_auroc(tmp_path) -> None:
    results = []
    for name in ("one", "two"):
        root = tmp_path / name
        main(["fit", "--config", str(DIGITS_RAE), *_quick(root, epochs=2)])
        results.append(read_scalars(root / "lightning_logs" / "version_0", "val/auroc"))

    assert results[0] and results[0] == pytest.approx(results[1], abs=1e-6)


def test_unlabelled_table_fits_validates_and_predicts(tmp_path, capsys) -> None:
    rows = torch.Generator().manual_seed(0)
    values = torch.randn(200, 5, generator=rows)
    csv = tmp_path / "readings.csv"
    lines = ["a,b,c,d,e", *(",".join(f"{v:.5f}" for v in row) for row in values.tolist())]
    csv.write_text("\n".join(lines) + "\n")
    config = ROOT / "configs" / "tabular_rae.yaml"
    data = [
        f"--data.init_args.path={csv}",
        "--data.init_args.label_column=null",
        "--data.init_args.feature_columns=null",
    ]
    run = [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]

    main(["fit", "--config", str(config), *data, *run, "--trainer.max_epochs=2"])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "predictions.csv"
    main(
        [
            "predict",
            "--config",
            str(config),
            *data,
            *run,
            f"--ckpt_path={last}",
            f"--predictions.path={out}",
        ]
    )

    auroc = read_scalars(tmp_path / "lightning_logs" / "version_0", "val/auroc")
    assert auroc and all(value != value for value in auroc.values())  # NaN: undefined
    threshold = torch.load(last, weights_only=True)["state_dict"]["threshold"]
    assert torch.isfinite(threshold)
    rows = out.read_text().splitlines()
    assert rows[0] == "index,score,decision,label"
    assert len(rows) > 1 and all(row.endswith(",") for row in rows[1:])


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys) -> None:
    args = ["fit", "--config", str(DIGITS_RAE), *_quick(tmp_path, epochs=3)]
    poison = ["--trainer.callbacks+=helpers.PoisonBatch", "--trainer.callbacks.step=8"]

    with pytest.raises(SystemExit) as exc:
        main([*args, *poison])

    assert exc.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rae:")]
    assert len(err) == 1
    assert "non-finite gradient at step 8 (last finite g_norm: " in err[0]
    assert "at step 7)" in err[0]
    assert "lower model.init_args.lr (now 0.001)" in err[0]
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 6  # the end of the first epoch, before the NaN
    assert all(
        torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point()
    )
    assert ckpt["g_norm_last"][0] == 5 and math.isfinite(ckpt["g_norm_last"][1])

    # resumed from it and poisoned again at once: the message still names a finite g_norm
    resumed = [*args, "--ckpt_path=last", "--trainer.callbacks+=helpers.PoisonBatch"]
    with pytest.raises(SystemExit):
        main([*resumed, "--trainer.callbacks.step=6"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rae:")]
    assert "non-finite gradient at step 6 (last finite g_norm: " in err[0]
    assert "at step 5)" in err[0]


TABULAR = ROOT / "configs" / "tabular_rae.yaml"


def _table(path: Path, bad_cell: str | None = None, label: str = "failure") -> Path:
    rows = [f"temperature,pressure,vibration,current,{label}"]
    rows += [f"{20 + i % 7},{1 + i % 3},{i % 5},{i % 4},{int(i % 10 == 9)}" for i in range(60)]
    if bad_cell is not None:
        rows[4] = rows[4].replace(rows[4].split(",")[1], bad_cell, 1)
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing file", r"nothere.csv: file not found (train file)"),
        (
            "non-numeric",
            r"t.csv: column 'pressure': non-numeric value 'ERR' in row 3 (line 5 of the file)",
        ),
        ("inf", r"t.csv: column 'pressure': infinite value in row 3 (line 5 of the file)"),
        ("missing label column", r"t.csv: label column 'failure' not found"),
        ("absent class", r"t.csv: label column 'failure': classes [42] are absent"),
    ],
)
def test_bad_data_ends_rae_with_one_line_before_a_run_folder(tmp_path, capsys, case, message):
    csv = tmp_path / "t.csv"
    extra = []
    if case == "missing file":
        csv = tmp_path / "nothere.csv"
    elif case == "non-numeric":
        _table(csv, "ERR")
    elif case == "inf":
        _table(csv, "inf")
    elif case == "missing label column":
        _table(csv, label="status")
    else:
        _table(csv)
        extra = ["--data.init_args.protocol=one_vs_rest", "--data.init_args.classes=[42]"]
    args = ["fit", "--config", str(TABULAR), f"--data.init_args.path={csv}", *extra]

    line = _fails([*args, f"--trainer.default_root_dir={tmp_path}"], capsys)

    assert message in line
    assert not (tmp_path / "lightning_logs").exists()


def test_bad_data_at_test_time_writes_no_run_folder(tmp_path, capsys) -> None:
    csv = _table(tmp_path / "t.csv", "ERR")
    args = ["test", "--config", str(TABULAR), f"--data.init_args.path={csv}"]

    line = _fails([*args, f"--trainer.default_root_dir={tmp_path}"], capsys)

    assert "column 'pressure': non-numeric value 'ERR'" in line
    assert not (tmp_path / "lightning_logs").exists()


def test_a_save_cut_off_halfway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from rae_lightning.checkpoints import AtomicCheckpointIO
    from rae_lightning.cli import RAECLI

    cli = RAECLI(args=["--config", str(DIGITS_RAE), *_quick(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    io = cli.trainer.strategy.checkpoint_io
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, last)

    real_save = torch.save

    def killed_while_writing(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)  # half the bytes reached the file ...
        raise KeyboardInterrupt  # ... when the process was stopped

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, last)
    monkeypatch.undo()

    kept = torch.load(last, weights_only=True)
    torch.testing.assert_close(kept["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_a_text_file_cut_off_halfway_leaves_the_previous_file_whole(tmp_path) -> None:
    from rae_lightning.files import atomic_write

    target = tmp_path / "predictions.csv"
    with atomic_write(target, "w", newline="") as f:
        f.write("index,score\n0,1.5\n")

    with pytest.raises(KeyboardInterrupt), atomic_write(target, "w", newline="") as f:
        f.write("index,sc")
        raise KeyboardInterrupt

    assert target.read_text() == "index,score\n0,1.5\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]
