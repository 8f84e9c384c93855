"""lggseg.ablation: arms are validated before any training, chosen on validation only, and a killed
search resumes; lggseg.reporting.snapshot copies a workspace's results and refuses large files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lggseg.ablation import arm_params, choose, read_arms, run_ablation
from lggseg.config import ConfigError, deep_merge, read_params
from lggseg.errors import DataError
from lggseg.reporting.snapshot import write_snapshot

REPO = Path(__file__).resolve().parents[1]


def _table(rows):
    cols = ["arm", "val_dice_slice_mean", "val_dice_patient_3d", "test_dice_slice_mean", "test_dice_patient_3d"]
    return pd.DataFrame(rows, columns=cols)


# (rows: arm, val slice-mean, val 3D, test slice-mean, test 3D), expected choice
CHOICES = [
    ([("a", 0.80, 0.60, 0.10, 0.10), ("b", 0.70, 0.90, 0.99, 0.99)], "a"),  # the test columns never count
    ([("a", 0.800, 0.60, 0, 0), ("b", 0.797, 0.70, 0, 0)], "b"),  # within the 0.005 tie: better val 3D
    ([("a", 0.800, 0.60, 0, 0), ("b", 0.790, 0.70, 0, 0)], "a"),  # outside the tie
    ([("a", 0.80, 0.60, 0, 0), ("b", 0.80, 0.60, 0, 0)], "a"),  # a full tie keeps the first
]


@pytest.mark.parametrize(("rows", "expected"), CHOICES)
def test_choose_reads_validation_only(rows, expected):
    assert choose(_table(rows)) == expected


def test_choose_needs_rows():
    with pytest.raises(ConfigError, match="no ablation rows"):
        choose(_table([]))


@pytest.mark.parametrize(
    ("text", "match"),
    [("[1, 2]", "mapping"), ("{}", "non-empty mapping"), ("{a: 3}", "arm .a.")],
)
def test_read_arms_rejects_what_is_not_a_table_of_overrides(tmp_path, text, match):
    path = tmp_path / "arms.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_arms(path)


def test_a_broken_arm_is_rejected_before_training():
    base = deep_merge(read_params(REPO / "params.yaml"), read_params(REPO / "params.laptop.yaml"))
    assert arm_params(base, {"train": {"epochs": 3}}, "laptop")["train"]["epochs"] == 3
    with pytest.raises(ConfigError, match="image_size"):
        arm_params(base, {"common": {"image_size": 100}}, "laptop")
    with pytest.raises(ConfigError, match="not in the profile"):
        arm_params(base, {}, "nope")


@pytest.mark.slow
def test_a_search_on_tiny_data_writes_rows_and_resumes(store_dir, tmp_path, capsys):
    over = {
        "common": {"image_size": 64, "device": "cpu"},
        "model": {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 16, "attributes": False},
        "loss": {"terms": ["bce", "dice"]},
        "train": {"epochs": 1, "batch_size": 4, "num_workers": 0, "cpu_threads": 1, "warmup_epochs": 0,
                  "max_minutes": None},
        "evaluate": {"bootstrap_samples": 100, "batch_size": 8},
        "postprocess": {"largest_3d": True},
        "seeds": [3],
    }
    base = deep_merge(deep_merge(read_params(REPO / "params.yaml"), read_params(REPO / "params.laptop.yaml")), over)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    arms = {"plain": {}, "constant": {"train": {"lr_schedule": "constant"}}}
    (tmp_path / "arms.yaml").write_text(yaml.safe_dump(arms, sort_keys=False))
    out = tmp_path / "out"
    table = run_ablation(tmp_path / "base.yaml", tmp_path / "arms.yaml", "laptop", store_dir, out)
    assert list(table["arm"]) == ["plain", "constant"]
    for col in ("val_dice_slice_mean", "val_tta_pp_dice_patient_3d", "test_dice_micro", "train_minutes", "epochs_done"):
        assert table[col].notna().all(), col
    assert (out / "arms" / "plain" / "metrics_val.json").is_file()
    assert json.loads((out / "arms" / "plain" / "metrics_test_tta.json").read_text())["tta"] is True
    assert json.loads((out / "machine.json").read_text())["cores"] >= 1
    assert "chosen on validation" in capsys.readouterr().out
    # a rerun measures nothing again
    again = run_ablation(tmp_path / "base.yaml", tmp_path / "arms.yaml", "laptop", store_dir, out)
    assert "already measured" in capsys.readouterr().out
    assert again["val_dice_slice_mean"].tolist() == pytest.approx(table["val_dice_slice_mean"].tolist())


def _workspace(root: Path, size: int = 10) -> Path:
    ws = root / "ws"
    (ws / "metrics").mkdir(parents=True)
    (ws / "metrics" / "v.json").write_text(json.dumps({"dice_slice_mean": 0.5}))
    (ws / "data" / "eval" / "v").mkdir(parents=True)
    (ws / "data" / "eval" / "v" / "slices.csv").write_text("x" * size)
    (ws / "data" / "eval" / "v" / "patients.csv").write_text("p\n")
    (ws / "models" / "v" / "seed_23").mkdir(parents=True)
    (ws / "models" / "v" / "seed_23" / "result.json").write_text("{}")
    (ws / "models" / "v" / "seed_23" / "model.safetensors").write_bytes(b"w" * 100)
    (ws / "params.yaml").write_text("common: {}\n")
    return ws


def test_snapshot_copies_results_but_no_weights(tmp_path):
    ws = _workspace(tmp_path)
    dest = write_snapshot(ws, ["v"], tmp_path / "results" / "snap", "make laptop DATA=x", repo=tmp_path)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["metrics/v.json", "params.yaml", "rows/v/patients.csv", "rows/v/slices.csv", "snapshot.json",
                     "training/v/seed_23/result.json"]
    record = json.loads((dest / "snapshot.json").read_text())
    assert record["command"] == "make laptop DATA=x" and record["project_commit"] is None  # tmp_path is no git repo
    assert record["machine"]["cores"] >= 1


def test_snapshot_refuses_missing_results_and_large_files(tmp_path, monkeypatch):
    import lggseg.reporting.snapshot as snap

    ws = _workspace(tmp_path)
    with pytest.raises(DataError, match="not found"):
        write_snapshot(ws, ["other"], tmp_path / "s1", "cmd")
    monkeypatch.setattr(snap, "MAX_FILE_BYTES", 5)
    with pytest.raises(DataError, match="too large"):
        write_snapshot(ws, ["v"], tmp_path / "s2", "cmd")
