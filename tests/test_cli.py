"""End-to-end tests of the ``hypergrad`` command on real MNIST.

Each run is small (300 training samples, one epoch, K = 6) so the file stays
within a couple of minutes on two CPU cores. The main run is shared by the
tests that inspect its outputs. W&B runs only offline, with its folders
inside pytest's temporary directory.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hypergrad as hg
from hypergrad import cli
from hypergrad import data as hgdata
from hypergrad.attribution import contributions
from hypergrad.jobsetup import RunConfig, loss_fn, make_model

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(
    not MNIST.is_dir(), reason=f"MNIST files not found at {MNIST}"
)
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")

TRAIN, VAL, TEST, EPOCHS, BATCH, TRACK = 300, 100, 200, 1, 32, 6
STEPS = math.ceil(TRAIN / BATCH) * EPOCHS
CONTRIBUTION_COLUMNS = ["test_index", "train_index", "mode", "contribution"]
CURVE_COLUMNS = ["step", "abs_error", "rel_error", "cosine"]
W_AND_B_CURVE = {
    "abs_error": "approx_error/abs",
    "rel_error": "approx_error/rel",
    "cosine": "approx_error/cosine",
}

# The W&B tests' reader of offline run files, reused here.
try:
    from test_integrations_wandb import history_rows, read_records, records_of
except ImportError:  # that file is being reworked: read the records directly
    from hypergrad.integrations._wandb_records import iter_records

    def read_records(run_file):
        return list(iter_records(run_file))

    def _kind(record):
        return record.WhichOneof("record_type")

    def history_rows(records):
        return [
            {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            for record in records
            if _kind(record) == "history"
        ]

    def records_of(records, kind):
        return [getattr(r, kind) for r in records if _kind(r) == kind]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def quiet_environment(tmp_path_factory):
    """W&B offline, with HOME, XDG and matplotlib folders in a temp folder."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("WANDB_"):
                patch.delenv(name)
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("HOME", str(home))
        for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            patch.setenv(name, str(home / name.lower()))
        patch.setenv("MPLCONFIGDIR", str(home / "matplotlib"))
        if HAS_WANDB:
            import wandb

            wandb.teardown()
        yield home
        if HAS_WANDB:
            import wandb

            wandb.teardown()


def run_args(out: Path, *, model="cnn", mode="both", wandb="offline", **changes):
    """The ``hypergrad run`` arguments of the small MNIST job, with changes."""
    options = {
        "--dataset": "mnist",
        "--data-dir": str(MNIST),
        "--model": model,
        "--train-size": TRAIN,
        "--val-size": VAL,
        "--test-size": TEST,
        "--epochs": EPOCHS,
        "--batch-size": BATCH,
        "--track": TRACK,
        "--mode": mode,
        "--wandb": wandb,
        "--device": "cpu",  # the library is compared with itself on the CPU
        "--out": str(out),
    }
    for key, value in changes.items():
        options["--" + key.replace("_", "-")] = value
    argv = ["run"]
    for key, value in options.items():
        if value is not None:
            argv += [key, str(value)]
    return argv + ["--no-progress"]


