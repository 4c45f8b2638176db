"""ImageDataModule over torchvision's real loaders, on small IDX / CIFAR files written here."""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_scalars
from torchvision import datasets

from rae_lightning import ImageDataModule
from rae_lightning.cli import RAECLI, main

CONFIGS = Path(__file__).parents[1] / "configs"
N_TRAIN, N_TEST = 200, 100


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array in the IDX format of the MNIST files (big-endian header)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def make_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness pattern depends on the class, and balanced labels 0..9."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, size, size))
    for digit in range(10):
        rows = labels == digit
        images[rows, digit * 2 : digit * 2 + 6, :] += 200
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_mnist_like(root: Path, folder: str = "MNIST", compress: bool = False) -> dict:
    """The four IDX files torchvision's MNIST-style classes read, under root/folder/raw."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        images, labels = make_images(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[prefix] = (images, labels)
    return out


@pytest.fixture
def mnist_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    return root, write_mnist_like(root)


def test_idx_files_read_by_torchvision_match_what_was_written(mnist_root) -> None:
    root, written = mnist_root
    ds = datasets.MNIST(root, train=False, download=False)

    np.testing.assert_array_equal(ds.data.numpy(), written["t10k"][0])
    np.testing.assert_array_equal(ds.targets.numpy(), written["t10k"][1])


def test_official_protocol_trains_on_normal_train_images_tests_on_whole_test_set(
    mnist_root,
) -> None:
    root, written = mnist_root
    dm = ImageDataModule(dataset="mnist", root=str(root), classes=[3], val_frac=0.2)
    dm.prepare_data()
    dm.setup("fit")
    split = dm.split

    # samples are ordered official train, then official test
    assert (split.train < N_TRAIN).all()
    assert (split.val < N_TRAIN).all()
    np.testing.assert_array_equal(split.test, np.arange(N_TRAIN, N_TRAIN + N_TEST))
    train_x, train_y = dm.datasets["train"].x, dm.datasets["train"].y
    assert train_x.shape == (len(split.train), 784)
    assert train_x.dtype == torch.float32
    assert 0.0 <= train_x.min() and train_x.max() <= 1.0
    assert (train_y == 0).all()
    expected = written["train"][0][split.train].reshape(-1, 784) / 255.0
    np.testing.assert_allclose(train_x.numpy(), expected, rtol=1e-6)
    test_y = dm.datasets["test"].y.numpy()
    np.testing.assert_array_equal(test_y, written["t10k"][1] != 3)
    assert set(dm.datasets["val"].y.tolist()) == {0, 1}


def test_pooled_protocol_mixes_both_official_splits_at_the_anomaly_ratio(mnist_root) -> None:
    root, _ = mnist_root
    dm = ImageDataModule(
        dataset="mnist", root=str(root), split_mode="pooled", protocol="leave_one_out",
        classes=[1], train_frac=0.6, val_frac=0.2, anomaly_val_frac=0.5, anomaly_ratio=0.35,
    )  # fmt: skip
    dm.setup()
    split = dm.split

    # pooled: training draws from both official splits, and test is not the official test set
    assert (split.train >= N_TRAIN).any() and (split.train < N_TRAIN).any()
    assert (split.test < N_TRAIN).any()
    for name in ("val", "test"):
        y = dm.datasets[name].y
        assert abs(int(y.sum()) - 0.35 * len(y)) <= 1


def test_gzip_idx_files_are_unpacked_in_prepare_data(tmp_path: Path) -> None:
    root = tmp_path / "data"
    written = write_mnist_like(root, "FashionMNIST", compress=True)
    dm = ImageDataModule(dataset="fashion_mnist", root=str(root), classes=[0])

    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw.*prepare_data"):
        dm.setup()
    dm.prepare_data()
    dm.setup()

    assert (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert len(dm.datasets["test"]) == N_TEST
    assert dm.datasets["test"].y.tolist() == (written["t10k"][1] != 0).tolist()


def test_missing_dataset_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    dm = ImageDataModule(dataset="kmnist", root=str(tmp_path))

    with pytest.raises(FileNotFoundError, match=r"kmnist: .*KMNIST/raw.*set download: true"):
        dm.setup()


def test_cifar10_is_flattened_channel_first(tmp_path: Path, monkeypatch) -> None:
    # CIFAR-10 batches are pickles checked by md5; only the md5 comparison is replaced
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
    batches = {}
    for i, name in enumerate(names):
        data = rng.integers(0, 256, size=(20, 3 * 32 * 32), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(20)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    monkeypatch.setattr(
        "torchvision.datasets.cifar.check_integrity", lambda path, md5=None: Path(path).is_file()
    )

    dm = ImageDataModule(dataset="cifar10", root=str(tmp_path), classes=[2])
    dm.setup()

    assert dm.input_dim == 3072 and dm.image_shape == (3, 32, 32)
    first_test = batches["test_batch"][0][0]  # CIFAR rows are already channel-first
    np.testing.assert_allclose(dm.datasets["test"].x[0].numpy(), first_test / 255.0, rtol=1e-6)


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="dataset must be one of .* got 'svhn'"):
        ImageDataModule(dataset="svhn")
    with pytest.raises(ValueError, match="split_mode must be one of .* got 'mixed'"):
        ImageDataModule(split_mode="mixed")


def test_absent_normal_class_is_an_error(mnist_root) -> None:
    root, _ = mnist_root
    dm = ImageDataModule(dataset="mnist", root=str(root), classes=[42])

    with pytest.raises(ValueError, match=r"classes \[42\] are absent"):
        dm.setup()


def _quick(tmp_path: Path, root: Path) -> list[str]:
    return [
        f"--data.init_args.root={root}",
        "--data.init_args.batch_size=16",
        "--model.init_args.n_layers=2",
        "--model.init_args.hidden_dim=32",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
    ]


@pytest.mark.parametrize(
    ("config", "folder", "compress"),
    [
        ("mnist_rae_official", "MNIST", False),
        ("mnist_rae_rapp", "MNIST", True),
        ("fashion_mnist_rae_official", "FashionMNIST", False),
        ("fashion_mnist_rae_rapp", "FashionMNIST", True),
    ],
)
def test_fit_and_test_through_the_cli(
    tmp_path: Path, config: str, folder: str, compress: bool, caplog
) -> None:
    root = tmp_path / "data"
    write_mnist_like(root, folder, compress=compress)
    args = ["--config", str(CONFIGS / f"{config}.yaml"), *_quick(tmp_path, root)]

    with caplog.at_level(logging.INFO):
        main(["fit", *args])
        main(["test", *args])

    assert "ImageDataModule: protocol=one_vs_rest" in caplog.text
    auroc = read_scalars(tmp_path / "lightning_logs" / "version_1", "test/auroc")
    assert len(auroc) == 1 and 0.0 <= next(iter(auroc.values())) <= 1.0


@pytest.mark.parametrize(
    "config",
    sorted(p.stem for p in CONFIGS.glob("*.yaml") if "mnist" in p.stem or "cifar" in p.stem),
)
def test_image_configs_know_input_dim_without_files(config: str, tmp_path: Path) -> None:
    args = ["--config", str(CONFIGS / f"{config}.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    cli = RAECLI(args=args, run=False)

    assert isinstance(cli.datamodule, ImageDataModule)
    expected = 3072 if "cifar" in config else 784
    assert cli.model.hparams.input_dim == cli.datamodule.input_dim == expected


def test_standardised_pixels_use_the_training_normals_only(mnist_root) -> None:
    root, written = mnist_root
    dm = ImageDataModule(dataset="mnist", root=str(root), classes=[3], standardize=True)
    dm.setup()

    raw = written["train"][0].reshape(-1, 784).astype(np.float64) / 255.0
    train = raw[dm.split.train]
    np.testing.assert_allclose(dm.mean.numpy(), train.mean(axis=0), atol=1e-6)
    x = dm.datasets["train"].x.numpy()
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0, ddof=1), 1.0, rtol=1e-4)
    test = dm.datasets["test"].x.numpy() * dm.std.numpy() + dm.mean.numpy()
    np.testing.assert_allclose(test, written["t10k"][0].reshape(-1, 784) / 255.0, atol=1e-5)
