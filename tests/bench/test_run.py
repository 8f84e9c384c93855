"""lggseg.bench.run: its settings are checked before any work, bench.json keeps other devices, and a run
writes every figure the README's "Performance" section reports (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from lggseg.bench import measure, run
from lggseg.config import ConfigError, read_params
from lggseg.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def test_committed_params_give_the_paper_model_with_every_loss_term():
    cfg = run.bench_config(REPO / "params.yaml")
    params = read_params(REPO / "params.yaml")
    assert (cfg.model.arch, cfg.model.encoder) == (params["model"]["arch"], params["model"]["encoder"])
    assert cfg.model.pretrained is False and cfg.model.weights_file is None
    assert cfg.loss.terms == ("bce", "dice", "outlier")
    assert cfg.profile(torch.device("cpu")) == run.PROFILES["cpu"]
    assert cfg.profile(torch.device("cuda"))["batch"] == params["train"]["batch_size"]  # 0 in the profile


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 1}, "at least 2"),
    ({"reps": 0}, "reps must be at least 1"),
    ({"concurrent_cpu_size": 40}, "multiple of 16"),
    ({"concurrent_cpu_size": 16}, "at least 32"),
])
def test_bad_settings_are_rejected(options, message):
    with pytest.raises(ConfigError, match=message):
        run.bench_config(REPO / "params.yaml", **options)


def _stage():
    spec = importlib.util.spec_from_file_location("stage_bench", REPO / "stages" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("main", [lambda argv: _stage().main(argv), run.main], ids=["stage", "cli"])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, main):
    assert main(["--params", str(REPO / "params.yaml"), "--reps", "0", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bench: --reps must be at least 1, got 0"
    assert not (tmp_path / "b.json").exists()


def test_missing_params_file(tmp_path, capsys):
    assert run.main(["--params", str(tmp_path / "missing.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_merge_keeps_other_devices(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"cuda-nvidia-h100": {"x": 1}, "cpu-old": {"y": 2}}))
    doc = run.merge_write(out, "cpu-old", {"y": 3})
    assert doc == json.loads(out.read_text()) == {"cuda-nvidia-h100": {"x": 1}, "cpu-old": {"y": 3}}


@pytest.mark.parametrize("text", ["{broken", "[1]"])
def test_merge_refuses_a_damaged_file(tmp_path, text):
    out = tmp_path / "bench.json"
    out.write_text(text)
    with pytest.raises(DataError, match="bench.json"):
        run.merge_write(out, "cpu-x", {})
    assert out.read_text() == text


def _tiny(tmp_path: Path, **options) -> run.BenchConfig:
    params = read_params(REPO / "params.yaml")
    params["common"] = {**params["common"], "image_size": 64, "device": "cpu"}
    params["model"] = {**params["model"], "encoder": "resnet10t", "decoder_channels": 32, "attribute_hidden": 16}
    params["train"] = {**params["train"], "num_workers": 1, "batch_size": 2, "cpu_threads": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return run.bench_config(tmp_path / "params.yaml", batch_size=2, reps=1, outlier_js=(21, 41),
                            concurrent_cases=3, concurrent_cpu_size=32, **options)


def test_store_is_the_given_one_or_a_synthetic_one(tmp_path):
    cfg = _tiny(tmp_path)
    with run.open_store(cfg) as (store, source):
        assert source == "synthetic demo store (3 cases)" and len(store.indices("train")) > 0
        root = Path(store.root)
        with run.open_store(run.bench_config(tmp_path / "params.yaml", data_dir=root)) as (given, where):
            assert where == str(root) and len(given) == len(store)
    assert not root.exists()  # the temporary store is removed


@pytest.mark.slow
def test_a_run_writes_every_reported_figure_and_keeps_other_devices(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"cuda-some-gpu": {"kept": True}}))
    e = run.run_benchmark(_tiny(tmp_path), out, "cpu")
    doc = json.loads(out.read_text())
    assert doc["cuda-some-gpu"] == {"kept": True} and doc[e["key"]] == e and e["key"].startswith("cpu-")
    assert e["settings"]["image_size"] == 64 and e["settings"]["batch_size"] == 2
    setups = e["training"]["setups"]
    assert {"baseline", "ours"} <= set(setups) and setups["baseline"]["speedup_vs_baseline"] == 1.0
    for v in setups.values():
        # ratios are stored to 3 significant digits, computed from the stored (4-digit) rates
        assert v["speedup_vs_baseline"] == measure.r4(v["images_per_s"] / setups["baseline"]["images_per_s"], 3)
    assert e["training"]["speedup"] == setups[e["training"]["ours"]]["speedup_vs_baseline"]
    assert set(e["loss"]["terms"]) == {"bce", "dice", "outlier_paper", "outlier_isolated_bce"}
    assert list(e["loss"]["outlier_by_j"]["seconds"]) == ["21", "41"]
    assert e["loss"]["step_s"] == setups[e["training"]["ours"]]["step"]["median_s"]
    data = e["data"]
    assert data["loader"]["workers"] == 1 and data["model_images_per_s"] == setups[e["training"]["ours"]]["images_per_s"]
    assert data["ratio"] == measure.r4(data["loader"]["images_per_s"] / data["model_images_per_s"], 3)
    assert e["inference"]["plain"]["slices_per_s"] > 0 and e["inference"]["tta"]["slices_per_s"] > 0
    assert "data_paths" not in e
    conc = e["concurrent"]
    assert conc["image_size"] == 32 and set(conc["variants"]) == {"bench_full_loss", "bench_bce"}
    assert conc["identical_results"] is True  # on the CPU both modes give the same runs
    load = e["machine_load"]
    assert load["busy"] == (load["start"] is not None and load["start"] > 0.5 * load["cpu_count"])
    assert len(run.summary_lines(e)) >= 6
