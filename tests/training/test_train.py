"""Training on tiny synthetic data (``lggseg.training.train_variant``): outputs and logs, CPU determinism, a
finished run is not redone, resumption after SIGKILL at several points gives the uninterrupted result, DDP
with 2 gloo processes, the step's set-up, the data paths. The loop itself: test_trainer.py; checkpoints:
test_checkpoint.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lggseg.config import (
    LossConfig,
    RunConfig,
    TrainConfig,
    deep_merge,
    read_params,
    resolve_variant,
)
from lggseg.data.store import load_store
from lggseg.training import train_all_seeds, train_variant
from lggseg.training.checkpoint import CHECKPOINT_DIR, run_fingerprint, store_fingerprint
from lggseg.training.step import applied, step_setup, train_step
from lggseg.training.trainer import slice_dice_sums

REPO = Path(__file__).resolve().parents[2]
SEED = 5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def tiny_run(epochs: int = 2, loss: dict | None = None, **train: object) -> RunConfig:
    """The paper's full model (attributes, BCE + Dice + outlier) with a 0.1M-parameter encoder at 64 px."""
    over = {
        "common": {"image_size": 64, "device": "cpu"},
        "model": {"encoder": "test_efficientnet", "pretrained": False, "decoder_channels": 32, "attribute_hidden": 16},
        "loss": {"gamma_warmup_epochs": 1, "gamma_ramp_epochs": 0, **(loss or {})},
        "train": {"epochs": epochs, "batch_size": 4, "num_workers": 0, "cpu_threads": 1, "log_every": 2, **train},
        "seeds": [SEED],
    }
    return resolve_variant(deep_merge(read_params(REPO / "params.yaml"), over), "regnet_attr_bce_dice_outlier")


