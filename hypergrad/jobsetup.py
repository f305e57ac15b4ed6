"""The main job's settings and set-up: data, splits, model, update rule."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import hypergrad as hg
from hypergrad import data as hgdata
from hypergrad import models

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
MODELS = ("mlp", "cnn", "lenet5", "densenet40", "mobilenetv2")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "exponential", "cosine", "plateau")


class JobError(Exception):
    """A problem with the user's request, reported as one line."""


@dataclasses.dataclass
class RunConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str = "cnn"
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 2e-5
    optimizer: str = "sgd"
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()  # in epochs, for "multistep"
    gamma: float = 0.1
    plateau_patience: int = 2
    track: int = 32
    track_indices: str | None = None
    mode: str = "both"
    seed: int = 0
    device: str = "auto"
    out: str = "runs/latest"
    wandb: str = "offline"
    explain: int = 8
    top_k: int = 5
    chunk_size: int = 16
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


# The supplement's Table 3 (DESIGN section 6).
PRESETS = {
    "paper-mnist": dict(
        dataset="mnist",
        model="lenet5",
        train_size=50_000,
        val_size=10_000,
        test_size=10_000,
        epochs=20,
        batch_size=64,
        lr=0.01,
        schedule="multistep",
        milestones=(5,),
        gamma=0.1,
        weight_decay=2e-5,
        momentum=0.9,
    ),
    "paper-fashion-mnist": dict(
        dataset="fashion-mnist",
        model="lenet5",
        train_size=50_000,
        val_size=10_000,
        test_size=10_000,
        epochs=20,
        batch_size=64,
        lr=0.01,
        schedule="plateau",
        gamma=0.5,
        plateau_patience=2,
        weight_decay=2e-5,
        momentum=0.9,
    ),
    "paper-cifar10": dict(
        dataset="cifar10",
        model="densenet40",
        train_size=40_000,
        val_size=10_000,
        test_size=10_000,
        epochs=150,
        batch_size=64,
        lr=0.1,
        schedule="plateau",
        gamma=0.1,
        plateau_patience=2,
        weight_decay=2.5e-5,
        momentum=0.9,
    ),
}

DEFAULT_SIZES = {
    "digits": (1000, 300, 497),
    "mnist": (50_000, 10_000, 10_000),
    "fashion-mnist": (50_000, 10_000, 10_000),
    "cifar10": (40_000, 10_000, 10_000),
}


def validate_config(config: RunConfig) -> None:
    """Raises JobError for settings no run can use, before any work is done."""
    positive = {
        "--epochs": config.epochs,
        "--batch-size": config.batch_size,
        "--chunk-size": config.chunk_size,
        "--top-k": config.top_k,
    }
    for flag, value in positive.items():
        if value < 1:
            raise JobError(f"expected {flag} >= 1, got {value}")
    if config.threads < 0:
        raise JobError(f"--threads must be >= 0, got {config.threads}")
    if config.explain < 0:
        raise JobError(f"expected --explain >= 0, got {config.explain}")
    if not math.isfinite(config.lr) or config.lr <= 0:
        raise JobError(f"expected a finite --lr > 0, got {config.lr}")
    if not 0 < config.gamma <= 1:
        raise JobError(f"expected --gamma in (0, 1], got {config.gamma}")
    if any(m < 0 for m in config.milestones):
        raise JobError(f"expected --milestones >= 0, got {list(config.milestones)}")
    if config.weight_decay < 0:
        raise JobError(f"expected --weight-decay >= 0, got {config.weight_decay}")
    if not 0 <= config.momentum < 1:
        raise JobError(f"expected --momentum in [0, 1), got {config.momentum}")


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


# ------------------------------------------------------------------- data


def _default_data_dir(dataset: str) -> Path:
    if (
        dataset == "fashion-mnist"
        and Path("/usr/share/datasets/fashion-mnist").is_dir()
    ):
        return Path("/usr/share/datasets/fashion-mnist")
    return Path("data")