def read_csv(path: Path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def load_state(out: Path) -> dict:
    return torch.load(out / "state.pt", map_location="cpu", weights_only=True)


def mnist_test_points(state: dict):
    """The explained test points, read from the MNIST files via the split."""
    images, labels = hgdata.load_mnist(MNIST, train=False)
    images = hgdata.normalize(images, hgdata.MNIST_MEAN, hgdata.MNIST_STD)
    rows = state["split"]["test"][state["explained_positions"]]
    return images[rows], labels[rows], rows


def rebuilt_model(summary: dict):
    config = RunConfig(**summary["config"])
    return make_model(config, (1, 28, 28))


def library_contributions(summary, state, mode, x, y, t_buffers=None):
    model = rebuilt_model(summary)
    return contributions(
        hg.FunctionalModel(model),
        loss_fn,
        state["params"],
        state["buffers"],
        state["hypergradients"][mode],
        {} if t_buffers is None else t_buffers,
        x,
        y,
    )


def csv_table(rows, mode, test_indices, train_indices) -> torch.Tensor:
    """The CSV's contributions of one mode as a (test points, K) table."""
    by_pair = {
        (int(r["test_index"]), int(r["train_index"])): float(r["contribution"])
        for r in rows
        if r["mode"] == mode
    }
    return torch.tensor(
        [[by_pair[(t, i)] for i in train_indices] for t in test_indices],
        dtype=torch.float64,
    )


def check_contributions_match(out: Path, mode: str):
    summary = json.loads((out / "summary.json").read_text())
    state = load_state(out)
    x, y, test_rows = mnist_test_points(state)
    assert test_rows.tolist() == summary["explained_test_indices"]
    train_indices = state["split"]["train"][state["tracked_positions"]].tolist()
    assert train_indices == summary["tracked_indices"]
    # Tangents of the float buffers (BatchNorm statistics; exact mode only),
    # under the key the report suggests; absent from state.pt so far.
    t_buffers = state.get("buffer_tangents", {}).get(mode, {})
    ours = library_contributions(summary, state, mode, x, y, t_buffers).double()
    _, rows = read_csv(out / "contributions.csv")
    theirs = csv_table(rows, mode, test_rows.tolist(), train_indices)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max())


def single_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("hypergrad: error: "), lines[0]
    return lines[0]


def wandb_run_file(out: Path) -> Path:
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    return run_file


# ------------------------------------------------- the main run (cnn, both)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """One ``hypergrad run`` in-process; its outputs are shared by the tests."""
    if not MNIST.is_dir():
        pytest.skip(f"MNIST files not found at {MNIST}")
    out = tmp_path_factory.mktemp("cnn") / "run"
    code = cli.main(run_args(out))
    return {"out": out, "code": code}


@needs_mnist
def test_run_exits_zero_and_writes_every_file(cnn_run):
    assert cnn_run["code"] == 0
    out = cnn_run["out"]
    for name in (
        "summary.json",
        "contributions.csv",
        "approximation_error.csv",
        "approximation_error.png",
        "influencers.png",
        "state.pt",
        "wandb",
    ):
        assert (out / name).exists(), name
    assert not list(out.glob("*.tmp"))


@needs_mnist
def test_summary_reports_config_accuracies_times_and_agreement(cnn_run):
    out = cnn_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    expected = {
        "dataset": "mnist",
        "data_dir": str(MNIST),
        "model": "cnn",
        "train_size": TRAIN,
        "val_size": VAL,
        "test_size": TEST,
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "track": TRACK,
        "mode": "both",
        "wandb": "offline",
        "out": str(out),
    }
    assert {k: config[k] for k in expected} == expected
    assert summary["status"] == "finished"
    assert summary["steps"] == STEPS
    assert summary["num_train"] == TRAIN
    for name in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert 0.0 <= summary[name] <= 1.0, name
    # One epoch on 300 images is far better than chance (0.1).
    assert summary["test_accuracy"] > 0.2
    assert summary["train_seconds_tracked"] > 0
    assert summary["train_seconds_plain"] > 0

    tracked = summary["tracked_indices"]
    assert len(tracked) == TRACK == len(set(tracked))
    assert all(0 <= i < 60_000 for i in tracked)
    assert len(summary["tracked_positions"]) == TRACK
    assert all(0 <= p < TRAIN for p in summary["tracked_positions"])

    agreement = summary["rank_agreement"]
    assert set(agreement) == {
        "spearman_all",
        "spearman_per_test_point_mean",
        f"top{config['top_k']}_overlap",
    }
    assert -1.0 <= agreement["spearman_all"] <= 1.0
    assert -1.0 <= agreement["spearman_per_test_point_mean"] <= 1.0
    assert 0.0 <= agreement[f"top{config['top_k']}_overlap"] <= 1.0


