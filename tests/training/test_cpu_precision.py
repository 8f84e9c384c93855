"""The CPU training paths at the precision ``LGGSEG_CPU_BF16`` gives (marked ``bf16path``: ``make test``
runs them under ``off`` and under ``native``, so the bf16 path is checked also on a CPU without native bf16,
where torch emulates it): a run records its precision, repeats exactly, and preflight passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lggseg.config import deep_merge, read_params, resolve_variant
from lggseg.runtime import cpu_bf16
from lggseg.training import train_variant
from lggseg.training.step import step_setup

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SEED = 3
TINY_MODEL = {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 32, "attribute_hidden": 16}


def _run(variant: str = "regnet_attr_bce_dice_outlier"):
    over = {
        "common": {"image_size": 64, "device": "cpu"},
        "model": TINY_MODEL,
        "loss": {"gamma_warmup_epochs": 0, "gamma_ramp_epochs": 0},
        "train": {"epochs": 1, "batch_size": 4, "num_workers": 0, "cpu_threads": 1, "amp": True},
        "seeds": [SEED],
    }
    return resolve_variant(deep_merge(read_params(REPO / "params.yaml"), over), variant)


@pytest.mark.bf16path
def test_the_cpu_setup_follows_the_switch():
    s = step_setup(_run().train, CPU)
    assert s.bf16 is cpu_bf16()["native"]  # train.amp is on
    assert not s.channels_last  # issue 21: never on a CPU by default


@pytest.mark.bf16path
def test_a_cpu_run_records_its_precision_and_repeats_exactly(store_dir, tmp_path):
    bf16 = cpu_bf16()["native"]
    first, again = (train_variant(_run(), store_dir, tmp_path / name, SEED) for name in ("a", "b"))
    hw = first["hardware"]
    assert (hw["bf16_autocast"], hw["precision"]) == (bf16, "bf16 autocast" if bf16 else "float32")
    assert first["history"] == again["history"] and first["fingerprint"] == again["fingerprint"]
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())  # autocast: weights stay fp32


@pytest.mark.bf16path
def test_preflight_passes_in_the_cpu_setup(capsys):
    from lggseg.preflight import check_variant

    outcome = check_variant(_run(), CPU, 64, 2, 2)
    assert outcome.error is None and outcome.step_seconds > 0