def load_data(config: RunConfig):
    """``(train_pool_x, train_pool_y, test_x, test_y)``: images as float tensors."""
    name = config.dataset
    if name == "digits":
        images, labels = hgdata.load_digits_dataset()
        return images, labels, None, None
    root = Path(config.data_dir) if config.data_dir else _default_data_dir(name)
    if config.download:
        _download(name, root)
    if not root.exists():
        raise JobError(
            f"data folder {root} does not exist; pass --data-dir with the "
            f"{name} files, or --download to fetch them with torchvision"
        )
    try:
        if name in ("mnist", "fashion-mnist"):
            x, y = hgdata.load_mnist(root, train=True, kind=name)
            tx, ty = hgdata.load_mnist(root, train=False, kind=name)
            mean, std = hgdata.MNIST_MEAN, hgdata.MNIST_STD
        else:
            x, y, tx, ty = _load_cifar(root, Path(config.out) / "cache")
            mean, std = hgdata.CIFAR10_MEAN, hgdata.CIFAR10_STD
    except (FileNotFoundError, ValueError) as error:
        raise JobError(str(error).splitlines()[0]) from error
    norm = hgdata.normalize
    test = (norm(tx, mean, std), ty) if tx is not None else (None, None)
    return norm(x, mean, std), y, *test


def _load_cifar(root: Path, cache: Path):
    archives = [root] if root.is_file() else sorted(root.glob("*.tar.gz"))
    if archives and not (root / "test").is_dir():
        # An archive of class folders (e.g. test/<class>/*.jpg): the test set.
        tx, ty = hgdata.load_cifar10_folder(archives[0], cache_dir=cache)
        return tx, ty, None, None
    if (root / "cifar-10-batches-py").is_dir() or root.name == "cifar-10-batches-py":
        x, y = hgdata.load_cifar10(root, train=True)
        tx, ty = hgdata.load_cifar10(root, train=False)
        return x, y, tx, ty
    train = next((root / n for n in ("train", "training") if (root / n).is_dir()), None)
    test = next((root / n for n in ("test", "testing") if (root / n).is_dir()), None)
    if test is None:
        raise JobError(
            f"{root} holds neither cifar-10-batches-py nor a test/ folder of class "
            "sub-folders; pass --data-dir pointing at one of them"
        )
    tx, ty = hgdata.load_cifar10_folder(test)
    if train is None:
        # Only a test set is on disk: train from it, test on the rest.
        return tx, ty, None, None
    x, y = hgdata.load_cifar10_folder(train)
    return x, y, tx, ty


def _download(name: str, root: Path):
    try:
        import torchvision.datasets as tvd
    except ImportError as error:
        raise JobError(
            '--download needs torchvision: pip install "hypergrad[vision]"'
        ) from error
    cls = {
        "mnist": tvd.MNIST,
        "fashion-mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
    }
    for train in (True, False):
        try:
            cls[name](str(root), train=train, download=True)
        except Exception as error:  # noqa: BLE001 - network errors vary
            raise JobError(f"download of {name} failed: {error}") from error


def make_splits(config: RunConfig, pool_x, pool_y, test_x, test_y):
    """Deterministic train / validation / test splits and their source indices."""
    train_n, val_n, test_n = (config.train_size, config.val_size, config.test_size)
    defaults = DEFAULT_SIZES[config.dataset]
    train_n = defaults[0] if train_n is None else train_n
    val_n = defaults[1] if val_n is None else val_n
    test_n = defaults[2] if test_n is None else test_n
    if train_n < 1 or val_n < 0 or test_n < 1:
        raise JobError(
            f"expected --train-size >= 1, --val-size >= 0, --test-size >= 1, got "
            f"{train_n}, {val_n}, {test_n}"
        )
    separate_test = test_x is not None
    wanted = train_n + val_n + (0 if separate_test else test_n)
    if wanted > len(pool_x):
        raise JobError(
            f"the splits ask for {wanted} training-pool samples (train {train_n} + "
            f"val {val_n}{'' if separate_test else f' + test {test_n}'}) but "
            f"{config.dataset} has {len(pool_x)}; lower --train-size/--val-size"
        )
    if separate_test and test_n > len(test_x):
        raise JobError(
            f"--test-size {test_n} is larger than the {len(test_x)} test samples "
            f"of {config.dataset}"
        )
    sizes = [train_n, val_n] + ([] if separate_test else [test_n])
    parts = hgdata.split_indices(len(pool_x), sizes, seed=config.seed)
    split = {"train": parts[0], "val": parts[1]}
    sets = {k: (pool_x[v], pool_y[v]) for k, v in split.items()}
    if separate_test:
        split["test"] = hgdata.split_indices(len(test_x), [test_n], seed=config.seed)[0]
        sets["test"] = (test_x[split["test"]], test_y[split["test"]])
    else:
        split["test"] = parts[2]
        sets["test"] = (pool_x[parts[2]], pool_y[parts[2]])
    return sets, split


