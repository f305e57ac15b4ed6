"""``hypergrad debug-labels`` end to end on scikit-learn's digits, and parts.

One shared run (500 training digits, half of them relabelled, a small CNN,
8 epochs, every method, W&B offline when wandb is installed) is inspected
by most tests; it takes about ten seconds on one CPU thread.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from helpers_reference import ce_loss, make_cnn, make_data, one_thread

import hypergrad as hg
from hypergrad.experiments import debug_labels as dl
from hypergrad.jobsetup import JobError
from hypergrad.models import lenet5

HAS_WANDB = importlib.util.find_spec("wandb") is not None
TRAIN, EPOCHS = 500, 8
ARGS = [
    "--dataset", "digits", "--model", "cnn", "--train-size", str(TRAIN),
    "--val-size", "200", "--test-size", "500", "--epochs", str(EPOCHS),
    "--lr", "0.05", "--schedule", "constant", "--lissa-depth", "100",
    "--threads", "1", "--device", "cpu", "--no-progress",
]  # fmt: skip
LABELS = ["none", "oracle", *dl.METHODS]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_thread()


def parse(argv):
    parser = argparse.ArgumentParser(prog="hypergrad")
    dl.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["debug-labels", *argv])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shared run: its output folder and what ``main`` printed."""
    out = tmp_path_factory.mktemp("debug")
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("WANDB_")]:
            patch.delenv(name)
        patch.setenv("HOME", str(home))
        patch.setenv("MPLCONFIGDIR", str(home / "matplotlib"))
        mode = "offline" if HAS_WANDB else "disabled"
        assert dl.main(parse([*ARGS, "--out", str(out), "--wandb", mode])) == 0
    return out


def read_csv(path: Path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_files_and_columns(run):
    for name in ("detection.png", "summary.json", "scores.csv", "flipped.csv"):
        assert (run / name).is_file(), name
    columns, rows = read_csv(run / "detection.csv")
    assert columns == ["method", "fraction_inspected", "fraction_found"]
    assert sorted({r["method"] for r in rows}) == sorted(dl.METHODS)
    for method in dl.METHODS:
        found = [float(r["fraction_found"]) for r in rows if r["method"] == method]
        assert len(found) == 101 and found[0] == 0.0 and found[-1] == 1.0
        assert all(b >= a for a, b in zip(found, found[1:], strict=False))
    columns, rows = read_csv(run / "retrain.csv")
    assert columns == ["method", "test_accuracy"]
    assert [r["method"] for r in rows] == LABELS
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints][-1] == f"epoch_{EPOCHS:03d}.pt"
    assert len(checkpoints) == EPOCHS


def test_summary_has_aucs_accuracies_and_wall_times(run):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["num_flipped"] == TRAIN // 2
    assert set(summary["detection_auc"]) == set(dl.METHODS)
    assert set(summary["retrain_accuracy"]) == set(LABELS)
    assert set(summary["seconds"]) == set(dl.METHODS)
    assert summary["seconds"]["hydra"] >= summary["train_seconds_tracked"] > 0
    assert summary["solvers"]["influence-cg"]["converged"]


def test_flipped_labels_are_recorded(run):
    _, rows = read_csv(run / "flipped.csv")
    assert len(rows) == TRAIN // 2
    assert all(r["true_label"] != r["noisy_label"] for r in rows)
    _, scores = read_csv(run / "scores.csv")
    flagged = {r["position"] for r in scores if r["flipped"] == "1"}
    assert flagged == {r["position"] for r in rows}


def test_sanity_of_the_results(run):
    summary = json.loads((run / "summary.json").read_text())
    auc, accuracy = summary["detection_auc"], summary["retrain_accuracy"]
    assert accuracy["oracle"] >= accuracy["none"]
    assert abs(auc["random"] - 0.5) < 0.15
    assert auc["hydra"] > auc["random"]
    assert max(auc.values()) <= 1 - 0.5 / 2 + 1e-9  # a perfect ranking's area


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_has_the_tables_and_the_plot(run):
    from hypergrad.integrations._wandb_records import iter_records

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    keys = set()
    for record in iter_records(run_file):
        if record.WhichOneof("record_type") == "history":
            keys |= {
                item.key or "/".join(item.nested_key) for item in record.history.item
            }
    assert "train/loss" in keys
    for name in ("detection", "detection_auc", "retrain", "detection_plot"):
        # A table or an image is logged as a group of keys under its name.
        assert f"debug_labels/{name}/_type" in keys, name


def test_hydra_scores_equal_summed_contributions():
    torch.manual_seed(0)
    x, y = make_data(0, 30, (1, 6, 6), classes=3)
    model = make_cnn(0)
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=1e-3)
    for mode in ("exact", "approx"):
        tracker = hg.Tracker(
            model, ce_loss, rule, num_train=30, tracked=torch.arange(30), mode=mode
        )
        for start in range(0, 30, 8):
            rows = torch.arange(start, min(start + 8, 30))
            tracker.step(x[rows], y[rows], rows)
        ours = dl.hydra_scores(tracker, x[:11], y[:11], batch_size=4)
        expected = tracker.contributions(x[:11], y[:11]).sum(0)
        assert float((ours - expected).abs().max() / expected.abs().max()) < 1e-10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--noise", "0"], r"--noise must be in \(0, 1\), got 0.0; try 0.5"),
        (["--remove", "1.5"], r"--remove must be in \(0, 1\), got 1.5"),
        (["--methods", "hydra,magic"], "--methods got magic; expected a comma list"),
        (["--lissa-depth", "0"], "--lissa-depth must be >= 1, got 0; the default"),
        (["--damping", "-1"], "--damping must be >= 0, got -1.0; the default is 0.01"),
        (["--retrain-epochs", "0"], "--retrain-epochs must be >= 1, got 0"),
        (["--threads", "-1"], "--threads must be >= 0, got -1"),
    ],
)
def test_bad_arguments_say_how_to_fix_them(argv, message):
    with pytest.raises(JobError, match=message):
        dl.config_from_args(parse(argv))


def test_preset_is_the_paper_scale_with_fifty_retraining_epochs():
    config = dl.config_from_args(parse(["--preset", "paper-mnist", "--epochs", "3"]))
    assert (config.train_size, config.val_size, config.test_size) == (
        50_000,
        10_000,
        10_000,
    )
    assert config.retrain_epochs == 50 and config.epochs == 3
    assert config.milestones == (5,) and config.lr == 0.01 and config.mode == "approx"


def test_memory_estimate_refuses_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(dl, "available_memory_bytes", lambda device: 2**30)
    # 5,000 x 61,706 x (weights + momentum) x 4 bytes, and its copy: 4.6 GiB.
    with pytest.raises(JobError, match="needs about 4.6 GiB.*lower --train-size"):
        dl._check_memory(dl.DebugConfig(), lenet5(), 5000, torch.device("cpu"))
