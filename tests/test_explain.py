"""End-to-end tests of ``hypergrad explain`` on a tiny ``hypergrad run`` output.

The run (digits, 300 training samples, one epoch, K = 8, both modes, W&B
disabled) is made once by ``hypergrad.cli.main`` and shared; explain itself
runs with W&B offline, every folder inside pytest's temporary directory.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_experiments import quiet_home, run_command

import hypergrad as hg
from hypergrad import cli
from hypergrad.attribution import contributions
from hypergrad.experiments import explain
from hypergrad.jobsetup import JobError, RunConfig, loss_fn, make_model

HAS_WANDB = importlib.util.find_spec("wandb") is not None
TEST_SIZE, TOP, PER = 100, 5, 3


def command(argv: list[str]) -> int:
    return run_command(explain, "explain", argv)


@pytest.fixture(scope="module", autouse=True)
def quiet(tmp_path_factory):
    """HOME, XDG and matplotlib folders in a temporary folder; W&B offline."""
    with quiet_home(tmp_path_factory.mktemp("home")) as home:
        yield home


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    argv = ["run", "--dataset", "digits", "--epochs", "1", "--track", "8"]
    argv += ["--train-size", "300", "--val-size", "50", "--test-size", "200"]
    argv += ["--wandb", "disabled", "--device", "cpu", "--no-progress"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def explained(run_dir):
    mode = "offline" if HAS_WANDB else "disabled"
    argv = [str(run_dir), "--test-size", str(TEST_SIZE), "--top", str(TOP)]
    assert command([*argv, "--per-sample", str(PER), "--wandb", mode]) == 0
    return run_dir / "explain"


def read_rows(out: Path):
    with (out / "extreme_influencers.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def recompute(run_dir: Path, mode: str) -> tuple[torch.Tensor, dict]:
    """Contributions to the first test points, from the saved state."""
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "state.pt", weights_only=True)
    images, labels = hg.data.load_digits_dataset()
    rows = state["split"]["test"][:TEST_SIZE]
    config = RunConfig(**{**summary["config"], "milestones": ()})
    fmodel = hg.FunctionalModel(make_model(config, (1, 8, 8)))
    table = contributions(
        fmodel,
        loss_fn,
        state["params"],
        state["buffers"],
        state["hypergradients"][mode],
        state["buffer_tangents"][mode],
        images[rows],
        labels[rows],
    )
    return table, state


def test_files_and_columns(explained):
    columns, rows = read_rows(explained)
    assert columns == explain.COLUMNS
    assert len(rows) == TOP * PER
    assert (explained / "extreme_influencers.png").read_bytes()[:4] == b"\x89PNG"
    ranks = [int(r["rank"]) for r in rows]
    assert ranks == sorted(ranks) and set(ranks) == set(range(1, TOP + 1))


def test_average_contributions_are_sorted_and_recomputed(run_dir, explained):
    _, rows = read_rows(explained)
    listed = {}
    for row in rows:
        listed.setdefault(int(row["rank"]), row)
    values = [float(listed[r]["avg_abs_contribution"]) for r in sorted(listed)]
    assert values == sorted(values, reverse=True)

    table, state = recompute(run_dir, "exact")
    avg_abs = table.abs().mean(dim=0)
    order = avg_abs.argsort(descending=True)[:TOP]
    tracked = state["split"]["train"][state["tracked_positions"]]
    assert [int(listed[r]["train_index"]) for r in sorted(listed)] == tracked[
        order
    ].tolist()
    torch.testing.assert_close(
        torch.tensor(values), avg_abs[order], rtol=1e-6, atol=0.0
    )
    test_rows = {int(i): z for z, i in enumerate(state["split"]["test"][:TEST_SIZE])}
    column = {int(i): c for c, i in enumerate(tracked)}
    for row in rows:
        z, c = test_rows[int(row["test_index"])], column[int(row["train_index"])]
        assert float(row["contribution"]) == pytest.approx(float(table[z, c]), rel=1e-6)
    # Each influencer's test points are those with the largest |C|, in order.
    for r, row in listed.items():
        c = column[int(row["train_index"])]
        shown = [int(x["test_index"]) for x in rows if int(x["rank"]) == r]
        best = table[:, c].abs().topk(PER).indices
        assert shown == state["split"]["test"][best].tolist()


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_tables(explained):
    from hypergrad.integrations._wandb_records import iter_records

    (run_file,) = (explained / "wandb").rglob("run-*.wandb")
    keys = set()
    for record in iter_records(run_file):
        if record.WhichOneof("record_type") == "history":
            keys |= {
                item.key or "/".join(item.nested_key) for item in record.history.item
            }
    # Tables and images are logged as nested values: their keys are prefixes.
    names = {key.split("/_")[0].removesuffix("/artifact_path") for key in keys}
    tables = {"influence/top_helpful/extreme_influencers"}
    tables.add("influence/top_harmful/extreme_influencers")
    assert names & tables
    assert "plots/extreme_influencers" in names


def test_approx_mode_into_another_folder(run_dir, tmp_path):
    out = tmp_path / "approx"
    argv = [str(run_dir), "--mode", "approx", "--test-size", "20", "--top", "2"]
    assert command([*argv, "--wandb", "disabled", "--out", str(out)]) == 0
    _, rows = read_rows(out)
    assert len(rows) == 2 * 6  # --per-sample defaults to 6


def test_not_a_run_folder(tmp_path):
    with pytest.raises(JobError, match=r"RUN_DIR .*missing is not a folder"):
        command([str(tmp_path / "missing"), "--wandb", "disabled"])
    with pytest.raises(JobError, match=r"is not a hypergrad run \(no summary\.json\)"):
        command([str(tmp_path), "--wandb", "disabled"])
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(JobError, match=r"summary\.json is not a run summary"):
        command([str(tmp_path), "--wandb", "disabled"])


def test_missing_state(run_dir, tmp_path):
    shutil.copy(run_dir / "summary.json", tmp_path / "summary.json")
    with pytest.raises(JobError, match=r"has no state\.pt \(run status: finished\)"):
        command([str(tmp_path), "--wandb", "disabled"])


def test_mode_the_run_does_not_have(run_dir, tmp_path):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["config"]["mode"] = "exact"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    state = torch.load(run_dir / "state.pt", weights_only=True)
    for key in ("hypergradients", "buffer_tangents"):
        del state[key]["approx"]
    torch.save(state, tmp_path / "state.pt")
    message = r"the run has no approx hypergradients \(it ran --mode exact\); pass "
    with pytest.raises(JobError, match=message + r"--mode exact$"):
        command([str(tmp_path), "--mode", "approx", "--wandb", "disabled"])