@pytest.fixture(scope="module")
def trained(store_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "seed_5"
    return out, train_variant(tiny_run(), store_dir, out, SEED)


def _tsv(out: Path, name: str) -> list[float]:
    lines = (out / "dvclive" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:2] == ["step", name.split("/")[-1]]
    return [float(line.split("\t")[1]) for line in lines[1:]]


# --------------------------------------------------------------------------- unit pieces


@pytest.mark.bf16path
def test_train_variant_keys_results_by_device_and_precision(trained, store_dir, monkeypatch):
    """The stored result was made on the CPU at the precision of its set-up (bf16 under native CPU bf16,
    else float32: LGGSEG_CPU_BF16); a set-up of the other precision with the same config must not take it."""
    import lggseg.training.trainer as T

    out, result = trained
    bf16 = step_setup(tiny_run().train, CPU).bf16
    assert result["hardware"]["bf16_autocast"] is bf16
    assert result["fingerprint"] == run_fingerprint(tiny_run(), SEED, store_fingerprint(store_dir), "cpu", bf16)
    seen = {}

    def stop(self, run, store_dir, out_dir, seed, info, setup, fingerprint, *args, **kwargs):
        seen["fingerprint"] = fingerprint
        raise RuntimeError("stop before training")

    monkeypatch.setattr(T, "step_setup", lambda cfg, device: T.StepSetup("ours", bf16=not bf16))
    monkeypatch.setattr(T.Trainer, "__init__", stop)
    with pytest.raises(RuntimeError, match="stop before training"):
        train_variant(tiny_run(), store_dir, out.parent / "other", SEED)
    assert seen["fingerprint"] == run_fingerprint(tiny_run(), SEED, store_fingerprint(store_dir), "cpu", not bf16)
    assert seen["fingerprint"] != result["fingerprint"]


# --------------------------------------------------------------------------- training


@pytest.mark.bf16path
def test_training_writes_model_logs_and_result(trained, store_dir):
    from lggseg.models import load_model

    out, result = trained
    bf16 = step_setup(tiny_run().train, CPU).bf16  # the CPU's (or LGGSEG_CPU_BF16's) precision
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    assert not (out / CHECKPOINT_DIR).exists()
    assert json.loads((out / "result.json").read_text()) == result
    val = _tsv(out, "val/dice")
    assert val == [row["val/dice"] for row in result["history"]]
    assert len(_tsv(out, "train/loss")) == 2 and len(_tsv(out, "train/loss_outlier")) == 2
    assert _tsv(out, "gamma") == [0.0, 1.0]  # one warm-up epoch, then the full outlier weight
    # only epoch 2 has the full outlier weight, so it is kept whatever epoch 1 scored
    assert (result["best_epoch"], result["best_val_dice"], result["best_epoch_gamma"]) == (2, val[1], 1.0)
    assert result["selection_rule"].endswith("among the epochs at the full outlier weight gamma=1 (epoch 2 on)")
    hw = result["hardware"]
    precision = "bf16 autocast" if bf16 else "float32"
    assert (result["device"], hw["device"], hw["bf16_autocast"], hw["precision"]) == ("cpu", "cpu", bf16, precision)
    assert hw["device_name"] and isinstance(hw["cpu_native_bf16"], bool)
    assert result["software"]["torch"] == torch.__version__ and result["pretrained"] is False
    assert (result["epochs_done"], result["epochs_planned"], result["stop_reason"]) == (2, 2, "completed")
    assert 0 <= result["best_val_dice"] <= 1 and result["images_per_second"] > 0

    model, meta = load_model(out)
    store = load_store(store_dir)
    assert meta["attribute_names"] == store.attribute_names and meta["best_epoch"] == result["best_epoch"]
    for key in ("best_epoch_gamma", "selection_rule", "epochs_planned", "hardware", "software", "pretrained", "device"):
        assert meta[key] == result[key], key
    assert meta["run_config"]["variant"] == "regnet_attr_bce_dice_outlier" and meta["seed"] == SEED
    # the saved weights are the best epoch's: recomputing the validation Dice gives best_val_dice
    from lggseg.data.dataset import SliceDataset

    ds = SliceDataset(store, store.indices("val"), 64, None)
    batch = torch.utils.data.default_collate([ds[k] for k in range(len(ds))])
    with torch.no_grad():
        logits = model(batch["image"], batch["attributes"])
    assert float(slice_dice_sums(logits, batch["mask"])) / len(ds) == pytest.approx(result["best_val_dice"], abs=1e-6)


def test_finished_run_is_returned_not_redone(trained, store_dir):
    out, result = trained
    before = (out / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = train_variant(tiny_run(num_workers=1), store_dir, out, SEED)  # speed settings: same run
    assert again == result
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert time.perf_counter() - t0 < 5


def test_same_seed_same_metrics_and_weights_on_cpu(trained, store_dir, tmp_path):
    out, result = trained
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    again = train_variant(tiny_run(), store_dir, tmp_path / "seed_5", SEED, resume=False)
    assert again["history"] == result["history"] and again["best_val_dice"] == result["best_val_dice"]
    # process-wide torch settings of the run (1 thread, deterministic algorithms) are undone
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "seed_5" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_all_seeds_writes_summary(store_dir, tmp_path):
    import dataclasses

    run = dataclasses.replace(tiny_run(epochs=1), seeds=(1, 2))
    (tmp_path / "seed_9").mkdir()  # a seed dropped from params.yaml since the last run
    (tmp_path / "seed_9" / "model.safetensors").write_bytes(b"old")
    summary = train_all_seeds(run, store_dir, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_1", "seed_2", "summary.json"]
    dices = [summary["per_seed"][s]["best_val_dice"] for s in ("1", "2")]
    assert summary["best_val_dice_mean"] == pytest.approx(np.mean(dices))
    assert summary["best_val_dice_std"] == pytest.approx(np.std(dices, ddof=1))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


# --------------------------------------------------------------------------- resumption after SIGKILL

DRIVER = '''
import os, signal, sys
from pathlib import Path
import torch
import lggseg.training.checkpoint as C
import lggseg.training.trainer as T
from lggseg.config import load_run_config

cfg, store, out, point = sys.argv[1:5]
kind, _, arg = point.partition(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind == "step":  # in the middle of an epoch: the arg-th optimizer step of this process
    step, count = torch.optim.Adam.step, [0]
    def patched(self, *a, **k):
        count[0] += 1
        if count[0] == int(arg):
            die()
        return step(self, *a, **k)
    torch.optim.Adam.step = patched
elif kind == "tensors":  # checkpoint tensors of epoch arg written, state.json not yet
    save = C._save_tensors
    def patched(path, tensors):
        save(path, tensors)
        if path.name == f"state_e{int(arg):04d}.safetensors":
            die()
    C._save_tensors = patched
elif kind in ("commit", "final"):  # just after epoch arg's state.json / just before result.json
    write = C.write_json
    def patched(path, obj):
        if kind == "final" and Path(path).name == "result.json":
            die()
        done = write(path, obj)
        if kind == "commit" and Path(path).name == "state.json" and obj["epoch"] == int(arg):
            die()
        return done
    C.write_json = T.write_json = patched
T.train_variant(load_run_config(cfg), Path(store), Path(out), int(sys.argv[5]))
'''


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(trained, store_dir, tmp_path):
    ref_out, ref = trained
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run().to_dict()))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "seed_5"
    # 2 epochs of 6 steps: die between epoch 1's tensor file and its commit, right after the commit
    # (before DVCLive logged the epoch), mid-epoch 2, before result.json; then finish.
    for point in ("tensors:1", "commit:1", "step:3", "final", "none"):
        res = subprocess.run(
            [sys.executable, str(driver), str(cfg), str(store_dir), str(out), point, str(SEED)],
            capture_output=True, text=True, env=ENV, cwd=tmp_path,
        )
        expected = 0 if point == "none" else -9
        assert res.returncode == expected, f"{point}: {res.stderr[-2000:]}"
    result = json.loads((out / "result.json").read_text())
    assert result["history"] == ref["history"]
    assert (result["best_epoch"], result["best_val_dice"]) == (ref["best_epoch"], ref["best_val_dice"])
    a, b = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _tsv(out, "val/dice") == _tsv(ref_out, "val/dice")  # each epoch logged exactly once
    assert not (out / CHECKPOINT_DIR).exists()


# --------------------------------------------------------------------------- stage and DDP


def _stage(args: list[str], launcher: list[str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(REPO / "stages" / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd)


def test_train_stage_rejects_a_config_of_another_variant(tmp_path, store_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run().to_dict()))
    res = _stage(["--variant", "unet_bce", "--config", str(cfg), "--data", str(store_dir), "--out", str(tmp_path / "m")])
    assert res.returncode == 2
    assert "not 'unet_bce'" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path, store_dir):
    """Two processes, with a time budget: after epoch 1 the plan is broadcast from rank 0 (a host tensor on
    gloo; on NCCL the same call takes a device tensor), and both ranks go on to epoch 2 together."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run(epochs=2, max_minutes=60).to_dict()))
    out = tmp_path / "models"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--variant", "regnet_attr_bce_dice_outlier", "--config", str(cfg), "--data", str(store_dir), "--out", str(out)]
    res = _stage(args, launcher, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / f"seed_{SEED}" / "result.json").read_text())
    assert result["world_size"] == 2 and 0 <= result["best_val_dice"] <= 1
    assert (result["max_minutes"], result["epochs_done"], result["stop_reason"]) == (60, 2, "completed")
    assert (out / f"seed_{SEED}" / "model.safetensors").is_file() and (out / "summary.json").is_file()
    assert len(_tsv(out / f"seed_{SEED}", "val/dice")) == 2  # rank 0 alone logged


# --------------------------------------------------------------------------- the training step

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("native", "amp", "channels_last", "bf16_on", "cl_on"),
    [
        (True, True, True, True, False),  # AVX512-BF16 / AMX: bf16, no channels_last (it crashed, issue 21)
        (True, True, False, True, False),
        (True, False, True, False, False),  # channels_last alone was slower on CPU
        (False, True, True, False, False),  # emulated bf16 is slower than float32
    ],
)
def test_cpu_step_setup(monkeypatch, native, amp, channels_last, bf16_on, cl_on):
    import lggseg.training.step as T

    monkeypatch.setattr(T, "cpu_bf16", lambda: {"supported": True, "native": native})
    s = step_setup(TrainConfig(amp=amp, channels_last=channels_last, compile=True, cpu_threads=3), CPU)
    assert (s.bf16, s.channels_last) == (bf16_on, cl_on)
    # deterministic (resumable to the same weights), never compiled, the configured threads
    assert (s.deterministic, s.compile, s.cudnn_benchmark, s.threads) == (True, False, False, 3)


def test_cuda_step_setup_follows_the_config():
    s = step_setup(TrainConfig(amp=True, channels_last=False, compile=True), torch.device("cuda"))
    assert (s.bf16, s.channels_last, s.compile, s.cudnn_benchmark, s.deterministic) == (True, False, True, True, False)


def test_applied_restores_global_switches():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    setup = step_setup(TrainConfig(cpu_threads=threads + 1), CPU)
    with applied(setup, CPU):
        assert torch.get_num_threads() == threads + 1
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() is det


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, image, attributes=None):
        return self.conv(image)


@pytest.mark.parametrize("bf16", [False, True])
def test_train_step_updates_the_weights_with_a_float32_loss(bf16):
    from lggseg.losses import CompoundLoss

    torch.manual_seed(0)
    model = _Conv()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.conv.weight.detach().clone()
    x, y = torch.randn(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    logits, total, parts = train_step(model, opt, CompoundLoss(LossConfig(terms=("bce", "dice"))), x, y, None, 0, bf16)
    assert logits.shape == (2, 1, 16, 16) and logits.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert set(parts) == {"bce", "dice"}
    assert not torch.equal(before, model.conv.weight)


# --------------------------------------------------------------------------- data path and checkpoint interval


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_resident_data_path_trains_deterministically_on_cpu(store_dir, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lggseg.training")
    results = [train_variant(tiny_run(data_path="resident"), store_dir, tmp_path / f"r{k}", SEED) for k in (0, 1)]
    assert results[0]["data_path"] == "resident" and results[0]["history"] == results[1]["history"]
    a, b = _weights(tmp_path / "r0"), _weights(tmp_path / "r1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum("data path resident" in r.message for r in caplog.records) == 2  # once per run


def test_auto_data_path_keeps_the_loader_on_cpu(trained):
    assert trained[1]["data_path"] == "loader"


LEAN = """
import sys
sys.modules["albumentations"] = None  # import albumentations -> ImportError
sys.modules["dvclive"] = None
from pathlib import Path
import yaml
from lggseg.config import EvaluateConfig, PostprocessConfig, run_config_from_dict
from lggseg.evaluation.evaluate import evaluate_model
from lggseg.training import train_all_seeds

cfg, store, out = sys.argv[1:4]
run = run_config_from_dict(yaml.safe_load(Path(cfg).read_text()))
train_all_seeds(run, Path(store), Path(out))
result = evaluate_model(out, store, EvaluateConfig(bootstrap_samples=100), PostprocessConfig(), "cpu")
assert 0 <= result.metrics["dice_slice_mean"] <= 1
print("lean ok", sorted(m for m in ("albumentations", "dvclive") if sys.modules.get(m) is not None))
"""


def test_resident_training_and_evaluation_need_neither_albumentations_nor_dvclive(store_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run(2, data_path="resident").to_dict()))
    res = subprocess.run([sys.executable, "-c", LEAN, str(cfg), str(store_dir), str(tmp_path / "m")],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lean ok []" in res.stdout
    assert res.stderr.count("dvclive is not installed") == 1  # said once
    out = tmp_path / "m" / f"seed_{SEED}"
    result = json.loads((out / "result.json").read_text())
    lines = (out / "dvclive" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,train/loss,train/dice,val/loss,val/dice") and len(lines) == 3
    assert _tsv(out, "val/dice") == [row["val/dice"] for row in result["history"]]  # DVCLive's layout
    metrics = json.loads((out / "dvclive" / "metrics.json").read_text())
    assert metrics["val"]["dice"] == result["history"][-1]["val/dice"] and metrics["step"] == 1
    assert yaml.safe_load((out / "dvclive" / "params.yaml").read_text())["seed"] == SEED


@pytest.mark.bf16path
def test_fused_adam_is_the_same_update_rounded_differently(store_dir, tmp_path):
    """train.fused_adam: one step equals the default optimiser's to rounding; a run repeats exactly; the
    setting is part of the run fingerprint (training is chaotic, so whole runs drift apart)."""
    from lggseg.config import TrainConfig
    from lggseg.training.step import adam

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(32, 8)
    for net, fused in zip(nets, (False, True), strict=True):
        opt = adam(net.parameters(), TrainConfig(fused_adam=fused, lr=0.01))
        assert bool(opt.defaults["fused"]) is fused
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    fused = train_variant(tiny_run(1, fused_adam=True), store_dir, tmp_path / "f1", SEED)
    again = train_variant(tiny_run(1, fused_adam=True), store_dir, tmp_path / "f2", SEED)
    a, b = _weights(tmp_path / "f1"), _weights(tmp_path / "f2")
    assert fused["history"] == again["history"] and all(torch.equal(a[k], b[k]) for k in a)
    store_fp = store_fingerprint(store_dir)
    bf16 = step_setup(tiny_run(1).train, CPU).bf16  # the CPU's (or LGGSEG_CPU_BF16's) precision
    assert fused["hardware"]["bf16_autocast"] is bf16
    assert fused["fingerprint"] == run_fingerprint(tiny_run(1, fused_adam=True), SEED, store_fp, "cpu", bf16)
    assert fused["fingerprint"] != run_fingerprint(tiny_run(1), SEED, store_fp, "cpu", bf16)


def test_recalibrate_batchnorm_sets_the_exact_average_and_restores_state():
    from lggseg.training.step import recalibrate_batchnorm

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3, momentum=0.1)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, a=None):
            return self.drop(self.bn(x))

    net = Net().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * (i + 1) + i for i in range(3)]
    state = torch.get_rng_state()
    assert recalibrate_batchnorm(net, [(x, None) for x in batches]) == 1
    # equal weight per batch: mean of the batch means, mean of the unbiased batch variances
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    variances = torch.stack([x.transpose(0, 1).reshape(3, -1).var(dim=1) for x in batches]).mean(0)
    assert torch.allclose(net.bn.running_mean, means, atol=1e-5)
    assert torch.allclose(net.bn.running_var, variances, atol=1e-4)
    assert net.bn.momentum == 0.1 and not net.training  # restored
    assert torch.equal(torch.get_rng_state(), state)  # dropout in train mode drew from a forked stream
    assert recalibrate_batchnorm(torch.nn.Linear(2, 2), []) == 0


def test_bn_recalibration_in_training_is_deterministic_and_changes_the_run(store_dir, tmp_path):
    base = train_variant(tiny_run(1), store_dir, tmp_path / "base", SEED)
    one = train_variant(tiny_run(1, bn_recalibration_slices=12), store_dir, tmp_path / "r1", SEED)
    two = train_variant(tiny_run(1, bn_recalibration_slices=12), store_dir, tmp_path / "r2", SEED)
    a, b = _weights(tmp_path / "r1"), _weights(tmp_path / "r2")
    assert one["history"] == two["history"] and all(torch.equal(a[k], b[k]) for k in a)
    # the same training steps (the recalibration draws no random numbers), other BN statistics
    assert one["history"][0]["train/loss"] == base["history"][0]["train/loss"]
    ref = _weights(tmp_path / "base")
    stats = [k for k in a if k.endswith("running_mean")]
    assert stats and any(not torch.equal(a[k], ref[k]) for k in stats)
    assert one["fingerprint"] != base["fingerprint"]
