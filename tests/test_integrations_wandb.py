"""Tests of hypergrad.integrations.wandb, the Weights & Biases logger.

Offline runs are read back from their run file `run-<id>.wandb`. wandb 0.31
ships no Python reader for it (`wandb.sdk.internal.datastore` is gone), so
the records come from `hypergrad.integrations._wandb_records`, which decodes
the file's framing and parses `wandb.proto.wandb_internal_pb2.Record`s. One
test checks that reader against wandb's own, `wandb leet inspect --json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypergrad.integrations import wandb as wandb_logging
from hypergrad.integrations._checks import rank_samples
from hypergrad.integrations._wandb_records import (
    BLOCK_SIZE,
    is_closed,
    iter_record_bytes,
    iter_records,
    wait_until_closed,
)
from hypergrad.integrations.wandb import WandbLogger

HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")


def read_records(run_file: Path) -> list:
    """Return the protobuf records of a run file, in order."""
    return list(iter_records(run_file))


def _items(items) -> dict:
    """Decode repeated key/value_json items into a flat dict."""
    return {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for item in items
    }


def history_rows(records) -> list[dict]:
    """Return the logged history rows, one dict per `run.log` call."""
    return [
        _items(record.history.item)
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def records_of(records, kind: str) -> list:
    """Return the payloads of the records of one type (e.g. "exit")."""
    return [
        getattr(record, kind)
        for record in records
        if record.WhichOneof("record_type") == kind
    ]


def files_under(folder: Path) -> list[Path]:
    """Return every file and link below `folder` (not folders)."""
    return sorted(path for path in folder.rglob("*") if not path.is_dir())


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh wandb process state with HOME and XDG folders in tmp_path.

    Tears wandb down first so that its settings and its service start under
    the temporary HOME, and again at the end so no run outlives the test.
    """
    import wandb

    wandb.teardown()
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
    ):
        monkeypatch.setenv(name, str(home / name.lower()))
    # matplotlib caches fonts under HOME; that is not wandb writing.
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    attempts = _refuse_network(monkeypatch)
    yield home
    wandb.teardown()
    assert attempts == [], "wandb tried the network from Python"


def _refuse_network(monkeypatch) -> list:
    """Make IP socket connections from this process fail, and record them.

    wandb talks to its own service over a Unix socket, which stays allowed.
    (The service is a separate process; it cannot be patched from here.)
    """
    attempts = []
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test: network access to {address!r} is not allowed")

    def connect(sock, address):
        check(sock, address)
        return original_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return original_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


@needs_wandb
def test_offline_history_has_stable_keys_and_values(isolated, tmp_path):
    out_dir = tmp_path / "out"
    config = {"lr": 0.1, "momentum": 0.9}
    losses = [2.0, 1.5, 1.25, 1.0]

    with WandbLogger(out_dir, project="tests", config=config, tags=["t"]) as logger:
        assert logger.run.offline
        for step, loss in enumerate(losses):
            logger.log_step(step, loss=torch.tensor(loss), lr=0.1, acc=step / 4)
        # The error curve comes after training, for earlier steps.
        for step in range(len(losses)):
            logger.log_approximation_error(
                step, 0.5 * step, 0.25 * step, 1.0 - 0.125 * step, bound=8.0
            )
        logger.summary({"test/accuracy": 0.75})
        run_file = logger.run_file

    assert run_file.is_relative_to(out_dir / "wandb")
    records = read_records(run_file)
    rows = history_rows(records)
    train = [row for row in rows if wandb_logging.KEY_TRAIN_LOSS in row]
    approx = [row for row in rows if wandb_logging.KEY_APPROX_ABS in row]
    assert [row["step"] for row in train] == [0, 1, 2, 3]
    assert [row["train/loss"] for row in train] == losses
    assert [row["train/lr"] for row in train] == [0.1] * 4
    assert [row["train/acc"] for row in train] == [0.0, 0.25, 0.5, 0.75]
    assert [row["step"] for row in approx] == [0, 1, 2, 3]
    assert [row["approx_error/abs"] for row in approx] == [0.0, 0.5, 1.0, 1.5]
    assert [row["approx_error/rel"] for row in approx] == [0.0, 0.25, 0.5, 0.75]
    assert [row["approx_error/cosine"] for row in approx] == [1, 0.875, 0.75, 0.625]
    assert all(row["approx_error/bound"] == 8.0 for row in approx)

    metrics = records_of(records, "metric")
    assert any(m.name == "step" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in metrics)
    (run,) = records_of(records, "run")
    assert run.project == "tests"
    assert list(run.tags) == ["t"]
    assert _items(run.config.update) == {"_wandb": {}, **config}
    summary = {}
    for update in records_of(records, "summary"):
        summary.update(_items(update.update))
    assert summary["test/accuracy"] == 0.75
    (exit_record,) = records_of(records, "exit")
    assert exit_record.exit_code == 0


