"""End-to-end tests of ``hypergrad approx-error`` on the 8x8 digits.

One small run (200 training samples, 2 epochs, K = 4, the three schedules)
is shared by the tests that read its outputs; W&B runs offline with every
folder inside pytest's temporary directory.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
from helpers_experiments import quiet_home, run_command

from hypergrad.experiments import approx_error
from hypergrad.jobsetup import JobError

HAS_WANDB = importlib.util.find_spec("wandb") is not None
TRAIN, TEST, EPOCHS, BATCH, TRACK = 200, 60, 2, 32, 4
STEPS = math.ceil(TRAIN / BATCH) * EPOCHS
SMALL = [
    "--dataset", "digits", "--train-size", str(TRAIN), "--test-size", str(TEST),
    "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--track", str(TRACK),
    "--power-every", "2", "--no-progress",
]  # fmt: skip


def command(argv: list[str]) -> int:
    return run_command(approx_error, "approx-error", argv)


@pytest.fixture(scope="module", autouse=True)
def quiet(tmp_path_factory):
    """HOME, XDG and matplotlib folders in a temporary folder; W&B offline."""
    with quiet_home(tmp_path_factory.mktemp("home")) as home:
        yield home


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("approx") / "run"
    mode = "offline" if HAS_WANDB else "disabled"
    assert command([*SMALL, "--wandb", mode, "--out", str(out)]) == 0
    return out


def read_curve(out: Path):
    with (out / "approximation_error.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_files_and_columns(run):
    columns, rows = read_curve(run)
    assert columns == ["step", "abs_error", "rel_error", "cosine", "bound"]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    for name in ("approx_error.png", "schedules.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        assert -1 - 1e-6 <= float(row["cosine"]) <= 1 + 1e-6
        assert float(row["abs_error"]) >= 0 and float(row["rel_error"]) >= 0


def test_measured_error_is_under_the_bound_at_every_step(run):
    _, rows = read_curve(run)
    assert all(row["bound"] for row in rows)  # weight decay > 0: always defined
    for row in rows:
        assert float(row["abs_error"]) <= float(row["bound"]), row
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bound"]["error_below_bound_at_every_step"] is True
    assert summary["bound"]["max_error_over_bound"] <= 1
    # The last bound is the theorem's expression at the final estimates.
    b = summary["bound"]
    lr, first = b["final_lr"], summary["config"]["lr"]
    wd = summary["config"]["weight_decay"]
    expected = b["hessian_norm_max"] * b["tangent_norm_max"] * first / (lr * wd)
    assert float(rows[-1]["bound"]) == pytest.approx(expected, rel=1e-12)


def test_summary_rank_agreement_and_schedules(run):
    summary = json.loads((run / "summary.json").read_text())
    agree = summary["rank_agreement"]
    assert agree["test_points"] == TEST
    for key in ("spearman_all", "spearman_per_test_point_mean", "kendall_all"):
        assert -1 <= agree[key] <= 1
    assert 0 <= agree["top5_overlap"] <= 1
    assert set(summary["schedules"]) == {"constant", "multistep", "exponential"}
    rates = {k: v["final_lr"] for k, v in summary["schedules"].items()}
    assert rates["constant"] == pytest.approx(0.1)
    assert rates["multistep"] == pytest.approx(0.01)  # x0.1 at epoch 1 of 2
    assert rates["multistep"] < rates["exponential"] < rates["constant"]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_keys_match_the_main_job(run):
    from hypergrad.integrations._wandb_records import iter_records

    (run_file,) = (run / "wandb").rglob("run-*.wandb")
    keys = set()
    for record in iter_records(run_file):
        if record.WhichOneof("record_type") == "history":
            keys |= {
                item.key or "/".join(item.nested_key) for item in record.history.item
            }
    for key in ("abs", "rel", "cosine", "bound"):
        assert f"approx_error/{key}" in keys
    assert {"train/loss", "train/lr", "step"} <= keys


def test_zero_weight_decay_leaves_the_bound_out(tmp_path, capsys):
    out = tmp_path / "wd0"
    argv = [*SMALL, "--weight-decay", "0", "--epochs", "1", "--no-schedules"]
    assert command([*argv, "--wandb", "disabled", "--out", str(out)]) == 0
    assert "bound L M_w eta_1 / (eta_t lambda) is infinite" in capsys.readouterr().err
    _, rows = read_curve(out)
    assert rows and all(row["bound"] == "" for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bound"]["max_error_over_bound"] is None
    assert any("infinite with weight decay 0" in note for note in summary["notes"])
    assert not (out / "schedules.png").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--gamma", "2"], r"expected 0 < --gamma <= 1 \(a decay\), got 2\.0"),
        (["--milestones", "5"], r"expected --milestones between 1 and --epochs - 1"),
        (["--power-iters", "0"], r"expected --power-iters >= 1, got 0"),
        (["--lr", "-1"], r"expected --lr > 0, --weight-decay >= 0"),
    ],
)
def test_bad_requests_are_job_errors(tmp_path, change, message):
    with pytest.raises(JobError, match=message):
        command([*SMALL, *change, "--wandb", "disabled", "--out", str(tmp_path)])
