"""``lggseg.training.checkpoint``: the run fingerprint, a :class:`TrainState` saved and restored whole, the
commit record deciding what is loaded, and where a run starts (:func:`resume_point`)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_train import SEED, tiny_run

from lggseg.config import CommonConfig, ManifestConfig
from lggseg.data.manifest import build_manifest
from lggseg.data.synthetic import generate_demo
from lggseg.runtime import DistInfo
from lggseg.training.checkpoint import (
    CHECKPOINT_DIR,
    RESULT_FILE,
    Checkpoint,
    TrainState,
    capture_rng,
    restore_rng,
    resume_point,
    run_fingerprint,
    store_fingerprint,
)

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _trained_adam() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
    return net, opt


def _state(net, opt, loader_gen, epoch=1, best=None) -> TrainState:
    return TrainState(planned_epochs=4, epoch=epoch, history=[{"epoch": 1, "val/dice": 0.5}], best_val_dice=0.5,
                      best_epoch=1, best_weights={"w": torch.ones(2)} if best is None else best, train_seconds=1.5,
                      wall_seconds=2.0, train_images=12, model=net.state_dict(), optimizer=opt.state_dict(),
                      rng=capture_rng(CPU, loader_gen))


def test_a_train_state_comes_back_whole(tmp_path):
    """Model, Adam state, best weights, counters and every random stream survive a save and a load."""
    net, opt = _trained_adam()
    gen = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = _state(net, opt, gen)
    Checkpoint(tmp_path, "abc").save(saved, best_changed=True)
    after = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    loaded = Checkpoint(tmp_path, "abc").load()
    counters = ("planned_epochs", "epoch", "stop_reason", "history", "best_val_dice", "best_epoch", "train_seconds",
                "wall_seconds", "train_images")
    assert all(getattr(loaded, k) == getattr(saved, k) for k in counters)
    assert all(torch.equal(loaded.model[k], v) for k, v in net.state_dict().items())
    assert torch.equal(loaded.best_weights["w"], torch.ones(2))
    fresh = torch.optim.Adam(net.parameters(), lr=0.5)
    fresh.load_state_dict(loaded.optimizer)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 0.01
    for pid in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])
    other_gen = torch.Generator().manual_seed(99)
    assert restore_rng(loaded.rng, CPU, other_gen)
    again = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=other_gen))
    assert after[:2] == again[:2] and torch.equal(after[2], again[2]) and torch.equal(after[3], again[3])


def test_another_number_of_processes_keeps_its_torch_stream():
    rng = capture_rng(CPU, torch.Generator())
    two = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert restore_rng(rng, two, torch.Generator()) is False
    assert torch.equal(torch.get_rng_state(), before)


def test_the_commit_record_decides(tmp_path):
    net, opt = _trained_adam()
    gen = torch.Generator()
    ckpt = Checkpoint(tmp_path, "abc")
    ckpt.save(_state(net, opt, gen, epoch=1), best_changed=True)
    (ckpt.dir / "state_e0002.safetensors").write_bytes(b"half-written by a killed process")
    assert Checkpoint(tmp_path, "other config").load() is None
    assert ckpt.load().epoch == 1
    # epoch 2 without a better epoch: the best weights of epoch 1 stay committed, the old state goes
    ckpt.save(_state(net, opt, gen, epoch=2, best={"w": torch.zeros(2)}), best_changed=False)
    names = sorted(p.name for p in ckpt.dir.iterdir())
    assert names == ["best_e0001.safetensors", "state.json", "state_e0002.safetensors"]
    loaded = ckpt.load()
    assert loaded.epoch == 2 and torch.equal(loaded.best_weights["w"], torch.ones(2))
    (ckpt.dir / "best_e0001.safetensors").unlink()  # outside interference: start over rather than guess
    assert ckpt.load() is None
    ckpt.remove()
    assert not ckpt.dir.exists() and ckpt.load() is None


def test_resume_point_returns_a_stored_result_or_the_checkpoint(tmp_path, store_dir):
    run, out = tiny_run(), tmp_path / "seed_5"
    fingerprint = run_fingerprint(run, SEED, store_fingerprint(store_dir))
    assert resume_point(run, store_dir, out, SEED, True, CPU, False) == (fingerprint, None, None)
    net, opt = _trained_adam()
    Checkpoint(out, fingerprint).save(_state(net, opt, torch.Generator()), best_changed=True)
    found, stored, state = resume_point(run, store_dir, out, SEED, True, CPU, False)
    assert (found, stored, state.epoch) == (fingerprint, None, 1)
    # a bf16 run of the same config is another run: its checkpoint is not this one
    assert resume_point(run, store_dir, out, SEED, True, CPU, True)[2] is None
    assert not (out / CHECKPOINT_DIR).exists()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / RESULT_FILE).write_text(json.dumps({"fingerprint": fingerprint, "best_epoch": 3}))
    assert resume_point(run, store_dir, out, SEED, True, CPU, False) == (fingerprint, {"fingerprint": fingerprint,
                                                                                          "best_epoch": 3}, None)
    # without resume the stored result is removed and training starts over
    assert resume_point(run, store_dir, out, SEED, False, CPU, False) == (fingerprint, None, None)
    assert not (out / RESULT_FILE).exists()


def test_fingerprint_ignores_speed_settings_only():
    base = run_fingerprint(tiny_run(), SEED, "data")
    assert run_fingerprint(tiny_run(num_workers=3, cpu_threads=2, log_every=7, checkpoint_every=3), SEED, "data") == base
    assert run_fingerprint(tiny_run(data_path="resident"), SEED, "data") != base  # another random stream
    assert run_fingerprint(tiny_run(lr=0.01), SEED, "data") != base
    assert run_fingerprint(tiny_run(), SEED + 1, "data") != base
    assert run_fingerprint(tiny_run(), SEED, "other data") != base
    # a setting added later counts only when used: runs made before it keep their identity
    augment = {**tiny_run().train.augment.__dict__}
    assert run_fingerprint(tiny_run(augment={**augment, "missing_sequence_p": 0.0}), SEED, "data") == base
    assert run_fingerprint(tiny_run(augment={**augment, "missing_sequence_p": 0.2}), SEED, "data") != base


def test_fingerprint_holds_device_type_and_precision():
    """A CPU float32 checkpoint or result is never taken for a GPU bf16 run, nor the reverse."""
    fps = {(dev, bf16): run_fingerprint(tiny_run(), SEED, "data", dev, bf16)
           for dev in ("cpu", "cuda") for bf16 in (False, True)}
    assert len(set(fps.values())) == 4
    assert run_fingerprint(tiny_run(), SEED, "data") == fps["cpu", False]  # the defaults


def test_a_resplit_store_is_not_resumed(store_dir, tmp_path):
    """Same images, another split: the store fingerprint (and so the run's) must differ."""
    raw = generate_demo(tmp_path / "raw", 3, 23)
    fps = {}
    for unit in ("patient", "slice"):
        build_manifest(raw, tmp_path / unit, CommonConfig(image_size=64), ManifestConfig(split_unit=unit))
        fps[unit] = store_fingerprint(tmp_path / unit)
    assert fps["patient"]["data"] == fps["slice"]["data"]  # the same raw images
    assert fps["patient"] == store_fingerprint(store_dir)  # rebuilt identically: same identity
    assert run_fingerprint(tiny_run(), SEED, fps["patient"]) != run_fingerprint(tiny_run(), SEED, fps["slice"])


@pytest.mark.parametrize("missing", ["state.json", "tensors"])
def test_a_checkpoint_without_its_files_is_not_loaded(tmp_path, missing):
    net, opt = _trained_adam()
    ckpt = Checkpoint(tmp_path, "abc")
    ckpt.save(_state(net, opt, torch.Generator()), best_changed=False)
    target = ckpt.dir / ("state.json" if missing == "state.json" else "state_e0001.safetensors")
    target.unlink()
    assert ckpt.load() is None
