"""Several variants trained in one process (lggseg.training.concurrent): each gets exactly its result alone."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import SEED, tiny_run

from lggseg.config import ConfigError
from lggseg.errors import TrainingError
from lggseg.training import train_variant, train_variants
from lggseg.training.concurrent import RandomState

CPU = torch.device("cpu")


def _variants():
    """Three tiny variants that differ in encoder, loss, attributes and data path; two share the resident data."""
    a = tiny_run(2)  # DataLoader path, BCE + Dice + outlier, attribute encoder
    b = tiny_run(2, loss={"terms": ["bce"]}, data_path="resident")
    b = dataclasses.replace(b, variant="b", model=dataclasses.replace(b.model, encoder="test_resnet", attributes=False))
    c = tiny_run(2, loss={"terms": ["bce", "dice"]}, data_path="resident", batch_size=2)
    c = dataclasses.replace(c, variant="c")
    return [a, b, c]


def _same(out_a, res_a, out_b, res_b):
    assert res_a["history"] == res_b["history"]
    assert (res_a["best_epoch"], res_a["best_val_dice"]) == (res_b["best_epoch"], res_b["best_val_dice"])
    assert res_a["fingerprint"] == res_b["fingerprint"]
    wa, wb = load_file(str(out_a / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_concurrent_equals_alone(store_dir, tmp_path, monkeypatch):
    import lggseg.data.resident as R

    runs = _variants()
    alone = [train_variant(run, store_dir, tmp_path / "alone" / run.variant, SEED) for run in runs]
    loads = []
    init = R.ResidentBatches.__init__

    def counted(self, store, indices, size, *args, **kwargs):
        loads.append(len(indices))
        return init(self, store, indices, size, *args, **kwargs)

    monkeypatch.setattr(R.ResidentBatches, "__init__", counted)
    random.seed(99)
    torch.manual_seed(99)
    before = (random.random(), torch.rand(1))
    random.seed(99)
    torch.manual_seed(99)
    import lggseg.training.trainer as T

    nets, step = [], T.train_step
    monkeypatch.setattr(T, "train_step", lambda net, *args: nets.append(id(net)) or step(net, *args))
    seen, epochs = [], []
    together = train_variants(runs, store_dir, [tmp_path / "together" / r.variant for r in runs], SEED,
                              on_result=lambda k, res: seen.append(k), on_epoch=lambda k, row: epochs.append((k, row)))
    assert (random.random(), torch.rand(1)) == before  # the caller's random streams are put back
    assert len(set(nets[:3])) == 3 and nets[3:6] == nets[:3]  # the runs take turns step by step
    assert seen == [0, 1, 2]  # a and b finish in the same round, c (batch 2: twice the steps) after them
    assert len(loads) == 2  # b and c share one device copy of train and one of val
    for k, res in enumerate(together):  # every epoch's row handed out live, once, as the result records it
        assert [row for j, row in epochs if j == k] == res["history"]
    for run, res_alone, res_together in zip(runs, alone, together, strict=True):
        _same(tmp_path / "alone" / run.variant, res_alone, tmp_path / "together" / run.variant, res_together)
        stored = json.loads((tmp_path / "together" / run.variant / "result.json").read_text())
        assert stored == res_together and stored["epochs_done"] == 2
        assert (tmp_path / "together" / run.variant / "dvclive").is_dir()
    assert [r["data_path"] for r in together] == ["loader", "resident", "resident"]


def test_random_state_round_trip():
    state = RandomState.capture(CPU)
    first = (random.random(), np.random.rand(), torch.rand(2))
    state.restore(CPU)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_a_failing_run_does_not_stop_the_others(store_dir, tmp_path, monkeypatch):
    import lggseg.training.trainer as T

    good = tiny_run(1)
    too_big = dataclasses.replace(good, variant="big", train=dataclasses.replace(good.train, batch_size=10_000))
    dies = dataclasses.replace(good, variant="dies", model=dataclasses.replace(good.model, attributes=False))
    step = T.train_step

    def maybe_die(net, optimizer, loss_fn, x, y, a, *rest):
        if a is None:  # the run without attributes
            raise TrainingError("dies in its first step")
        return step(net, optimizer, loss_fn, x, y, a, *rest)

    monkeypatch.setattr(T, "train_step", maybe_die)
    runs, outs = [too_big, good, dies], [tmp_path / n for n in ("big", "good", "dies")]
    errors = {}
    results = train_variants(runs, store_dir, outs, SEED, on_error=lambda k, exc: errors.setdefault(k, str(exc)))
    assert results[0] is None and results[2] is None and results[1]["epochs_done"] == 1
    assert "fewer than train.batch_size" in errors[0] and errors[2] == "dies in its first step"
    assert (outs[1] / "result.json").is_file() and not (outs[2] / "result.json").exists()
    with pytest.raises(TrainingError, match="dies in its first step"):  # without on_error: raised at the end
        train_variants(runs[1:], store_dir, [tmp_path / "good2", tmp_path / "dies2"], SEED)
    assert (tmp_path / "good2" / "result.json").is_file()


def test_bad_combinations_are_config_errors(store_dir, tmp_path):
    run = tiny_run(1)
    with pytest.raises(ConfigError, match="same output folder"):
        train_variants([run, run], store_dir, [tmp_path / "x", tmp_path / "x"], SEED)
    other = dataclasses.replace(run, common=dataclasses.replace(run.common, device="cuda"))
    with pytest.raises(ConfigError, match="different devices"):
        train_variants([run, other], store_dir, [tmp_path / "x", tmp_path / "y"], SEED)
    with pytest.raises(ValueError, match="2 runs, 1 output"):
        train_variants([run, run], store_dir, [tmp_path / "x"], SEED)


def test_a_view_shares_the_device_tensors_and_batches_like_its_own_copy(store_dir):
    from lggseg.config import AugmentConfig
    from lggseg.data.resident import ResidentBatches
    from lggseg.data.store import load_store

    store = load_store(store_dir)
    rows = store.indices("train")
    base = ResidentBatches(store, rows, 32, CPU, 8)
    options = {"augment": AugmentConfig(extra=True), "seed": 3, "shuffle": True, "drop_last": True}
    view, own = base.view(4, **options), ResidentBatches(store, rows, 32, CPU, 4, **options)
    assert view.images is base.images and view.masks is base.masks and len(view) == len(own) != len(base)
    for epoch in (0, 1):
        view.set_epoch(epoch)
        own.set_epoch(epoch)
        for a, b in zip(view, own, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert base.batch_size == 8 and base.augment is None and not base.shuffle  # the original is untouched
