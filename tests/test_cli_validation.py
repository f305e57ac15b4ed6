"""Settings no run can use fail at once with one line, before any work."""

import json
from pathlib import Path

import pytest

from hypergrad import cli

CIFAR = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg-test"
)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "expected --epochs >= 1, got 0"),
        (["--batch-size", "0"], "expected --batch-size >= 1, got 0"),
        (["--batch-size", "-5"], "expected --batch-size >= 1, got -5"),
        (["--lr", "-1"], "expected a finite --lr > 0, got -1.0"),
        (["--lr", "nan"], "expected a finite --lr > 0, got nan"),
        (["--chunk-size", "0"], "expected --chunk-size >= 1, got 0"),
        (["--milestones", "-1"], "expected --milestones >= 0, got [-1]"),
        (["--gamma", "-1"], "expected --gamma in (0, 1], got -1.0"),
        (["--momentum", "1"], "expected --momentum in [0, 1), got 1.0"),
        (["--explain", "-1"], "expected --explain >= 0, got -1"),
    ],
)
def test_bad_settings_give_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = cli.main(["run", "--wandb", "disabled", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"hypergrad: error: {message}\n"
    assert not out.exists()


def test_binary_track_indices_file(tmp_path, capsys):
    garbage = tmp_path / "tracked.bin"
    garbage.write_bytes(bytes(range(128, 256)))
    args = ["run", "--epochs", "1", "--wandb", "disabled", "--no-progress"]
    code = cli.main(
        [*args, "--out", str(tmp_path / "o"), "--track-indices", str(garbage)]
    )
    assert code == 2
    assert "is not text" in capsys.readouterr().err


def test_a_failure_mid_run_is_recorded(tmp_path, monkeypatch):
    import hypergrad

    def broken(self, *args):
        if self.step_count == 2:
            raise RuntimeError("disk on fire")
        return original(self, *args)

    original = hypergrad.Tracker.step
    monkeypatch.setattr(hypergrad.Tracker, "step", broken)
    out = tmp_path / "run"
    args = ["run", "--epochs", "1", "--track", "4", "--wandb", "disabled"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main([*args, "--mode", "exact", "--out", str(out), "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["steps"] == 2
    assert "disk on fire" in summary["error"]
    assert (out / "state.pt").is_file()  # the two steps done are kept


@pytest.mark.skipif(not CIFAR.is_dir(), reason="no CIFAR-10 JPEGs beside the project")
def test_cifar10_from_the_test_archive_alone(tmp_path):
    out = tmp_path / "cifar"
    args = ["run", "--dataset", "cifar10", "--data-dir", str(CIFAR), "--model", "cnn"]
    sizes = ["--train-size", "200", "--val-size", "50", "--test-size", "100"]
    rest = ["--epochs", "1", "--track", "4", "--mode", "approx", "--no-progress"]
    code = cli.main([*args, *sizes, *rest, "--wandb", "disabled", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
