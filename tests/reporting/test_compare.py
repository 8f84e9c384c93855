"""lggseg compare: the split-leakage table (and any two metrics files) side by side."""

from __future__ import annotations

import json

import pytest
from test_report import metrics_file

from lggseg.cli import main as cli_main
from lggseg.reporting.compare import compare_markdown, compare_rows


def _row(rows, key):
    return next(r for r in rows if r[0].split(" ")[0] == key)


def test_rows_by_hand():
    a = metrics_file(0.80)
    b = metrics_file(0.90, hd95_px=3.0, n_test_slices=500, dice_patient_3d=None)
    rows = compare_rows(a, b)
    assert _row(rows, "dice_slice_mean") == ["dice_slice_mean (%)", "80.00", "90.00", "+10.00", "+12.5 %"]
    assert _row(rows, "hd95_px") == ["hd95_px", "4.500", "3.000", "-1.500", "-33.3 %"]
    assert _row(rows, "n_test_slices") == ["n_test_slices", "600", "500", "-100", "-16.7 %"]
    # undefined metrics give no difference
    assert _row(rows, "dice_patient_3d") == ["dice_patient_3d (%)", "78.00", "n/a", "n/a", "n/a"]


def test_relative_change_from_zero_is_undefined():
    rows = compare_rows(metrics_file(0.8, empty_fp_rate=0.0), metrics_file(0.8, empty_fp_rate=0.1))
    assert _row(rows, "empty_fp_rate") == ["empty_fp_rate (%)", "0.00", "10.00", "+10.00", "n/a"]


def test_markdown_header_names_the_runs():
    lines = compare_markdown(metrics_file(0.8), metrics_file(0.9), ("patient split", "slice split"))
    assert lines[0] == "| metric | patient split | slice split | slice split - patient split | relative |"
    with pytest.raises(ValueError):
        compare_markdown(metrics_file(0.8), metrics_file(0.9), ("one",))


def test_cli(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(metrics_file(0.8)))
    b.write_text(json.dumps(metrics_file(0.9)))
    assert cli_main(["compare", str(a), str(b), "--labels", "P", "S"]) == 0
    out = capsys.readouterr().out
    assert "| dice_slice_mean (%) | 80.00 | 90.00 | +10.00 | +12.5 % |" in out
    assert cli_main(["compare", str(a), str(b), "--postprocessed"]) == 0
    assert "| dice_slice_mean (%) | 80.40 | 90.40 |" in capsys.readouterr().out
    assert cli_main(["compare", str(a), str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_cli_reads_snapshot_folders(tmp_path, capsys):
    """``lggseg compare results/<a> results/<b>``: each folder's metrics/<variant>.json, with provenance lines."""
    for name, dice in (("patient", 0.8), ("slice", 0.9)):
        folder = tmp_path / name / "metrics"
        folder.mkdir(parents=True)
        data = metrics_file(dice)
        if name == "slice":
            data["provenance"] = {"image_size": 64, "data": {"source": "local", "split_unit": "slice"},
                                  "seeds": {"split": 23, "train": [23]}, "git_commit": "abcdef1234567"}
        (folder / "v.json").write_text(json.dumps(data))
    assert cli_main(["compare", str(tmp_path / "patient"), str(tmp_path / "slice"), "--labels", "P", "S"]) == 0
    out = capsys.readouterr().out
    assert "| dice_slice_mean (%) | 80.00 | 90.00 | +10.00 | +12.5 % |" in out
    assert "P: provenance not recorded" in out
    assert "S: local data (no fingerprint), slice split seed 23 · 64 px" in out
    assert "commit abcdef1234" in out
    # a folder with two variants needs --variant
    (tmp_path / "slice" / "metrics" / "w.json").write_text(json.dumps(metrics_file(0.7)))
    assert cli_main(["compare", str(tmp_path / "patient"), str(tmp_path / "slice")]) == 2
    assert "--variant" in capsys.readouterr().err
    assert cli_main(["compare", str(tmp_path / "patient"), str(tmp_path / "slice"), "--variant", "v"]) == 0
    assert "| 80.00 | 90.00 |" in capsys.readouterr().out
