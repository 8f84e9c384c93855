"""Workspaces (lggseg.workspace): a profile's params merged over params.yaml in a git + DVC repo of
its own that never receives the real pipeline's committed results."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from lggseg.config import ConfigError, read_params
from lggseg.io import ORIGIN_FILE
from lggseg.workspace import main, origin_record, parse_sets, prepare_demo_workspace

REPO = Path(__file__).resolve().parents[1]


def _head(ws: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, check=True, capture_output=True, text=True).stdout


def test_prepare_merges_the_profile_and_leaves_real_results_out(tmp_path):
    ws = prepare_demo_workspace(REPO, tmp_path / "ws", REPO / "params.demo.yaml")
    params = read_params(ws / "params.yaml")
    demo, base = read_params(REPO / "params.demo.yaml"), read_params(REPO / "params.yaml")
    assert params["common"]["image_size"] == demo["common"]["image_size"] != base["common"]["image_size"]
    assert params["variants"] == base["variants"]  # untouched sections come from params.yaml
    assert (ws / "dvc.yaml").read_bytes() == (REPO / "dvc.yaml").read_bytes()
    assert (ws / "src" / "lggseg" / "workspace.py").is_file()
    assert not (ws / "dvc.lock").exists() and not (ws / "metrics").exists() and not (ws / "plots").exists()
    assert (ws / ".git").is_dir() and (ws / ".dvc").is_dir()
    # the project's commit, which the workspace's own git history does not name
    origin = json.loads((ws / ORIGIN_FILE).read_text())
    project_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert origin["commit"] == project_head and origin["commit"] != _head(ws).strip()
    assert isinstance(origin["uncommitted_changes"], bool)
    # a second preparation with nothing changed makes no new commit
    head = _head(ws)
    prepare_demo_workspace(REPO, ws, REPO / "params.demo.yaml")
    assert _head(ws) == head


def test_a_broken_profile_is_rejected_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochs": 0}}))
    with pytest.raises(ConfigError, match="epochs"):
        prepare_demo_workspace(REPO, tmp_path / "ws", bad)
    assert not (tmp_path / "ws").exists()


def test_prepare_only_does_not_run_the_pipeline(tmp_path, capsys):
    assert main(["--repo", str(REPO), "--dest", str(tmp_path / "ws"), "--overrides",
                 str(REPO / "params.cpu.yaml"), "--prepare-only"]) == 0
    assert "ready" in capsys.readouterr().out
    assert read_params(tmp_path / "ws" / "params.yaml")["train"]["epochs"] == 8
    assert not (tmp_path / "ws" / "data").exists() and not (tmp_path / "ws" / "dvc.lock").exists()


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["fetch.source=/data/kaggle_3m"], {"fetch": {"source": "/data/kaggle_3m"}}),
        (["train.epochs=3", "train.max_minutes=2.5"], {"train": {"epochs": 3, "max_minutes": 2.5}}),
        (["evaluate.tta=true"], {"evaluate": {"tta": True}}),
        (["train.max_minutes=null"], {"train": {"max_minutes": None}}),
        ([], {}),
    ],
)
def test_set_items_become_nested_overrides(items, expected):
    assert parse_sets(items) == expected


@pytest.mark.parametrize("item", ["fetch.source", "=x", "train..epochs=3"])
def test_malformed_set_items_are_rejected(item):
    with pytest.raises(ConfigError, match="--set"):
        parse_sets([item])


def test_set_overrides_the_profile_and_is_validated(tmp_path, capsys):
    ws = prepare_demo_workspace(REPO, tmp_path / "ws", REPO / "params.laptop.yaml", ["fetch.source=/data/kaggle_3m"])
    params = read_params(ws / "params.yaml")
    assert params["fetch"]["source"] == "/data/kaggle_3m"
    assert params["train"]["max_minutes"] == read_params(REPO / "params.laptop.yaml")["train"]["max_minutes"]
    assert "laptop" in params["variants"]
    # a nonsense value is refused with one line and exit 2, before anything is written
    assert main(["--repo", str(REPO), "--dest", str(tmp_path / "bad"), "--overrides", str(REPO / "params.laptop.yaml"),
                 "--set", "train.max_minutes=-1", "--prepare-only"]) == 2
    assert "max_minutes" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_summary_lines_show_raw_and_post_processed_test_numbers(tmp_path):
    from lggseg.workspace import summary_lines

    (tmp_path / "metrics").mkdir()
    block = {"dice_slice_mean": 0.8, "dice_tumour_slices": 0.6, "dice_patient_3d": 0.7, "dice_micro": 0.75,
             "empty_fp_rate": 0.04}
    (tmp_path / "metrics" / "laptop.json").write_text(
        __import__("json").dumps({**block, "postprocessed": {**block, "dice_slice_mean": 0.86, "empty_fp_rate": 0.01}}))
    (tmp_path / "metrics" / "fetch.json").write_text('{"files": 3}')  # not a metrics file of a variant
    lines = summary_lines(tmp_path)
    assert lines[0] == ("  laptop test: dice_slice_mean 0.8000, dice_tumour_slices 0.6000, dice_patient_3d 0.7000, "
                        "dice_micro 0.7500, empty_fp_rate 0.0400")
    assert lines[1].startswith("  laptop test, post-processed: dice_slice_mean 0.8600") and "empty_fp_rate 0.0100" in lines[1]
    assert len(lines) == 3 and "models/laptop" in lines[2]


def test_demo_table_lines_are_marked_synthetic_and_show_every_variant(tmp_path):
    import json

    from lggseg.workspace import demo_table_lines

    (tmp_path / "metrics").mkdir()
    training = {"23": {"epochs_done": 2, "best_val_dice": 0.8123}}
    (tmp_path / "metrics" / "unet.json").write_text(json.dumps(
        {"dice_slice_mean": 0.9, "dice_tumour_slices": 0.41, "dice_patient_3d": None, "empty_fp_rate": 0.05,
         "provenance": {"training": training}}))
    (tmp_path / "metrics" / "regnet.json").write_text(json.dumps(
        {"dice_slice_mean": 0.7, "dice_tumour_slices": 0.0, "dice_patient_3d": 0.0, "empty_fp_rate": 0.0}))
    (tmp_path / "metrics" / "demo_time.json").write_text('{"seconds": 3}')  # not a variant
    lines = demo_table_lines(tmp_path)
    assert "SYNTHETIC" in lines[0]
    assert lines[1].split() == ["variant", "epochs", "val", "Dice", "slice-mean", "tumour", "slices", "3D",
                                "empty-slice", "FP"]
    assert lines[2].split() == ["regnet", "?", "-", "0.700", "0.000", "0.000", "0.000"]  # no provenance: "?"/"-"
    assert lines[3].split() == ["unet", "2", "0.812", "0.900", "0.410", "-", "0.050"]
    assert len(lines) == 4


def test_the_origin_says_whether_mirrored_files_differed_from_the_commit(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "src.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    assert origin_record(tmp_path)["uncommitted_changes"] is False
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "new.json").write_text("{}")  # results are not mirrored: still clean
    assert origin_record(tmp_path)["uncommitted_changes"] is False
    (tmp_path / "src.py").write_text("a = 2\n")
    origin = origin_record(tmp_path)
    assert origin["uncommitted_changes"] is True and len(origin["commit"]) == 40
