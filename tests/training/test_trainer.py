"""The training loop (``lggseg.training.trainer``): pinned outputs of two tiny CPU runs, the order of
``fit``'s pieces, the best-epoch selection, checkpoints during the loop.

The digests below were taken with the code before issue #23 rewrote the loop (``Session``, ``_Trainer``
and the step generators, commit 8ac0006): SHA-256 of every saved weight tensor, of ``result.json``
and of ``model.json`` without their timings and machine records. A loop that trains, validates,
selects or records differently changes them. CPU training repeats exactly on one machine type, but
oneDNN's kernels differ between CPU types, so the digests are pinned per (torch version, CPU
capability) and the test skips on a machine type that has none recorded (say so in the skip reason;
record them with ``python tests/training/test_trainer.py`` on a clean checkout of a pinned commit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import SEED, tiny_run

from lggseg.training import train_variant
from lggseg.training.checkpoint import CHECKPOINT_DIR, cpu_copy
from lggseg.training.trainer import slice_dice_sums

# keys that depend on the clock or the machine, not on what was trained; and keys added after the pin
# (issues #20/#21: gamma_max, gamma_reached_full; their values are tested below)
UNPINNED = ("wall_seconds", "train_seconds", "seconds_per_epoch", "images_per_second", "hardware", "software",
            "gamma_max", "gamma_reached_full")


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


# --------------------------------------------------------------------------- the loop's pieces


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], 1.0),  # empty/empty counts 1
        ([[1, 0], [0, 0]], [[0, 0], [0, 0]], 0.0),  # false positive on an empty slice
        ([[1, 1], [0, 0]], [[1, 0], [0, 0]], 2 * 1 / 3),
        ([[1, 1], [1, 0]], [[1, 1], [0, 1]], 2 * 2 / 6),
    ],
)
def test_slice_dice(pred, truth, expected):
    logits = torch.tensor(pred, dtype=torch.float32)[None, None] * 2 - 1  # 1 -> +1 (p > 0.5), 0 -> -1
    truth = torch.tensor(truth, dtype=torch.float32)[None, None]
    assert float(slice_dice_sums(logits, truth)) == pytest.approx(expected)
    two = slice_dice_sums(torch.cat([logits, logits]), torch.cat([truth, truth]))
    assert float(two) == pytest.approx(2 * expected)  # a sum over slices, not a pooled Dice


def test_fit_is_steps_with_the_epoch_end_after_each_epochs_last(store_dir, tmp_path, monkeypatch):
    """fit() = step() until done, then finish(); the epoch's end follows its last batch in the same step."""
    import lggseg.training.trainer as T

    calls = []
    for name in ("start_epoch", "end_epoch", "finish"):
        real = getattr(T.Trainer, name)
        monkeypatch.setattr(T.Trainer, name, lambda self, *a, _real=real, _name=name: calls.append(_name) or _real(self, *a))
    step = T.train_step
    monkeypatch.setattr(T, "train_step", lambda *a: calls.append("step") or step(*a))
    result = train_variant(tiny_run(2), store_dir, tmp_path / "seed_5", SEED)
    steps = calls.index("end_epoch") - 1  # batches per epoch (the tiny store: 5)
    assert steps == 5
    epoch = ["start_epoch", *["step"] * steps, "end_epoch"]
    assert calls == [*epoch, *epoch, "finish"] and result["epochs_done"] == 2