@needs_wandb
def test_long_run_reads_back_across_blocks_as_wandb_reads_it(isolated, tmp_path):
    steps = 400  # about 80 KiB of history, so records cross 32 KiB blocks
    with WandbLogger(tmp_path / "out") as logger:
        for step in range(steps):
            logger.log_step(step, loss=1.0 / (step + 1), lr=0.01)

    assert logger.run_file.stat().st_size > 2 * BLOCK_SIZE
    rows = history_rows(read_records(logger.run_file))
    assert [row["step"] for row in rows] == list(range(steps))
    assert [row["train/loss"] for row in rows] == [1 / (s + 1) for s in range(steps)]

    # wandb's own reader, run offline with its folders in tmp_path.
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_CACHE_DIR": str(tmp_path / "inspect-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "inspect-config"),
    }
    inspect = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json"]
        + [str(logger.run_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    theirs = [json.loads(line) for line in inspect.stdout.splitlines()]
    assert len(theirs) == len(read_records(logger.run_file))
    their_rows = [r["history"]["item"] for r in theirs if r["type"] == "history"]
    assert [(r["step"], r["train/loss"]) for r in their_rows] == [
        (row["step"], row["train/loss"]) for row in rows
    ]


@needs_wandb
def test_a_run_file_being_written_reads_as_its_complete_prefix(isolated, tmp_path):
    with WandbLogger(tmp_path / "out") as logger:
        for step in range(200):
            logger.log_step(step, loss=float(step))
    data = logger.run_file.read_bytes()
    whole = list(iter_record_bytes(data))
    assert is_closed(logger.run_file)

    cut = tmp_path / "cut.wandb"
    for size in (len(data) // 3, BLOCK_SIZE + 5, len(data) - 1):
        cut.write_bytes(data[:size])
        prefix = list(iter_record_bytes(data[:size]))
        assert 0 < len(prefix) < len(whole)
        assert prefix == whole[: len(prefix)]
        assert not is_closed(cut)
        assert not wait_until_closed(cut, timeout=0.05)


@needs_wandb
def test_finish_says_when_the_run_file_stays_incomplete(
    isolated, tmp_path, monkeypatch
):
    monkeypatch.setattr(wandb_logging, "wait_until_closed", lambda path, timeout: False)
    logger = WandbLogger(tmp_path / "out")
    with pytest.raises(TimeoutError, match=r"did not complete .* within 0.5 s"):
        logger.finish(timeout=0.5)
    assert logger.run is None
    logger.finish()  # the run is finished all the same


@needs_wandb
def test_nothing_is_written_outside_out_dir_and_env_is_restored(
    isolated, tmp_path, monkeypatch, capfd
):
    users_cache = isolated / "users-own-cache"
    monkeypatch.setenv("WANDB_CACHE_DIR", str(users_cache))
    out_dir = tmp_path / "out"
    figure_file = tmp_path / "plot.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(figure_file)
    before = set(files_under(tmp_path))

    logger = WandbLogger(out_dir, config={"seed": 0})
    logger.log_step(0, loss=1.0, lr=0.1)
    logger.log_approximation_error(0, 0.1, 0.01, 0.99)
    logger.log_rankings(
        torch.tensor([0.5, -0.5, 0.25]),
        images=torch.rand(3, 1, 6, 6),
        labels=torch.tensor([1, 2, 3]),
    )
    logger.log_histogram("influence/self_influence", torch.randn(50))
    logger.log_image("plots/curve", figure_file)
    logger.summary({"done": True})
    logger.finish()

    new_files = set(files_under(tmp_path)) - before
    assert new_files, "the run wrote nothing"
    outside = [path for path in new_files if not path.is_relative_to(out_dir)]
    assert outside == []
    assert [p.name for p in out_dir.iterdir()] == ["wandb"]
    assert files_under(isolated) == []
    assert os.environ["WANDB_CACHE_DIR"] == str(users_cache)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        assert name not in os.environ
    assert "WANDB_ARTIFACT_DIR" not in os.environ
    assert "WANDB_ERROR_REPORTING" not in os.environ
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


@needs_wandb
def test_rankings_table_with_images_is_logged(isolated, tmp_path):
    contributions = torch.tensor([0.5, -0.2, 0.0, 1.5, -3.0, 0.1])
    images = torch.rand(6, 1, 8, 8)
    labels = torch.tensor([7, 1, 2, 3, 4, 5])
    indices = [10, 11, 12, 13, 14, 15]

    with WandbLogger(tmp_path / "out") as logger:
        logger.log_step(3, loss=0.5)
        logger.log_rankings(
            contributions, images, labels, indices=indices, top_k=2, step=3
        )
    records = read_records(logger.run_file)
    run_dir = logger.run_dir
    (row,) = [r for r in history_rows(records) if "influence/top_helpful/_type" in r]
    assert row["step"] == 3
    for key in (wandb_logging.KEY_TOP_HELPFUL, wandb_logging.KEY_TOP_HARMFUL):
        assert row[f"{key}/_type"] == "table-file"
        assert row[f"{key}/nrows"] == 2
        assert row[f"{key}/ncols"] == 5
    helpful = json.loads(
        (run_dir / "files" / row["influence/top_helpful/path"]).read_text()
    )
    harmful = json.loads(
        (run_dir / "files" / row["influence/top_harmful/path"]).read_text()
    )
    assert helpful["columns"] == list(wandb_logging.RANKING_COLUMNS)
    assert [cells[:4] for cells in helpful["data"]] == [
        [1, 13, 1.5, 3],
        [2, 10, 0.5, 7],
    ]
    assert [cells[:4] for cells in harmful["data"]] == [
        [1, 14, -3.0, 4],
        [2, 11, pytest.approx(-0.2), 1],
    ]

    # The images travel in the table artifacts, staged inside out_dir.
    artifacts = records_of(records, "artifact")
    assert {artifact.type for artifact in artifacts} == {"run_table"}
    images_staged = [
        entry
        for artifact in artifacts
        for entry in artifact.manifest.contents
        if entry.path.endswith(".png")
    ]
    assert len({entry.digest for entry in images_staged}) == 4
    for entry in images_staged:
        assert Path(entry.local_path).is_relative_to(tmp_path / "out" / "wandb")
        assert Path(entry.local_path).is_file()


@needs_wandb
def test_image_figure_and_histogram_are_logged(isolated, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = torch.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8)  # (C, H, W)
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([1.0, 0.5, 0.25])
    with WandbLogger(tmp_path / "out") as logger:
        logger.log_image("plots/error_curve", figure, step=0, caption="error")
        logger.log_image("data/sample", picture, step=0)
        logger.log_histogram("influence/self_influence", np.arange(10.0), step=1)
    plt.close(figure)
    records = read_records(logger.run_file)
    run_dir = logger.run_dir

    rows = history_rows(records)
    (curve,) = [r for r in rows if "plots/error_curve/_type" in r]
    assert curve["plots/error_curve/_type"] == "image-file"
    assert (run_dir / "files" / curve["plots/error_curve/path"]).is_file()
    (sample,) = [r for r in rows if "data/sample/_type" in r]
    assert (sample["data/sample/width"], sample["data/sample/height"]) == (8, 8)
    from PIL import Image

    # W&B casts to uint8 without scaling; the logger scales [0, 1] by 255.
    with Image.open(run_dir / "files" / sample["data/sample/path"]) as png:
        pixels = np.asarray(png)
    expected = np.rint(picture.permute(1, 2, 0).numpy() * 255)
    np.testing.assert_array_equal(pixels, expected.astype(np.uint8))
    (histogram,) = [r for r in rows if "influence/self_influence/_type" in r]
    assert histogram["step"] == 1
    assert histogram["influence/self_influence/_type"] == "histogram"
    assert sum(histogram["influence/self_influence/values"]) == 10


@needs_wandb
def test_context_manager_finishes_on_exception_and_finish_is_idempotent(
    isolated, tmp_path
):
    with pytest.raises(KeyError, match="boom"):
        with WandbLogger(tmp_path / "out") as logger:
            logger.log_step(0, loss=1.0)
            raise KeyError("boom")

    assert logger.run is None
    logger.finish()
    logger.finish()
    (exit_record,) = records_of(read_records(logger.run_file), "exit")
    assert exit_record.exit_code == 1
    with pytest.raises(RuntimeError, match="already finished. Create a new"):
        logger.log_step(1, loss=0.5)


@needs_wandb
def test_two_loggers_get_two_runs(isolated, tmp_path):
    first = WandbLogger(tmp_path / "a")
    second = WandbLogger(tmp_path / "b")
    try:
        assert first.run.id != second.run.id
        first.log_step(0, loss=1.0)
        second.log_step(0, loss=2.0)
    finally:
        first.finish()
        second.finish()
    assert history_rows(read_records(first.run_file))[0]["train/loss"] == 1.0
    assert history_rows(read_records(second.run_file))[0]["train/loss"] == 2.0


def test_disabled_mode_writes_nothing_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out_dir = tmp_path / "out"

    with WandbLogger(out_dir, mode="disabled", config={"a": 1}) as logger:
        logger.log_step(0, loss=1.0, lr=0.1)
        logger.log_approximation_error(0, 0.1, 0.01, 0.99)
        logger.log_rankings([0.5, -0.5], images=np.zeros((2, 4, 4)), labels=[0, 1])
        logger.log_histogram("values", [1.0, 2.0])
        logger.log_image("image", np.zeros((4, 4)))
        logger.summary({"done": 1})
    logger.finish()
    logger.log_step(1, loss=1.0)  # still a no-op after finish

    assert not logger.enabled
    assert logger.run is None
    assert logger.run_dir is None
    assert list(tmp_path.iterdir()) == []


def test_missing_wandb_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=re.escape('pip install "hypergrad[wandb]"')):
        WandbLogger(tmp_path / "out", mode="offline")
    assert list(tmp_path.iterdir()) == []


def test_bad_mode_lists_the_accepted_values(tmp_path):
    with pytest.raises(
        ValueError,
        match="expected mode to be one of offline, online, disabled, got 'ofline'",
    ):
        WandbLogger(tmp_path / "out", mode="ofline")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tags": "mnist"}, TypeError, r"Wrap a single tag in a list"),
        ({"config": [("lr", 1)]}, TypeError, r"expected config to be a mapping"),
    ],
)
def test_bad_constructor_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        WandbLogger(tmp_path / "out", mode="disabled", **kwargs)


