"""``lggseg reproduce`` writes every output as it is produced: killed (SIGKILL) after the first variant's
evaluation, its folder holds that variant's metrics and rows and every finished epoch of every run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lggseg.reporting.folder import FolderWriter, read_folder

REPO = Path(__file__).resolve().parents[1]
FAST, SLOW = "regnet_attr_bce", "unet_bce"
TINY = {
    "common": {"device": "cpu"},
    "model": {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 16, "attribute_hidden": 8},
    "train": {"batch_size": 4, "num_workers": 0, "cpu_threads": 1, "data_path": "resident"},
    "evaluate": {"bootstrap_samples": 100},
}


def test_folder_writer_rewrites_training_after_each_epoch(tmp_path):
    params = {"variants": {"b": {}, "a": {}}}
    writer = FolderWriter(tmp_path, params, {"variants": {}})
    assert read_folder(tmp_path)["training"] is None
    writer.add_epoch("a", 23, {"epoch": 1, "val/dice": 0.5})
    writer.add_epoch("b", 23, {"epoch": 1, "val/dice": 0.25})
    writer.add_epoch("a", 23, {"epoch": 2, "val/dice": 0.75})
    training = read_folder(tmp_path)["training"]
    # ordered as the params list the variants, then by seed and epoch
    assert list(zip(training["variant"], training["epoch"], strict=True)) == [("b", 1), ("a", 1), ("a", 2)]
    assert list(training["val/dice"]) == [0.25, 0.5, 0.75]


@pytest.mark.slow
def test_reproduce_killed_after_the_first_variant_leaves_every_finished_piece(tmp_path):
    from lggseg.data.synthetic import generate_demo

    raw = generate_demo(tmp_path / "raw", n_cases=4)
    over = {**TINY, "variants": {FAST: {"train": {"epochs": 1}}, SLOW: {"train": {"epochs": 200}}}}
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lggseg.cli", "reproduce", "--raw", str(raw), "--variants", f"{FAST},{SLOW}",
           "--out", str(out), "--params", str(REPO / "params.yaml"), "--overrides", str(tmp_path / "over.yaml"),
           "--image-size", "64", "--work", str(tmp_path / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.json").is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no variant finished in 10 minutes"
            time.sleep(0.2)
        time.sleep(1.0)  # a little more of the slow variant's training
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished: the slow variant had 200 epochs to do

    folder = read_folder(out)
    assert list(folder["metrics"]) == [FAST] and folder["metrics"][FAST]["dice_slice_mean"] >= 0
    assert set(folder["slices"]["variant"]) == {FAST}
    assert folder["environment"]["variants"][FAST]["status"] == "done"
    assert folder["environment"]["variants"][SLOW]["status"] == "pending"
    training = folder["training"]
    assert list(training.loc[training["variant"] == FAST, "epoch"]) == [1]
    slow = list(training.loc[training["variant"] == SLOW, "epoch"])
    # its first epoch ended in the round the fast variant's did, before that one's evaluation: written live
    assert slow and slow == list(range(1, len(slow) + 1))  # every finished epoch, in order, none twice
    assert training["val/dice"].notna().all()