# (gamma warm-up, ramp, train.epochs, max_minutes, val Dice per epoch, kept epoch, its gamma, rule)
SELECTION_CASES = [
    # full gamma from epoch 2: epoch 1's higher Dice does not count, the best of epochs 2-3 does
    (1, 0, 3, None, [0.9, 0.4, 0.6], 3, 1.0, "among the epochs at the full outlier weight gamma=1 (epoch 2 on)"),
    # ramp over 2 epochs: gamma 0, 0.5, 1; only epoch 3 is at full weight
    (1, 2, 3, None, [0.9, 0.8, 0.3], 3, 1.0, "among the epochs at the full outlier weight gamma=1 (epoch 3 on)"),
    # never at full weight within train.epochs: the last epoch, and the rule says so
    (5, 0, 2, None, [0.9, 0.4], 2, 0.0, "last epoch: no trained epoch reached the full outlier weight gamma=1 "
                                         "(never within train.epochs)"),
    # a time budget that allows one epoch of three stops in the warm-up
    (1, 0, 3, 1e-6, [0.9], 1, 0.0, "last epoch: no trained epoch reached the full outlier weight gamma=1 "
                                   "(not before epoch 2)"),
]


@pytest.mark.parametrize(("warmup", "ramp", "epochs", "budget", "dices", "kept", "gamma", "rule"), SELECTION_CASES)
def test_best_epoch_is_chosen_at_full_gamma(store_dir, tmp_path, monkeypatch, warmup, ramp, epochs, budget, dices, kept,
                                            gamma, rule):
    import lggseg.training.trainer as T

    snapshots = []

    def validate(self, epoch):  # the chosen Dice; and the weights this epoch would be kept with
        snapshots.append(cpu_copy(self.model.state_dict()))
        return torch.tensor([0.5, dices[epoch], 1.0], dtype=torch.float64)

    monkeypatch.setattr(T.Trainer, "validate", validate)
    run = tiny_run(epochs, loss={"gamma_warmup_epochs": warmup, "gamma_ramp_epochs": ramp}, max_minutes=budget)
    out = tmp_path / "seed_5"
    result = train_variant(run, store_dir, out, SEED)
    assert [row["val/dice"] for row in result["history"]] == dices
    assert (result["best_epoch"], result["best_val_dice"], result["best_epoch_gamma"]) == (kept, dices[kept - 1], gamma)
    assert rule in result["selection_rule"]
    meta = json.loads((out / "model.json").read_text())
    assert (meta["best_epoch"], meta["best_epoch_gamma"], meta["selection_rule"]) == (kept, gamma, result["selection_rule"])
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], snapshots[kept - 1][k]) for k in saved)  # that epoch's weights


def test_without_the_outlier_term_every_epoch_counts(store_dir, tmp_path, monkeypatch):
    import lggseg.training.trainer as T

    monkeypatch.setattr(T.Trainer, "validate", lambda self, epoch: torch.tensor([0.5, [0.9, 0.4][epoch], 1.0]))
    run = tiny_run(2)
    run = dataclasses.replace(run, loss=dataclasses.replace(run.loss, terms=("bce", "dice")))
    result = train_variant(run, store_dir, tmp_path / "seed_5", SEED)
    assert (result["best_epoch"], result["best_epoch_gamma"]) == (1, 0.0)
    assert result["selection_rule"].endswith("over all epochs (no outlier term)")


@pytest.mark.parametrize(
    ("loss", "gammas", "reached"),
    [
        ({"gamma_warmup_epochs": 5}, [0.0, 0.0], False),  # 5 warm-up epochs in a run of 2
        ({"gamma_warmup_fraction": 0.5, "gamma_ramp_fraction": 0.0}, [0.0, 1.0], True),  # half of the 2 planned
        ({"terms": ("bce", "dice")}, [0.0, 0.0], None),  # no outlier term: nothing to reach
    ],
)
def test_a_run_records_whether_it_reached_full_gamma(store_dir, tmp_path, caplog, loss, gammas, reached):
    import logging

    caplog.set_level(logging.WARNING, logger="lggseg.training")
    out = tmp_path / "seed_5"
    run = tiny_run(2)
    run = dataclasses.replace(run, loss=dataclasses.replace(run.loss, **loss))
    result = train_variant(run, store_dir, out, SEED)
    assert [row["gamma"] for row in result["history"]] == gammas
    assert result["gamma_reached_full"] is reached
    assert result["gamma_max"] == (None if reached is None else max(gammas))
    meta = json.loads((out / "model.json").read_text())
    assert (meta["gamma_reached_full"], meta["gamma_max"]) == (result["gamma_reached_full"], result["gamma_max"])
    warned = [r.message for r in caplog.records if "never reached loss.gamma" in r.message]
    assert len(warned) == (reached is False)


