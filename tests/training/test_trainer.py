"""The training loop (``lggseg.training.trainer``): pinned outputs of two tiny CPU runs.

The digests below were taken with the code before issue #23 rewrote the loop (``Session``, ``_Trainer``
and the step generators, commit 8ac0006): SHA-256 of every saved weight tensor, of ``result.json``
and of ``model.json`` without their timings and machine records. A loop that trains, validates,
selects or records differently changes them. CPU training repeats exactly on one machine type, but
oneDNN's kernels differ between CPU types, so the digests are pinned per (torch version, CPU
capability) and the test skips on a machine type that has none recorded (say so in the skip reason;
record them with ``python tests/training/test_trainer.py`` on a clean checkout of a pinned commit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import SEED, tiny_run

from lggseg.training.session import train_variant

# keys that depend on the clock or the machine, not on what was trained
UNPINNED = ("wall_seconds", "train_seconds", "seconds_per_epoch", "images_per_second", "hardware", "software")


def pinned_runs():
    """Two float32 runs that cover the loader and the resident path, a checkpoint between epochs, the
    time-budget planner (a budget that is never reached), the cosine schedule and BN recalibration."""
    return {
        "loader": tiny_run(2, amp=False, checkpoint_every=1, max_minutes=600),
        "resident": tiny_run(2, amp=False, data_path="resident", lr_schedule="cosine", bn_recalibration_slices=8),
    }


def digests(out: Path) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the saved weights and of result.json / model.json without timings."""

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    def record(name: str) -> str:
        data = json.loads((out / name).read_text())
        return sha(json.dumps({k: v for k, v in data.items() if k not in UNPINNED}, sort_keys=True).encode())

    weights = load_file(str(out / "model.safetensors"))
    lines = [f"{k} {sha(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())}" for k, v in sorted(weights.items())]
    return {"weights": sha("\n".join(lines).encode()), "result": record("result.json"), "model": record("model.json")}


def machine() -> str:
    return f"torch {'.'.join(torch.__version__.split('.')[:2])} {torch.backends.cpu.get_cpu_capability()}"


# machine() -> run -> digests
PINNED: dict[str, dict[str, dict[str, str]]] = {
    "torch 2.14 AVX2": {  # AMD EPYC without AVX512 (the CI machine type)
        "loader": {"weights": "ffca2faba66c7775", "result": "47f243aaacd4cd7b", "model": "ea716bfb74a0f8a5"},
        "resident": {"weights": "7a12897f8e82e44b", "result": "c08b66ffb8ded191", "model": "f4b2a2d33b66c13a"},
    },
}


@pytest.mark.parametrize("name", ["loader", "resident"])
def test_a_run_gives_the_pinned_weights_and_records(store_dir, tmp_path, name):
    want = PINNED.get(machine())
    if want is None:
        pytest.skip(f"no digests pinned for {machine()} (pinned: {sorted(PINNED)})")
    train_variant(pinned_runs()[name], store_dir, tmp_path / name, SEED)
    assert digests(tmp_path / name) == want[name]


if __name__ == "__main__":  # print the digests of this machine, to pin them above
    import tempfile

    from lggseg.config import CommonConfig, ManifestConfig
    from lggseg.data.manifest import build_manifest
    from lggseg.data.synthetic import generate_demo

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_manifest(generate_demo(root / "raw", 3, 23), root / "store", CommonConfig(image_size=64), ManifestConfig())
        found = {}
        for name, run in pinned_runs().items():
            train_variant(run, root / "store", root / name, SEED)
            found[name] = digests(root / name)
    print(json.dumps({machine(): found}, indent=4))