@pytest.fixture
def disabled(tmp_path):
    logger = WandbLogger(tmp_path / "out", mode="disabled")
    yield logger
    logger.finish()


def test_inputs_are_checked_in_every_mode(disabled, tmp_path):
    with pytest.raises(TypeError, match=r"expected an int step, got float 1.5"):
        disabled.log_step(1.5, loss=1.0)
    with pytest.raises(ValueError, match=r"expected a step >= 0, got -1"):
        disabled.log_approximation_error(-1, 0.1, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"single number for loss, got .* \(3,\)"):
        disabled.log_step(0, loss=torch.ones(3))
    with pytest.raises(TypeError, match=r"expected a number for cosine"):
        disabled.log_approximation_error(0, 0.1, 0.1, "high")
    with pytest.raises(
        ValueError, match=r"expected 3 images \(one per contribution\), got 2"
    ):
        disabled.log_rankings(torch.zeros(3), images=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"expected 3 labels .* got 4"):
        disabled.log_rankings([1.0, 2.0, 3.0], labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"contributions of shape \(n,\), got"):
        disabled.log_rankings(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"1 NaN or infinite values \(first at"):
        disabled.log_rankings([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"top_k >= 1, got 0"):
        disabled.log_rankings([1.0], top_k=0)
    with pytest.raises(ValueError, match=r"table rows together with labels"):
        disabled.log_rankings([{"index": 0, "contribution": 1.0}], labels=[1])
    with pytest.raises(ValueError, match=r"row 0 lacks the keys \['contribution'\]"):
        disabled.log_rankings([{"index": 0}])
    with pytest.raises(ValueError, match=r"expected finite values for 'h'"):
        disabled.log_histogram("h", [1.0, float("inf")])
    with pytest.raises(ValueError, match=r"1 <= num_bins <= 512"):
        disabled.log_histogram("h", [1.0], num_bins=1000)
    with pytest.raises(FileNotFoundError, match=r"no image file at"):
        disabled.log_image("plot", tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"without leading or trailing"):
        disabled.log_image("/plot", np.zeros((2, 2)))
    with pytest.raises(TypeError, match=r"mapping with str keys"):
        disabled.summary({1: 2})


def test_rank_samples_orders_by_sign_and_accepts_rows():
    contributions = [0.5, -0.2, 0.0, 1.5, -3.0, 0.5]
    helpful, harmful = rank_samples(
        "test", contributions, None, None, [10, 11, 12, 13, 14, 15], 3
    )
    assert [(r.rank, r.index) for r in helpful] == [(1, 13), (2, 10), (3, 15)]
    assert [(r.rank, r.index) for r in harmful] == [(1, 14), (2, 11)]

    rows = [
        {"index": 10 + i, "contribution": c, "label": i}
        for i, c in enumerate(contributions)
    ]
    from_rows = rank_samples("test", rows, None, None, None, 3)
    assert [r.index for r in from_rows[0]] == [13, 10, 15]
    assert [r.label for r in from_rows[1]] == [4, 1]


def test_log_table_checks_row_lengths(tmp_path):
    logger = WandbLogger(tmp_path / "off", mode="disabled")
    logger.log_table("debug/retrain", ["method", "test_accuracy"], [["none", 0.9]])
    with pytest.raises(
        ValueError, match=r"expected 2 values per row .* got a row of 1"
    ):
        logger.log_table("debug/retrain", ["method", "test_accuracy"], [["none"]])
    logger.finish()
    assert not (tmp_path / "off").exists()