# ------------------------------------------------------------------ model


def make_model(config: RunConfig, input_shape, num_classes: int = 10):
    channels, height, width = input_shape
    name = config.model
    if name == "mlp":
        return models.mlp(channels * height * width, [64], num_classes)
    if name == "cnn":
        return models.small_cnn(channels, num_classes, (height, width))
    if name == "lenet5":
        if (height, width) != (28, 28):
            raise JobError(
                f"--model lenet5 needs 28x28 inputs, {config.dataset} has "
                f"{height}x{width}; use --model cnn or mlp"
            )
        return models.lenet5(num_classes, channels)
    if (channels, height, width) != (3, 32, 32):
        raise JobError(
            f"--model {name} needs 3x32x32 inputs (CIFAR-10), {config.dataset} has "
            f"{channels}x{height}x{width}"
        )
    if name == "densenet40":
        # DenseNet-BC-40 (k = 12): the supplement's 176,122 parameters.
        return models.densenet40(num_classes, bottleneck=True, compression=0.5)
    return models.mobilenetv2(num_classes)


def make_rule(config: RunConfig, steps_per_epoch: int):
    base = config.lr
    if config.schedule == "constant":
        schedule = hg.schedules.constant(base)
    elif config.schedule == "multistep":
        marks = [m * steps_per_epoch for m in config.milestones]
        schedule = hg.schedules.multistep(base, marks, config.gamma)
    elif config.schedule == "exponential":
        schedule = hg.schedules.exponential(base, config.gamma ** (1 / steps_per_epoch))
    elif config.schedule == "cosine":
        schedule = hg.schedules.cosine(base, config.epochs * steps_per_epoch)
    else:
        schedule = hg.schedules.ReduceOnPlateau(
            base, factor=config.gamma, patience=config.plateau_patience, threshold=1e-4
        )
    try:
        if config.optimizer == "sgd":
            return hg.optim.sgd(
                schedule, momentum=config.momentum, weight_decay=config.weight_decay
            ), schedule
        make = hg.optim.adam if config.optimizer == "adam" else hg.optim.adamw
        return make(schedule, weight_decay=config.weight_decay), schedule
    except ValueError as error:
        raise JobError(str(error)) from error


def tracked_memory_bytes(num_params, slots, num_tracked, num_buffers, mode, dtype):
    """Bytes of tangent state: K x (P + slots x P (+ buffers)) per mode."""
    per_sample = num_params * (1 + slots)
    sets = {"exact": 1, "approx": 1, "both": 2}[mode]
    extra = num_buffers if mode in ("exact", "both") else 0
    return (per_sample * sets + extra) * num_tracked * torch.finfo(dtype).bits // 8


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def choose_tracked(config: RunConfig, num_train: int) -> torch.Tensor:
    if config.track_indices:
        path = Path(config.track_indices)
        if not path.is_file():
            raise JobError(f"--track-indices {path} is not a file")
        try:
            text = path.read_text().replace(",", " ").split()
        except UnicodeDecodeError as error:
            raise JobError(
                f"--track-indices file {path} is not text; expected integers "
                "separated by spaces, commas or new lines"
            ) from error
        try:
            values = [int(v) for v in text]
        except ValueError as error:
            raise JobError(f"--track-indices file {path}: {error}") from error
        tracked = torch.tensor(values, dtype=torch.long)
        bad = (tracked < 0) | (tracked >= num_train)
        if bad.any() or not len(tracked):
            raise JobError(
                f"--track-indices must hold positions in [0, {num_train}) of the "
                f"training split, got {tracked[bad][:5].tolist() or 'none'}"
            )
        if len(torch.unique(tracked)) != len(tracked):
            raise JobError(f"--track-indices file {path} repeats an index")
        return tracked
    if not 1 <= config.track <= num_train:
        raise JobError(
            f"--track {config.track} must be between 1 and the training-set size "
            f"{num_train}"
        )
    g = torch.Generator().manual_seed(config.seed + 1)
    return torch.randperm(num_train, generator=g)[: config.track].sort().values
