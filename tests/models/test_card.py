"""lggseg.models.card: MODEL_CARD.md written by save_model, rewritten with test metrics by evaluation, its summary line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lggseg.config import ModelConfig
from lggseg.evaluation.evaluate import write_model_cards
from lggseg.models import build_model, read_meta, save_model
from lggseg.models.card import CARD_FILE, card_summary, card_text, write_card

TINY = {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 16, "attribute_hidden": 8}
META = {
    "run_config": {"variant": "laptop", "label": "DeepLabv3+ resnet18", "common": {"seed": 23},
                   "loss": {"terms": ["bce", "dice"]}},
    "seed": 23,
    "fingerprint": "8e0d6744cd1bfb8f",
    "epochs": 10, "epochs_done": 7, "epochs_planned": 7, "stop_reason": "time budget", "best_epoch": 6,
    "best_val_dice": 0.8512, "wall_seconds": 1490.2, "train_seconds": 1300.0, "device": "cpu",
    "hardware": {"device_name": "AMD EPYC", "precision": "float32"}, "pretrained": True,
}
METRICS = {
    "dice_slice_mean": 0.8123, "dice_slice_mean_ci95": [0.75, 0.86], "dice_patient_3d": 0.7011,
    "dice_patient_3d_ci95": [0.61, 0.79], "dice_tumour_slices": 0.66, "dice_micro": 0.77, "empty_fp_rate": 0.05,
    "n_test_patients": 14, "n_test_slices": 512, "tta": True, "seeds": [23],
    "postprocessed": {"dice_slice_mean": 0.8634, "dice_slice_mean_ci95": [0.8, 0.9], "dice_patient_3d": 0.7251,
                      "dice_patient_3d_ci95": [0.65, 0.8], "min_area": 49, "largest_3d": True},
    "provenance": {"data": {"source": "kaggle_3m copy", "fingerprint": "8e0d6744cd1bfb8f", "split_unit": "patient",
                            "splits": {"train": {"patients": 66, "slices": 2700}, "val": {"patients": 14, "slices": 700},
                                       "test": {"patients": 14, "slices": 512}}},
                   "seeds": {"split": 23, "bootstrap": 23}, "evaluation": {"device": "cpu"}, "git_commit": "abc123"},
}


def _model_dir(path: Path, attributes: bool = False) -> Path:
    torch.manual_seed(0)
    names = ["attr:RNASeqCluster=1", "attr:RNASeqCluster=missing", "attr:position"] if attributes else []
    model = build_model(ModelConfig(attributes=attributes, **TINY), len(names), 64)
    return save_model(model, path, {**META, "attribute_names": names, "n_attributes": len(names), "image_size": 64})


def test_save_model_writes_a_card_without_metrics(tmp_path):
    d = _model_dir(tmp_path / "m")
    text = (d / CARD_FILE).read_text()
    for needle in ("# Model card: DeepLabv3+ resnet18 (variant `laptop`, seed 23)", "`test_efficientnet`",
                   "8e0d6744cd1bfb8f", "Not evaluated yet", "research use, not a medical device",
                   "7 done of 7 planned (time budget)", "`model.safetensors`", "`model.json`", "skull-stripped",
                   "slices only (no genomic attributes)", "64 x 64 px", "(pre-contrast T1, FLAIR, post-contrast T1)"):
        assert needle in text, needle
    assert card_summary(d, read_meta(d)).endswith("test metrics: not evaluated yet; research use, not a medical device")


def test_card_with_metrics_by_hand(tmp_path):
    d = _model_dir(tmp_path / "m", attributes=True)
    write_card(d, read_meta(d), METRICS)
    text = (d / CARD_FILE).read_text()
    assert "| Dice, slice mean (empty truth + empty prediction = 1) | 0.8123 [0.7500, 0.8600] | 0.8634 [0.8000, 0.9000] |" in text
    assert "| Dice, per patient 3D (mean over patients) | 0.7011 [0.6100, 0.7900] | 0.7251 [0.6500, 0.8000] |" in text
    assert "Test split: 14 patients, 512 slices" in text
    assert "components under 49 px removed, then each case's largest 3D region kept" in text
    assert "train 66 patients / 2700 slices; val 14 patients / 700 slices; test 14 patients / 512 slices" in text
    assert "genomic clusters (RNASeqCluster) and the slice position" in text
    summary = card_summary(d, read_meta(d))
    assert "patient 3D 0.725 [95% CI 0.650-0.800] after post-processing on 14 patients" in summary
    assert "Not evaluated yet" not in text


def test_a_seed_of_several_gets_its_own_numbers():
    metrics = {**METRICS, "seeds": [23, 24], "per_seed": {"23": {**METRICS, "dice_slice_mean": 0.5}, "24": METRICS}}
    text = card_text({**META, "seed": 23}, metrics)
    assert "| 0.5000 [0.7500, 0.8600] |" in text and "numbers of seed 23" in text


@pytest.mark.parametrize(("project", "line"), [
    ({"commit": "12" * 20, "uncommitted_changes": False, "workspace": True}, "Evaluated on cpu, commit 1212121212."),
    (None, "Evaluated on cpu, commit abc123."),  # metrics written before workspaces recorded their origin
    ({"commit": None, "uncommitted_changes": None, "workspace": True}, "Evaluated on cpu, workspace commit abc123."),
])
def test_the_card_names_the_project_commit(project, line):
    prov = {**METRICS["provenance"], **({"project": project} if project else {})}
    assert line in card_text(META, {**METRICS, "provenance": prov}).splitlines()


def test_old_metadata_still_makes_a_card():
    text = card_text({"model_config": {"arch": "deeplabv3plus"}, "n_attributes": 0, "image_size": 256})
    assert "n/a" in text and "research use" in text


def test_evaluation_rewrites_every_seeds_card(tmp_path):
    for seed in (1, 2):
        _model_dir(tmp_path / "models" / f"seed_{seed}")
    paths = write_model_cards(tmp_path / "models", METRICS)
    assert len(paths) == 2 and all("0.8123" in p.read_text() for p in paths)


def test_the_card_is_outside_dvcs_hash():
    """The evaluate stage rewrites the card inside train's output folder: DVC must not see it (or train reruns)."""
    lines = (Path(__file__).resolve().parents[2] / ".dvcignore").read_text().splitlines()
    assert CARD_FILE in lines


@pytest.mark.slow
def test_dvc_ignores_a_card_written_after_the_stage(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]

    def run(*args: str) -> str:
        return subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / ".dvcignore").write_text((repo / ".dvcignore").read_text())
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: mkdir -p out && echo w > out/model.json\n    outs:\n      - out:\n          persist: true\n"
    )
    run(sys.executable, "-m", "dvc", "repro", "-q")
    (tmp_path / "out" / CARD_FILE).write_text("card")
    assert "up to date" in run(sys.executable, "-m", "dvc", "status")


def test_a_demo_model_says_its_data_are_synthetic():
    metrics = {**METRICS, "provenance": {**METRICS["provenance"], "data": {**METRICS["provenance"]["data"], "source": "demo"}}}
    text = card_text(META, metrics)
    assert "SYNTHETIC demo data" in text and "LGG Segmentation Dataset" not in text
    assert "on SYNTHETIC demo data; research use" in text.splitlines()[2]
    assert "LGG Segmentation Dataset" in card_text(META, METRICS)
