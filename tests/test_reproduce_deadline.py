"""``lggseg reproduce --deadline-minutes M`` and ``--synthetic N``: the training budget planned from the
measured phases with its margin, bad input in one line, and the dress rehearsal inside its deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lggseg.reporting.folder import FILES, read_folder
from lggseg.reproduce import deadline_margin, main, plan_deadline

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["regnet_attr_bce", "unet_bce"]
TINY = {
    "common": {"device": "cpu"},
    "model": {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 16, "attribute_hidden": 8},
    "train": {"batch_size": 4, "num_workers": 0, "cpu_threads": 1, "data_path": "resident", "epochs": 100},
    "evaluate": {"bootstrap_samples": 100},
}


@pytest.mark.parametrize(("deadline", "margin"), [(60, 10.0), (100, 10.0), (180, 18.0), (900, 90.0)])
def test_margin_is_ten_percent_and_at_least_ten_seconds(deadline, margin):
    assert deadline_margin(deadline) == pytest.approx(margin)


# deadline, spent, build per variant, seeds per variant, one evaluation -> training seconds, evaluations
@pytest.mark.parametrize(("deadline", "spent", "build", "seeds", "evaluation", "training", "evaluations"), [
    # 180 - 5 - 2 * (1 + 2 * 2) - (3 + 2 * 3) - 18
    (180, 5, {"a": 1, "b": 2}, {"a": 1, "b": 2}, 3, 138, {"a": 3, "b": 6}),
    # 60 - 20 - 2 * 0.5 - 4 - 10 (the margin's floor)
    (60, 20, {"a": 0.5}, {"a": 1}, 4, 25, {"a": 4}),
    # nothing left: 30 - 25 - 0 - 1 - 10
    (30, 25, {"a": 0}, {"a": 1}, 1, -6, {"a": 1}),
])
def test_plan_deadline(deadline, spent, build, seeds, evaluation, training, evaluations):
    plan = plan_deadline(deadline, spent, build, seeds, evaluation)
    assert plan["training_s"] == pytest.approx(training) and plan["evaluation_s"] == evaluations
    assert plan["save_s"] == plan["build_s"]


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    over = tmp_path / "tiny.yaml"
    over.write_text(yaml.safe_dump(TINY))
    return ["--variants", ",".join(VARIANTS), "--out", str(tmp_path / "out"), "--params", str(REPO / "params.yaml"),
            "--overrides", str(over), "--image-size", "64", *extra]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--synthetic", "0"], "--synthetic must be a positive number of cases"),
    (["--synthetic", "4", "--deadline-minutes", "0"], "--deadline-minutes must be a positive number"),
])
def test_bad_synthetic_or_deadline_is_one_line(tmp_path, capsys, extra, needle):
    assert main(_argv(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce: ") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_raw_and_synthetic_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--synthetic", "4", "--raw", str(tmp_path)))
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_deadline_too_short_to_train_stops_before_training(tmp_path, capsys):
    assert main(_argv(tmp_path, "--synthetic", "4", "--deadline-minutes", "0.1", "--work", str(tmp_path / "w"))) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars of the synthetic cases
    assert err.startswith("reproduce: --deadline-minutes 0.1 is too short: ") and "no time to train" in err
    record = read_folder(tmp_path / "out")["environment"]
    assert record["deadline"]["planned"]["training_s"] <= 0 and record["deadline"]["planned"]["margin_s"] == 10
    assert not (tmp_path / "w" / "models").exists()  # nothing was trained


@pytest.mark.slow
def test_synthetic_rehearsal_ends_inside_its_deadline(tmp_path):
    """The done-when run of issue #20: ``--synthetic 4 --deadline-minutes 3`` with two variants (100 epochs
    asked for: the deadline, not the epochs, ends training) finishes inside 3 minutes with every output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lggseg.cli", "reproduce", *_argv(tmp_path, "--synthetic", "4", "--deadline-minutes", "3")]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert wall < 180, f"took {wall:.0f} s"
    assert "deadline 3 min: took " in res.stdout and "MISSED" not in res.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES.values())
    folder = read_folder(out)
    assert list(folder["metrics"]) == VARIANTS and folder["environment"]["data"]["source"] == "demo"
    record = json.loads((out / "environment.json").read_text())
    deadline = record["deadline"]
    assert deadline["met"] and deadline["actual"]["total_s"] <= 180
    assert 0 < deadline["planned"]["training_s"] < 180 - deadline["planned"]["margin_s"]
    for v in VARIANTS:
        seed = record["variants"][v]["seeds"]["23"]
        assert seed["stop_reason"].startswith("time budget") and seed["max_minutes"] == record["max_minutes"][v]
        assert len(folder["training"].query("variant == @v")) == seed["epochs_done"] >= 1