@needs_mnist
def test_summary_accuracy_and_indices_match_the_saved_state(cnn_run):
    out = cnn_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    state = load_state(out)
    split = state["split"]
    assert [len(split[k]) for k in ("train", "val", "test")] == [TRAIN, VAL, TEST]
    tracked = split["train"][state["tracked_positions"]]
    assert tracked.tolist() == summary["tracked_indices"]
    assert state["tracked_positions"].tolist() == summary["tracked_positions"]

    images, labels = hgdata.load_mnist(MNIST, train=False)
    images = hgdata.normalize(images, hgdata.MNIST_MEAN, hgdata.MNIST_STD)
    fmodel = hg.FunctionalModel(rebuilt_model(summary))
    with torch.no_grad():
        logits, _ = fmodel(
            state["params"], state["buffers"], images[split["test"]], train=False
        )
    accuracy = (logits.argmax(1) == labels[split["test"]]).double().mean()
    assert float(accuracy) == pytest.approx(summary["test_accuracy"], abs=1e-12)


@needs_mnist
def test_contributions_csv_has_both_modes_for_every_pair(cnn_run):
    out = cnn_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    columns, rows = read_csv(out / "contributions.csv")
    assert columns == CONTRIBUTION_COLUMNS
    explained = summary["explained_test_indices"]
    assert len(explained) >= 1
    assert len(rows) == len(explained) * TRACK * 2
    assert {r["mode"] for r in rows} == {"exact", "approx"}
    keys = {(int(r["test_index"]), int(r["train_index"]), r["mode"]) for r in rows}
    assert len(keys) == len(rows)
    assert {t for t, _, _ in keys} == set(explained)
    assert {i for _, i, _ in keys} == set(summary["tracked_indices"])
    assert all(math.isfinite(float(r["contribution"])) for r in rows)


@needs_mnist
def test_rank_agreement_matches_the_csv(cnn_run):
    from scipy.stats import spearmanr

    out = cnn_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    _, rows = read_csv(out / "contributions.csv")
    tests, train = summary["explained_test_indices"], summary["tracked_indices"]
    exact = csv_table(rows, "exact", tests, train)
    approx = csv_table(rows, "approx", tests, train)
    agreement = summary["rank_agreement"]

    overall = spearmanr(exact.flatten().numpy(), approx.flatten().numpy())
    assert agreement["spearman_all"] == pytest.approx(overall.statistic, abs=1e-9)
    per_row = [
        spearmanr(e.numpy(), a.numpy()).statistic
        for e, a in zip(exact, approx, strict=True)
    ]
    assert agreement["spearman_per_test_point_mean"] == pytest.approx(
        sum(per_row) / len(per_row), abs=1e-9
    )
    k = min(summary["config"]["top_k"], TRACK)
    overlaps = []
    for e, a in zip(exact, approx, strict=True):
        top_e = set(e.abs().argsort(descending=True)[:k].tolist())
        top_a = set(a.abs().argsort(descending=True)[:k].tolist())
        overlaps.append(len(top_e & top_a) / k)
    assert agreement[f"top{summary['config']['top_k']}_overlap"] == pytest.approx(
        sum(overlaps) / len(overlaps), abs=1e-12
    )


@needs_mnist
def test_approximation_error_csv_has_one_finite_row_per_step(cnn_run):
    columns, rows = read_csv(cnn_run["out"] / "approximation_error.csv")
    assert columns == CURVE_COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    for r in rows:
        abs_error, rel_error, cosine = (
            float(r["abs_error"]),
            float(r["rel_error"]),
            float(r["cosine"]),
        )
        assert math.isfinite(abs_error) and abs_error >= 0, r
        assert math.isfinite(rel_error) and rel_error >= 0, r
        assert math.isfinite(cosine) and -1.0 <= cosine <= 1.0, r
    # After one step the Hessian term has acted on zero tangents only.
    first = rows[0]
    assert float(first["rel_error"]) < 1e-5
    assert float(first["abs_error"]) < 1e-4
    assert float(first["cosine"]) > 1 - 1e-5
    # Later the dropped Hessian term shows.
    assert float(rows[-1]["abs_error"]) > float(first["abs_error"])


