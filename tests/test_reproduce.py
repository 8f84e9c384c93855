"""``lggseg reproduce`` and ``lggseg report DIR``: validation before work, and the whole run on a tiny
synthetic dataset with albumentations and dvclive blocked, whose folder the report turns into tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lggseg.config import ConfigError, read_params
from lggseg.reporting.folder import FILES
from lggseg.reproduce import effective_params, main

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["regnet_attr_bce", "regnet_attr_bce_dice_outlier"]  # the two rows Figure 7 compares
TINY = {
    "common": {"device": "cpu"},
    "model": {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 16, "attribute_hidden": 8},
    "train": {"batch_size": 4, "num_workers": 0, "cpu_threads": 1, "data_path": "resident"},
    "evaluate": {"bootstrap_samples": 100},
}

# Imported first by the child (PYTHONPATH): albumentations, dvclive and OpenCV (which comes with
# albumentations) cannot be imported, and every
# attempt is reported on stderr (dvclive's is expected: the logger falls back to its own files).
BLOCKER = '''
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("albumentations", "dvclive", "cv2"):
            print(f"blocked import: {name}", file=sys.stderr)
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
'''


@pytest.fixture(scope="module")
def params():
    return read_params(REPO / "params.yaml")


def test_effective_params_merge_and_reduce(params):
    merged, runs = effective_params(params, VARIANTS, TINY, epochs=3, image_size=64, max_minutes=2.5)
    assert list(merged["variants"]) == VARIANTS and list(runs) == VARIANTS
    for run in runs.values():
        assert (run.train.epochs, run.train.max_minutes, run.common.image_size) == (3, 2.5, 64)
        assert run.model.encoder == "test_efficientnet" and run.train.data_path == "resident"
    # the command line wins over a variant's own train section
    own = {"variants": {"regnet_attr_bce": {"train": {"epochs": 9}}}}
    _, runs = effective_params(params, ["regnet_attr_bce"], own, epochs=2)
    assert runs["regnet_attr_bce"].train.epochs == 2


@pytest.mark.parametrize(("variants", "overrides", "message"), [
    (["nope"], {}, "unknown variant(s) nope"),
    (["regnet_bce", "regnet_bce"], {}, "names a variant twice"),
    ([], {}, "name at least one variant"),
    (["regnet_bce"], {"train": {"lr": -1}}, "train.lr"),
    (["regnet_bce"], {"common": {"image_size": 0}}, "image_size"),
])
def test_bad_input_is_a_config_error(params, variants, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        effective_params(params, variants, overrides)


def _one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce: ") and err.count("\n") == 1 and needle in err


def test_cli_errors_are_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    _one_line_exit_2(capsys, ["--raw", str(tmp_path / "missing"), "--variants", "regnet_bce", "--out", str(out)],
                     "no such folder")
    raw = tmp_path / "raw"
    raw.mkdir()
    base = ["--raw", str(raw), "--out", str(out), "--params", str(REPO / "params.yaml")]
    _one_line_exit_2(capsys, [*base, "--variants", "regnet_bce,nope"], "unknown variant(s) nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: -2}\n")
    _one_line_exit_2(capsys, [*base, "--variants", "regnet_bce", "--overrides", str(bad)], "train.epochs")
    _one_line_exit_2(capsys, [*base, "--variants", "regnet_bce", "--overrides", str(tmp_path / "none.yaml")],
                     "params file not found")
    assert not out.exists()  # nothing written


def test_report_of_a_missing_folder_is_one_line(tmp_path, capsys):
    from lggseg.reporting.merge import main as report_main

    assert report_main([str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_end_to_end_without_albumentations_and_dvclive(tmp_path):
    from lggseg.config import load_section
    from lggseg.data.synthetic import generate_demo
    from lggseg.evaluation.evaluate import evaluate_model
    from lggseg.reporting.merge import main as report_main
    from lggseg.reporting.results import check_metrics

    raw = generate_demo(tmp_path / "raw", n_cases=5)
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    overrides = tmp_path / "tiny.yaml"
    overrides.write_text(yaml.safe_dump(TINY))
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "lggseg.cli", "reproduce", "--raw", str(raw), "--variants", ",".join(VARIANTS),
           "--out", str(out), "--params", str(REPO / "params.yaml"), "--overrides", str(overrides), "--epochs", "1",
           "--image-size", "64", "--work", str(work)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "blocked import: albumentations" not in res.stderr
    assert "blocked import: dvclive" in res.stderr  # tried once per run, and fell back to its own log files
    assert "blocked import: cv2" in res.stderr  # evaluation at 64 px tried OpenCV, then resized with torch
    assert all(f"{v}: test Dice slice mean" in res.stdout for v in VARIANTS)

    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(FILES.values()) and len(files) <= 8
    params = yaml.safe_load((out / "params.yaml").read_text())
    assert list(params["variants"]) == VARIANTS and params["common"]["image_size"] == 64

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == VARIANTS
    store_dir = work / "manifest"
    for v in VARIANTS:
        check_metrics(metrics[v], f"metrics.json[{v}]")
        prov = metrics[v]["provenance"]
        assert prov["image_size"] == 64 and prov["training"]["23"]["epochs_done"] == 1
        # the evaluate stage's function on the same models gives the same numbers
        again = evaluate_model(work / "models" / v, store_dir, load_section("evaluate", params),
                               load_section("postprocess", params), "cpu")
        assert {k: again.metrics[k] for k in ("dice_slice_mean", "dice_patient_3d", "hd95_px")} == \
               {k: metrics[v][k] for k in ("dice_slice_mean", "dice_patient_3d", "hd95_px")}

    slices = pd.read_csv(out / "slices.csv")
    assert list(slices.columns[:3]) == ["variant", "seed", "row"] and set(slices["variant"]) == set(VARIANTS)
    assert (slices.groupby(["variant", "postprocessed"]).size() == metrics[VARIANTS[0]]["n_test_slices"]).all()
    training = pd.read_csv(out / "training.csv")
    assert list(training["variant"]) == VARIANTS and set(training["epoch"]) == {1}
    assert "train/loss_outlier" in training.columns and "val/dice" in training.columns

    with np.load(out / "figure_slices.npz") as z:
        assert {f"prob__{v}" for v in VARIANTS} <= set(z.files) and z["image"].shape[1:] == (256, 256, 3)
        assert z[f"prob__{VARIANTS[0]}"].shape == z["truth"].shape

    record = json.loads((out / "environment.json").read_text())
    assert record["device"]["type"] == "cpu" and record["device"]["software"]["torch"]
    assert record["image_size"] == 64 and record["data"]["source"] == "demo"
    assert record["data"]["summary"]["n_cases"] == 5 and record["images_per_second_all_variants"] > 0
    for v in VARIANTS:
        seed = record["variants"][v]["seeds"]["23"]
        assert record["variants"][v]["status"] == "done"
        assert (seed["epochs_done"], seed["stop_reason"], seed["data_path"]) == (1, "completed", "resident")
        assert seed["wall_seconds"] > 0 and seed["images_per_second"] > 0
    assert record["finished"] and record["seconds"]["total"] >= record["seconds"]["training"] > 0

    assert report_main([str(out)]) == 0
    tables = (out / "tables.md").read_text()
    assert "DEMO / SYNTHETIC DATA" in tables and "Table 2" in tables
    assert all(f"`{v}`" in tables for v in VARIANTS)
    assert "Figure 8: not drawn" in tables and "![figure 7]" in tables and "Figure 9" not in tables
    assert (out / "plots" / "figure7_loss_comparison.png").is_file()


@pytest.mark.slow
def test_reproduce_folder_tables_have_the_paired_comparison(tmp_path, capsys):
    """Table 3's two variants, one epoch on 6 synthetic cases: each variant's patients.csv rows are in the
    folder as its evaluation ends, and ``lggseg report DIR`` puts their paired per-patient difference in
    tables.md (the same difference computed here from patients.csv)."""
    from lggseg.reporting.merge import main as report_main
    from lggseg.reporting.paired import load_patients

    variants = ["regnet_bce", "regnet_attr_bce"]
    over = tmp_path / "tiny.yaml"
    over.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    assert main(["--synthetic", "6", "--variants", ",".join(variants), "--out", str(out), "--params",
                 str(REPO / "params.yaml"), "--overrides", str(over), "--epochs", "1", "--image-size", "64",
                 "--work", str(tmp_path / "work")]) == 0
    assert (out / FILES["patients"]).is_file()
    metrics = json.loads((out / FILES["metrics"]).read_text())
    rows = {v: load_patients(out / FILES["patients"], v).set_index("patient_id")["dice_3d"] for v in variants}
    n = metrics["regnet_bce"]["n_test_patients"]
    assert len(rows["regnet_bce"]) == len(rows["regnet_attr_bce"]) == n
    diff = (rows["regnet_attr_bce"] - rows["regnet_bce"].loc[rows["regnet_attr_bce"].index]).mean()

    capsys.readouterr()
    assert report_main([str(out)]) == 0
    md = (out / "tables.md").read_text()
    (line,) = [ln for ln in md.splitlines() if ln.startswith("| `regnet_attr_bce` vs `regnet_bce` |")]
    cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
    assert cells[1:5] == ["23/23", str(n), "+0.41", f"{100 * diff:+.2f}"]
    assert "**Table 3: " in md and "**Table 3: not run**" not in md


# --------------------------------------------------------------------------- models checked before the manifest


@pytest.fixture
def offline_empty_caches(tmp_path, monkeypatch):
    """An offline machine whose Hugging Face and torch hub caches are empty (HF_HUB_OFFLINE: nothing is tried)."""
    import huggingface_hub.constants
    import torch

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return cache


def _tiny_params(tmp_path: Path, model: dict) -> Path:
    path = tmp_path / "over.yaml"
    path.write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], **model}}))
    return path


@pytest.mark.parametrize(("model", "needle"), [
    ({"pretrained": True}, "weights of 'test_efficientnet' are not in the Hugging Face cache"),
    ({"pretrained": True, "weights_file": "/nonexistent/w.safetensors"}, "no such file"),
    ({"encoder": "no_such_encoder_xyz"}, "not a timm model"),
])
def test_models_that_cannot_start_stop_reproduce_before_the_manifest(tmp_path, capsys, offline_empty_caches,
                                                                     model, needle):
    import time

    raw, work, out = tmp_path / "raw", tmp_path / "work", tmp_path / "out"
    raw.mkdir()  # never read: the check comes first
    argv = ["--raw", str(raw), "--out", str(out), "--work", str(work), "--params", str(REPO / "params.yaml"),
            "--overrides", str(_tiny_params(tmp_path, model)), "--variants", ",".join(VARIANTS)]
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 30  # seconds, not the minutes of a manifest and a build per variant
    err = capsys.readouterr().err
    assert err.startswith(f"reproduce: variant {VARIANTS[0]}: ") and err.count("\n") == 1 and needle in err
    assert not (work / "manifest").exists() and not out.exists()


def test_check_models_names_the_variant_and_accepts_cached_weights(params, offline_empty_caches):
    from lggseg.errors import ModelError
    from lggseg.models.encoders import check_pretrained_weights
    from lggseg.reproduce import check_models

    pretrained = {**TINY, "model": {**TINY["model"], "pretrained": True}}
    _, runs = effective_params(params, VARIANTS, pretrained)
    with pytest.raises(ModelError, match=rf"^variant {VARIANTS[0]}: model.pretrained is true .* HF_HUB_OFFLINE"):
        check_models(runs)
    # the same weights in the cache (laid out as huggingface_hub does): found, nothing downloaded
    import timm

    repo = timm.get_pretrained_cfg("test_efficientnet").hf_hub_id
    folder = offline_empty_caches / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"weights")
    check_models(runs)
    assert check_pretrained_weights(runs[VARIANTS[0]].model).endswith("model.safetensors")
    # random initialisation needs no weights at all
    _, runs = effective_params(params, VARIANTS, TINY)
    assert check_pretrained_weights(runs[VARIANTS[0]].model) is None
    check_models(runs)