# --------------------------------------------------------------------------- checkpoints during the loop


def test_checkpoint_every_and_resume(store_dir, tmp_path, monkeypatch):
    """checkpoint_every 2 over 4 epochs: commits after epoch 2 only (after the last, epoch 4, the model is
    the commit); a run that dies in epoch 3 resumes from epoch 2 and ends with the weights of the
    uninterrupted run."""
    import lggseg.training.trainer as T

    saved = []
    save = T.Checkpoint.save

    def record(self, state, best_changed):
        saved.append((state.epoch, best_changed))
        return save(self, state, best_changed)

    monkeypatch.setattr(T.Checkpoint, "save", record)
    run = tiny_run(4, checkpoint_every=2)
    ref = train_variant(run, store_dir, tmp_path / "ref", SEED)
    assert saved == [(2, True)]  # the first commit carries the best weights found so far

    class Died(Exception):
        pass

    start_epoch = T.Trainer.start_epoch

    def dies_in_epoch_3(self):
        if self.state.epoch == 2:
            raise Died
        return start_epoch(self)

    monkeypatch.setattr(T.Trainer, "start_epoch", dies_in_epoch_3)
    with pytest.raises(Died):
        train_variant(run, store_dir, tmp_path / "cut", SEED)
    assert json.loads((tmp_path / "cut" / CHECKPOINT_DIR / "state.json").read_text())["epoch"] == 2
    monkeypatch.setattr(T.Trainer, "start_epoch", start_epoch)
    resumed = train_variant(run, store_dir, tmp_path / "cut", SEED)
    assert resumed["history"] == ref["history"] and resumed["best_epoch"] == ref["best_epoch"]
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_last_epoch_is_committed_by_the_model_not_a_checkpoint(store_dir, tmp_path, monkeypatch):
    """Neither a completed run nor one stopped by the time budget writes a checkpoint after its last
    epoch (it would be removed with the model's commit a moment later); the model holds that epoch."""
    import lggseg.training.trainer as T

    saved = []
    monkeypatch.setattr(T.Checkpoint, "save", lambda self, state, best_changed: saved.append(state.epoch))
    result = train_variant(tiny_run(3, checkpoint_every=1, max_minutes=1e-6), store_dir, tmp_path / "b", SEED)
    assert result["epochs_done"] == 1 and saved == []  # stopped by the budget after epoch 1
    assert (tmp_path / "b" / "model.safetensors").is_file() and not (tmp_path / "b" / CHECKPOINT_DIR).exists()
    result = train_variant(tiny_run(2, checkpoint_every=1), store_dir, tmp_path / "c", SEED)
    assert result["epochs_done"] == 2 and saved == [1]  # every epoch but the last


def test_the_budget_clock_counts_the_time_between_epochs(store_dir, tmp_path, monkeypatch):
    """An epoch's wall seconds (the time budget's clock) run from the end of the previous epoch: the
    checkpoint written after epoch 1 (slowed here to 1.5 s) is paid for in epoch 2's time, not lost
    between the epochs (under train_variants, so are the other runs' turns in between)."""
    import time

    import lggseg.training.trainer as T

    monkeypatch.setattr(T.Checkpoint, "save", lambda self, state, best_changed: time.sleep(1.5))
    result = train_variant(tiny_run(2, checkpoint_every=1), store_dir, tmp_path / "a", SEED)
    # wall seconds = training steps + validations + what came between the epochs
    assert result["wall_seconds"] - result["train_seconds"] >= 1.5


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