@needs_mnist
@pytest.mark.parametrize("name", ["approximation_error.png", "influencers.png"])
def test_plots_are_valid_png_files(cnn_run, name):
    from PIL import Image

    path = cnn_run["out"] / name
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.verify()
    assert width > 100 and height > 100
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert int(pixels.max()) > int(pixels.min())  # not a blank picture


@needs_mnist
@needs_wandb
def test_wandb_offline_history_has_one_value_per_step_equal_to_the_csv(cnn_run):
    out = cnn_run["out"]
    records = read_records(wandb_run_file(out))
    rows = history_rows(records)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(STEPS))
    assert all("train/lr" in r for r in train)
    assert [r["train/lr"] for r in train] == [0.05] * STEPS  # the default lr
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in train)

    curve = [r for r in rows if "approx_error/abs" in r]
    assert [r["step"] for r in curve] == list(range(STEPS))
    _, csv_rows = read_csv(out / "approximation_error.csv")
    for logged, written in zip(curve, csv_rows, strict=True):
        assert logged["step"] == int(written["step"])
        for column, key in W_AND_B_CURVE.items():
            assert float(logged[key]) == float(written[column]), (column, logged)
    (exit_record,) = records_of(records, "exit")
    assert exit_record.exit_code == 0


@needs_mnist
def test_csv_contributions_equal_the_library_approx(cnn_run):
    check_contributions_match(cnn_run["out"], "approx")


@needs_mnist
def test_csv_contributions_equal_the_library_exact_with_batchnorm(cnn_run):
    check_contributions_match(cnn_run["out"], "exact")


@needs_mnist
def test_lenet5_run_contributions_equal_the_library_in_both_modes(tmp_path):
    """LeNet-5 has no BatchNorm, so state.pt suffices for exact mode too."""
    out = tmp_path / "lenet5"
    assert cli.main(run_args(out, model="lenet5", wandb="disabled")) == 0
    _, rows = read_csv(out / "contributions.csv")
    assert {r["mode"] for r in rows} == {"exact", "approx"}
    check_contributions_match(out, "approx")
    check_contributions_match(out, "exact")


# ------------------------------------------------------------------ errors


def _linked_copy(folder: Path, *, keep: tuple[str, ...]) -> Path:
    folder.mkdir()
    for name in keep:
        (folder / name).symlink_to(MNIST / name)
    return folder


@needs_mnist
def test_missing_data_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = cli.main(run_args(tmp_path / "out", data_dir=missing))
    assert code == 2
    line = single_error_line(capsys)
    assert str(missing) in line and "--data-dir" in line
    assert not (tmp_path / "out").exists()


@needs_mnist
def test_split_larger_than_the_data_is_one_line(tmp_path, capsys):
    code = cli.main(run_args(tmp_path / "out", train_size=70_000))
    assert code == 2
    line = single_error_line(capsys)
    assert "70100" in line and "60000" in line
    assert not (tmp_path / "out").exists()


@needs_mnist
def test_track_larger_than_the_training_set_is_one_line(tmp_path, capsys):
    code = cli.main(run_args(tmp_path / "out", train_size=50, track=51))
    assert code == 2
    line = single_error_line(capsys)
    assert "--track 51" in line and "50" in line
    assert not (tmp_path / "out").exists()


