"""Resuming after SIGKILL: ``stages/train.py`` killed at random moments of its training loop and rerun
ends with the result and weights of an uninterrupted run (CPU, bit for bit)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import ENV, REPO
from lggseg.config import deep_merge, read_params, resolve_variant
from test_predict import copy_case


def tiny_run_config(path: Path, epochs: int) -> Path:
    over = {
        "common": {"image_size": 64, "device": "cpu"},
        "model": {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 32, "attribute_hidden": 16},
        "loss": {"gamma_warmup_epochs": 1, "gamma_ramp_epochs": 0},
        "train": {"epochs": epochs, "batch_size": 4, "num_workers": 0, "cpu_threads": 1, "log_every": 2},
        "seeds": [3],
    }
    run = resolve_variant(deep_merge(read_params(REPO / "params.yaml"), over), "regnet_attr_bce_dice_outlier")
    path.write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    return path


def _train_stage(cfg: Path, store: Path, out: Path, log: Path) -> tuple[subprocess.Popen, float]:
    """Start the stage; return it once its epoch progress bar shows (training has begun) and that time."""
    args = [sys.executable, str(REPO / "stages" / "train.py"), "--variant", "regnet_attr_bce_dice_outlier",
            "--config", str(cfg), "--data", str(store), "--out", str(out)]
    # a file, not a pipe: a full pipe would stall the stage
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=fh, env=ENV, cwd=out.parent)
    while proc.poll() is None and b"epoch/s" not in log.read_bytes():
        time.sleep(0.01)
    return proc, time.perf_counter()


def _state(seed_dir: Path) -> str:
    """What a killed run left: nothing, the checkpoint of an epoch, or the finished model."""
    if (seed_dir / "result.json").is_file():
        return "finished"
    state = seed_dir / "checkpoint" / "state.json"
    return f"checkpoint after epoch {json.loads(state.read_text())['epoch']}" if state.is_file() else "no checkpoint"


@pytest.mark.slow
def test_train_stage_killed_at_random_points_resumes_to_the_same_result(demo_kaggle_dir, tmp_path):
    """SIGKILL ``stages/train.py`` at 4 seeded random moments of its training loop, rerunning it
    each time, then let it finish: result and weights equal those of an uninterrupted run (CPU)."""
    from lggseg.config import CommonConfig, ManifestConfig
    from lggseg.data.manifest import build_manifest

    raw = tmp_path / "kaggle_3m"
    for case in sorted(p for p in demo_kaggle_dir.iterdir() if p.is_dir())[:3]:
        copy_case(case, raw)
    shutil.copy(demo_kaggle_dir / "data.csv", raw)
    store = tmp_path / "store"
    build_manifest(raw, store, CommonConfig(image_size=64), ManifestConfig())
    cfg = tiny_run_config(tmp_path / "run.yaml", epochs=6)

    (tmp_path / "ref").mkdir()
    proc, started = _train_stage(cfg, store, tmp_path / "ref" / "models", tmp_path / "ref.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    training = time.perf_counter() - started

    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "models"
    rng = random.Random(20240505)
    kills = []
    for k in range(4):
        log = tmp_path / f"run{k}.log"
        proc, started = _train_stage(cfg, store, out, log)
        # a quarter of the loop at most, so the four kills spread over the whole run
        delay = rng.uniform(0.0, training / 4)
        time.sleep(max(0.0, started + delay - time.perf_counter()))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((round(delay, 2), proc.returncode, _state(out / "seed_3")))
    proc, _ = _train_stage(cfg, store, out, tmp_path / "final.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-2000:]
    print(f"uninterrupted training loop {training:.2f}s; kills (s into the loop, exit, state left): {kills}")
    assert sum(code == -signal.SIGKILL for _, code, _ in kills) >= 2, kills

    a, b = tmp_path / "ref" / "models" / "seed_3", out / "seed_3"
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    for key in ("final", "best_epoch", "best_val_dice", "fingerprint"):
        assert ra[key] == rb[key], key
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (b / "checkpoint").exists()
    assert json.loads((out / "summary.json").read_text())["best_val_dice_mean"] == ra["best_val_dice"]