@needs_mnist
@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "raw"])
def test_truncated_idx_file_is_one_line(tmp_path, capsys, compressed):
    folder = _linked_copy(
        tmp_path / "mnist",
        keep=(
            "train-images-idx3-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ),
    )
    whole = (MNIST / "train-labels-idx1-ubyte.gz").read_bytes()
    if compressed:
        (folder / "train-labels-idx1-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    else:
        raw = gzip.decompress(whole)
        (folder / "train-labels-idx1-ubyte").write_bytes(raw[:-100])
    code = cli.main(run_args(tmp_path / "out", data_dir=folder))
    assert code == 2
    line = single_error_line(capsys)
    assert "train-labels-idx1-ubyte" in line
    assert "truncated" in line or "damaged" in line
    assert not (tmp_path / "out").exists()


def test_lenet5_on_digits_is_one_line(tmp_path, capsys):
    pytest.importorskip("sklearn")
    argv = ["run", "--dataset", "digits", "--model", "lenet5", "--wandb", "disabled"]
    code = cli.main(argv + ["--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    line = single_error_line(capsys)
    assert "28x28" in line and "8x8" in line
    assert not (tmp_path / "out").exists()


@needs_mnist
def test_tracked_state_too_large_for_memory_reports_gib(tmp_path, capsys, monkeypatch):
    import hypergrad.job
    import hypergrad.jobsetup

    eight_gib = 8 * 2**30
    for module in (hypergrad.job, hypergrad.jobsetup):
        monkeypatch.setattr(module, "available_memory_bytes", lambda device: eight_gib)
    argv = run_args(tmp_path / "out", model="lenet5", train_size=50_000, track=50_000)
    assert cli.main(argv) == 2
    line = single_error_line(capsys)
    # K x (weights + momentum) x two modes x 61,706 float32 parameters.
    need = 50_000 * 61_706 * 2 * 2 * 4 / 2**30
    assert f"{need:.1f} GiB" in line, line
    assert "8.0 GiB" in line
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------- help, modes, ^C


def test_help_of_the_module_and_of_the_console_script(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    module = subprocess.run(
        [sys.executable, "-m", "hypergrad", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert module.returncode == 0, module.stderr
    assert "usage: hypergrad" in module.stdout
    assert "demo" in module.stdout and "run" in module.stdout

    script = Path(sys.executable).parent / "hypergrad"
    if not script.exists():
        pytest.skip(f"no console script at {script}")
    run_help = subprocess.run(
        [str(script), "run", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert run_help.returncode == 0, run_help.stderr
    assert "usage: hypergrad run" in run_help.stdout
    for option in ("--dataset", "--track", "--mode", "--wandb", "--out"):
        assert option in run_help.stdout
    assert list(tmp_path.iterdir()) == []


@needs_mnist
def test_wandb_disabled_writes_no_wandb_folder(tmp_path):
    out = tmp_path / "out"
    assert cli.main(run_args(out, model="mlp", wandb="disabled")) == 0
    assert (out / "summary.json").is_file()
    assert (out / "contributions.csv").is_file()
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert [p for p in tmp_path.rglob("*") if "wandb" in p.name] == []


@needs_mnist
@pytest.mark.parametrize("wandb_mode", ["offline", "disabled"])
def test_interrupt_returns_130_and_leaves_readable_files(
    tmp_path, capsys, monkeypatch, wandb_mode
):
    if wandb_mode == "offline" and not HAS_WANDB:
        pytest.skip("wandb is not installed")
    real_step = hg.Tracker.step
    calls = []

    def step_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(hg.Tracker, "step", step_then_interrupt)
    out = tmp_path / "out"
    assert cli.main(run_args(out, model="mlp", wandb=wandb_mode)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "interrupted" in err and str(out) in err

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["steps"] == 3
    columns, rows = read_csv(out / "approximation_error.csv")
    assert columns == CURVE_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(math.isfinite(float(r["abs_error"])) for r in rows)
    if wandb_mode == "offline":
        records = read_records(wandb_run_file(out))
        steps = [r["step"] for r in history_rows(records) if "train/loss" in r]
        assert steps == [0, 1, 2]
        (exit_record,) = records_of(records, "exit")
        assert exit_record.exit_code != 0
