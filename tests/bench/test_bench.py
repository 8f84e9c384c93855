"""The benchmark runs and writes what it promises; its helpers compute what they claim (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lggseg.bench import loader, run, step, timing
from lggseg.config import ConfigError, LossConfig, TrainConfig, read_params
from lggseg.errors import DataError

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests check what the benchmark computes and writes, not speed; one torch thread keeps
    them fast on a busy machine, where spinning OpenMP threads slow small steps down ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- configuration


def test_committed_params_give_the_paper_model_with_every_loss_term():
    cfg = timing.bench_config(REPO / "params.yaml")
    params = read_params(REPO / "params.yaml")
    assert cfg.model.encoder == params["model"]["encoder"] and cfg.model.arch == "deeplabv3plus"
    assert cfg.model.pretrained is False and cfg.model.weights_file is None
    assert cfg.loss.terms == ("bce", "dice", "outlier")
    assert (cfg.loss.i, cfg.loss.j) == (params["loss"]["i"], params["loss"]["j"])
    assert cfg.bench == timing.BenchParams()


def test_partial_profile_override_keeps_the_other_defaults():
    p = timing.load_bench_params({"bench": {"cpu": {"reps": 7}, "outlier_js": [23, 45]}})
    assert p.cpu.reps == 7
    assert p.cpu.batch_size == timing.BenchParams().cpu.batch_size
    assert p.cuda == timing.BenchParams().cuda
    assert p.outlier_js == (23, 45)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"outlier_js": [20]}, "odd integers"),
        ({"outlier_js": []}, "odd integers"),
        ({"cpu": {"batch_size": 1}}, "at least 2"),
        ({"cpu": {"reps": 0}}, "reps must be a positive"),
        ({"cuda": {"warmup": -1}}, "warmup must be a non-negative"),
        ({"synthetic_cases": 2}, ">= 3"),
        ({"no_such_key": 1}, "unknown key"),
        ({"cpu": {"reps": "many"}}, "must be an integer"),
        ("fast", "must be a mapping"),
    ],
)
def test_bad_bench_section_is_rejected(section, message):
    with pytest.raises(ConfigError, match=message):
        timing.load_bench_params({"bench": section})


def test_j_smaller_than_i_is_rejected_before_any_work():
    with pytest.raises(ConfigError, match="smaller than loss.j"):
        step.bench_losses(LossConfig(i=7, j=21), torch.zeros(2, 1, 16, 16), 1.0, (5,), CPU, timing.BenchParams().cpu)


@pytest.mark.parametrize("seconds", [0.0, -3.0, float("nan"), float("inf")])
def test_bad_demo_seconds_are_rejected(seconds):
    with pytest.raises(ConfigError, match="demo-seconds"):
        timing.bench_config(REPO / "params.yaml", demo_seconds=seconds)


# --------------------------------------------------------------------------- device facts


@pytest.mark.parametrize(
    ("info", "key"),
    [
        ({"type": "cpu", "name": "AMD EPYC 7763 64-Core Processor"}, "cpu-amd-epyc-7763-64-core-processor"),
        ({"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "cuda-nvidia-h100-80gb-hbm3"),
        ({"type": "cpu", "name": "  Intel(R) Xeon(R)  "}, "cpu-intel-r-xeon-r"),
        ({"type": "cpu", "name": "???"}, "cpu-unknown"),
        ({"type": "cpu", "name": "AMD EPYC", "bf16": {"supported": True, "native": True}}, "cpu-amd-epyc"),
        ({"type": "cpu", "name": "AMD EPYC", "bf16": {"supported": True, "native": False}}, "cpu-amd-epyc-no-bf16"),
        ({"type": "cuda", "name": "H200", "bf16": {"supported": True, "native": False}}, "cuda-h200"),
    ],
)
def test_device_key(info, key):
    assert timing.device_key(info) == key


def test_device_info_names_the_conditions():
    info = timing.device_info(CPU)
    assert info["type"] == "cpu" and info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert set(info["bf16"]) == {"supported", "native"}
    assert timing.device_key(info).startswith("cpu-")


# --------------------------------------------------------------------------- timing and set-ups


@pytest.mark.parametrize(("warmup", "reps"), [(0, 1), (2, 3), (1, 5)])
def test_time_calls_runs_warmup_then_reps(warmup, reps):
    calls = []
    times = timing.time_calls(lambda: calls.append(1), CPU, warmup, reps)
    assert len(calls) == warmup + reps
    assert len(times) == reps and all(t >= 0 for t in times)


@pytest.mark.parametrize(
    ("warmup", "reps", "order"),
    [
        (0, 2, "abab"),
        (1, 1, "ab" + "ab"),  # warm-up of each, then one turn
        (2, 3, "aabb" + "ababab"),
    ],
)
def test_time_interleaved_takes_turns(warmup, reps, order):
    calls: list[str] = []
    times = timing.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, warmup, reps)
    assert "".join(calls) == order
    assert {k: len(v) for k, v in times.items()} == {"a": reps, "b": reps}


@pytest.mark.parametrize(
    ("candidates", "channels_last", "expected"),
    [
        (False, "", ["baseline", "ours"]),
        (True, "", ["baseline", "ours", "bf16"]),  # channels_last crashed libtorch_cpu (issue 21)
        (True, "unsafe", ["baseline", "ours", "channels_last", "bf16", "bf16_channels_last"]),
    ],
)
def test_cpu_candidates(candidates, channels_last, expected, monkeypatch):
    monkeypatch.setattr(step, "cpu_bf16", lambda: {"supported": True, "native": True})
    monkeypatch.setenv("LGGSEG_CPU_CHANNELS_LAST", channels_last)
    setups = step.candidate_setups(TrainConfig(), CPU, replace(timing.BenchParams(), candidates=candidates))
    assert [s.name for s in setups] == expected
    assert not any(s.compile for s in setups)  # never compiled on CPU


def test_cpu_without_bf16_gets_no_bf16_candidate(monkeypatch):
    monkeypatch.setattr(step, "cpu_bf16", lambda: {"supported": False, "native": False})
    monkeypatch.setenv("LGGSEG_CPU_CHANNELS_LAST", "unsafe")
    names = [s.name for s in step.candidate_setups(TrainConfig(), CPU, timing.BenchParams())]
    assert names == ["baseline", "ours", "channels_last"]


def test_duplicate_setups_are_timed_once():
    setups = [step.StepSetup("baseline"), step.StepSetup("ours"), step.StepSetup("cl", channels_last=True),
              step.StepSetup("cl2", channels_last=True)]
    assert [s.name for s in step._unique(setups)] == ["baseline", "cl"]


@pytest.mark.parametrize(
    ("device", "cores", "threads", "workers", "best_is_ours", "expected"),
    [
        ("cpu", 2, 2, 4, False, ["ours", "bf16", "bf16_threads1", "bf16_omp_passive"]),
        ("cpu", 8, 8, 4, False, ["ours", "bf16", "bf16_threads4", "bf16_omp_passive"]),
        ("cpu", 8, 8, 0, False, ["ours", "bf16", "bf16_omp_passive"]),
        ("cpu", 2, 2, 1, True, ["ours", "ours_threads1", "ours_omp_passive"]),
        ("cuda", 16, 16, 4, False, ["ours", "bf16"]),
        ("cuda", 16, 16, 4, True, ["ours"]),
    ],
)
def test_loop_variants(monkeypatch, device, cores, threads, workers, best_is_ours, expected):
    monkeypatch.setattr(timing.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: threads)
    ours = step.StepSetup("ours", deterministic=True)
    best = ours if best_is_ours else step.StepSetup("bf16", bf16=True)
    variants = loader.loop_variants(best, ours, torch.device(device), workers)
    assert [s.name for s, _ in variants] == expected
    for setup, env in variants:
        assert env == ({"OMP_WAIT_POLICY": "PASSIVE"} if setup.name.endswith("omp_passive") else {})
        if "_threads" in setup.name:
            assert setup.threads == int(setup.name.rsplit("threads", 1)[1]) and setup.bf16 == best.bf16


class _Conv(nn.Module):
    """A model with the project's forward signature whose FLOPs are known by hand."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)

    def forward(self, image, attributes=None):
        return self.conv(image)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "groups", "hw", "flops"),
    [
        (3, 4, 3, 1, 8, 2 * 4 * 3 * 9 * 64),  # 2 * Cout * Cin * k^2 * H * W
        (3, 1, 1, 1, 16, 2 * 1 * 3 * 1 * 256),
        (8, 8, 3, 4, 8, 2 * 8 * 2 * 9 * 64),  # grouped: Cin / groups inputs per output
    ],
)
def test_forward_flops_per_image(cin, cout, k, groups, hw, flops):
    model = _Conv(cin, cout, k, groups)
    batch = step.Batch(torch.randn(4, cin, hw, hw), torch.zeros(4, 1, hw, hw), None)
    assert step.forward_flops(model, batch) == flops
    assert model.training  # restored


def test_matmul_rate_is_positive():
    assert timing.matmul_rate(CPU, torch.float32, 64, warmup=1, reps=2) > 0


def test_loss_costs_have_every_term_and_the_j_sweep():
    target = torch.zeros(2, 1, 48, 48)
    target[:, :, 10:20, 10:20] = 1
    prof = timing.DeviceProfile(batch_size=2, warmup=0, reps=1, loss_reps=1, data_batches=1, infer_batches=1, matmul_size=8)
    out = step.bench_losses(LossConfig(terms=timing.ALL_TERMS, i=3, j=5), target, 0.5, (5, 9, 13), CPU, prof)
    assert set(out["terms"]) == {"bce", "dice", "outlier", "outlier_paper", "outlier_isolated_bce", "compound"}
    assert out["terms"]["outlier"]["mode"] == "paper"
    for term in out["terms"].values():
        assert term["share_of_step"] == pytest.approx(term["fwd_bwd_s"] / 0.5, rel=1e-2)
    sweep = out["outlier_by_j"]
    assert list(sweep["seconds"]) == ["5", "9", "13"] and sweep["pixels"] == 2 * 48 * 48
    for mode in ("paper", "isolated_bce"):
        med = [sweep["seconds"][j][f"{mode}_s"] for j in ("5", "9", "13")]
        fastest = [sweep["seconds"][j][f"{mode}_min_s"] for j in ("5", "9", "13")]
        assert all(f <= m for f, m in zip(fastest, med, strict=True))
        assert sweep["flatness"][mode]["max_over_min"] == pytest.approx(max(med) / min(med), rel=1e-2)
        ratio = max(fastest) / min(fastest)
        assert sweep["flatness"][mode]["max_over_min_fastest"] == pytest.approx(ratio, rel=1e-2)
        assert sweep["flatness"][mode]["flat"] is (ratio < timing.FLAT_RATIO_LIMIT)


@pytest.mark.parametrize(
    ("start", "cpus", "busy"),
    [(0.3, 2, False), (1.0, 2, False), (1.2, 2, True), (5.9, 2, True), (7.0, 16, False), (None, 2, False)],
)
def test_machine_load_flags_a_busy_machine(monkeypatch, start, cpus, busy):
    monkeypatch.setattr(timing.os, "cpu_count", lambda: cpus)
    assert timing.machine_load(start, 9.9) == {"start": start, "end": 9.9, "cpu_count": cpus, "busy": busy}


def _windowed_sum_loss(cfg, mode):
    """A direct j x j window sum: O(j^2) work per pixel, what the flatness check must catch."""
    kernel = torch.ones(1, 1, cfg.j, cfg.j)
    return lambda logits, target: F.conv2d(logits, kernel, padding=cfg.j // 2).mean()


@pytest.mark.parametrize(("fn", "flat"), [(None, True), (_windowed_sum_loss, False)], ids=["box_sum", "direct_window"])
def test_flatness_check_tells_o1_from_oj2(monkeypatch, fn, flat):
    if fn is not None:
        monkeypatch.setattr(step, "outlier_loss_fn", fn)
    prof = timing.DeviceProfile(batch_size=2, warmup=1, reps=1, loss_reps=5, data_batches=1, infer_batches=1, matmul_size=8)
    target = (torch.rand(2, 1, 128, 128) > 0.9).float()
    out = step.bench_losses(LossConfig(terms=timing.ALL_TERMS, i=1, j=3), target, 1.0, (3, 31), CPU, prof)
    assert all(v["flat"] is flat for v in out["outlier_by_j"]["flatness"].values())


# --------------------------------------------------------------------------- inputs and outputs


@pytest.mark.parametrize(
    ("content", "seconds", "source"),
    [
        ({"seconds": 412.5}, 412.5, "file"),
        ({"seconds": 90, "command": "dvc repro"}, 90.0, "file"),
        (None, None, "not measured"),
    ],
)
def test_demo_time_from_file(tmp_path, content, seconds, source):
    path = tmp_path / "demo_time.json"
    if content is not None:
        path.write_text(json.dumps(content))
    out = timing.demo_time(None, path)
    assert out["seconds"] == seconds
    if source == "file":
        assert out["source"] == str(path)
    else:
        assert out["source"].startswith(source) and str(path) in out["source"]


def test_demo_seconds_argument_wins_over_the_file(tmp_path):
    path = tmp_path / "demo_time.json"
    path.write_text(json.dumps({"seconds": 5}))
    assert timing.demo_time(321.0, path) == {"seconds": 321.0, "source": "--demo-seconds"}


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"seconds": -1}', '{"seconds": true}', '{"wall": 3}'])
def test_bad_demo_time_file_is_an_error(tmp_path, text):
    path = tmp_path / "demo_time.json"
    path.write_text(text)
    with pytest.raises(DataError, match="demo_time.json"):
        timing.demo_time(None, path)


def test_merge_keeps_other_devices(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"cuda-nvidia-h100": {"x": 1}, "cpu-old": {"y": 2}}))
    doc = run._merge_write(out, "cpu-old", {"y": 3})
    assert doc == json.loads(out.read_text()) == {"cuda-nvidia-h100": {"x": 1}, "cpu-old": {"y": 3}}


@pytest.mark.parametrize("text", ["{broken", "[1]"])
def test_merge_refuses_a_damaged_file(tmp_path, text):
    out = tmp_path / "bench.json"
    out.write_text(text)
    with pytest.raises(DataError, match="bench.json"):
        run._merge_write(out, "cpu-x", {})
    assert out.read_text() == text


def _stage():
    spec = importlib.util.spec_from_file_location("stage_bench", REPO / "stages" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("main", [lambda argv: _stage().main(argv), run.main], ids=["stage", "cli"])
def test_bad_params_give_one_line_and_exit_2(tmp_path, capsys, main):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"bench": {"cpu": {"reps": 0}}}))
    assert main(["--params", str(params), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: bench.<device>.reps must be a positive integer") and "\n" not in err
    assert not (tmp_path / "b.json").exists()


def test_cli_overrides_reach_both_profiles():
    args = run.build_parser().parse_args(
        ["--params", str(REPO / "params.yaml"), "--batch-size", "6", "--reps", "2", "--no-candidates", "--no-compile"]
    )
    cfg = run.config_from_args(args)
    assert (cfg.bench.cpu.batch_size, cfg.bench.cpu.reps, cfg.bench.cuda.batch_size, cfg.bench.cuda.reps) == (6, 2, 6, 2)
    assert cfg.bench.cpu.warmup == timing.BenchParams().cpu.warmup
    assert cfg.bench.candidates is False and cfg.bench.compile is False


def test_cli_missing_params_file(tmp_path, capsys):
    assert run.main(["--params", str(tmp_path / "missing.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end


def _tiny_params(tmp_path: Path) -> Path:
    params = read_params(REPO / "params.yaml")
    params["common"] = {**params["common"], "image_size": 64, "device": "cpu"}
    params["model"] = {**params["model"], "encoder": "resnet10t", "decoder_channels": 32, "attribute_hidden": 16}
    params["train"] = {**params["train"], "num_workers": 1}
    tiny = {"batch_size": 2, "warmup": 0, "reps": 1, "loss_reps": 1, "data_batches": 2, "infer_batches": 1,
            "matmul_size": 64}
    params["bench"] = {"cpu": tiny, "candidates": False, "outlier_js": [21, 41], "path_sizes": [32, 64],
                       "path_rounds": 1, "concurrent_cases": 3, "concurrent_cpu_size": 32}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_stage_writes_every_figure_and_keeps_other_devices(tmp_path):
    out = tmp_path / "metrics" / "bench.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"cuda-some-gpu": {"kept": True}}))
    (tmp_path / "demo_time.json").write_text(json.dumps({"seconds": 123.0}))
    rc = _stage().main(["--params", str(_tiny_params(tmp_path)), "--out", str(out),
                     "--demo-time-file", str(tmp_path / "demo_time.json")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["cuda-some-gpu"] == {"kept": True}
    (key,) = [k for k in doc if k.startswith("cpu-")]
    e = doc[key]
    assert e["key"] == key and e["settings"]["image_size"] == 64 and e["settings"]["batch_size"] == 2
    assert set(e["training"]["setups"]) == {"baseline", "ours"}
    loaded = e["training"]["with_loader"]
    assert "ours" in loaded and any(name.endswith("_omp_passive") for name in loaded)
    assert all(v["images_per_s"] > 0 and v["workers"] == 1 for v in loaded.values())
    assert e["training"]["with_loader_recommended"] in loaded
    assert e["training"]["speedup"] == e["training"]["setups"]["ours"]["speedup_vs_baseline"]
    assert e["training"]["setups"]["baseline"]["speedup_vs_baseline"] == 1.0
    for section in ("training", "loss", "data", "inference"):
        assert set(e[section]["conditions"]) == {"device", "torch", "threads", "image_size", "batch_size"}
    assert {"bce", "dice", "outlier"} <= set(e["loss"]["terms"])
    assert list(e["loss"]["outlier_by_j"]["seconds"]) == ["21", "41"]
    assert e["data"]["loader"]["workers"] == 1 and e["data"]["ratio"] > 0 and "workers_needed" in e["data"]
    assert e["inference"]["plain"]["slices_per_s"] > 0 and e["inference"]["tta"]["slices_per_s"] > 0
    assert e["model"]["forward_gflop_per_image"] > 0
    assert e["model"]["train_gflop_per_image"] == pytest.approx(3 * e["model"]["forward_gflop_per_image"], rel=1e-3)
    assert "float32" in e["matmul_tflops"]
    assert e["demo_repro"] == {"seconds": 123.0, "source": str(tmp_path / "demo_time.json")}
    assert set(e["machine_load"]) == {"start", "end", "cpu_count", "busy"}
    assert list(e["data_paths"]["sizes"]) == ["32px", "64px"] and e["concurrent"]["identical_results"] is True


def test_store_is_the_given_one_or_a_synthetic_one(tmp_path):
    from lggseg.config import load_section
    from lggseg.data.manifest import build_manifest
    from lggseg.data.synthetic import generate_demo

    params = read_params(_tiny_params(tmp_path))
    cfg = timing.bench_config(params, demo_time_file=None)
    with loader.open_store(cfg) as (store, source):
        assert source == "synthetic demo store (3 cases)"
        root = Path(store.root)
        assert len(store.indices("train")) > 0
    assert not root.exists()  # the temporary store is removed
    raw = generate_demo(tmp_path / "raw", n_cases=3, seed=5)
    build_manifest(raw, tmp_path / "manifest", load_section("common", params), load_section("manifest", params))
    with loader.open_store(replace(cfg, data_dir=tmp_path / "manifest")) as (store, source):
        assert source == str(tmp_path / "manifest") and len(store) > 0


# --------------------------------------------------------------------------- issue #11: data paths, concurrent variants


@pytest.mark.parametrize(("section", "message"), [
    ({"path_sizes": []}, "at least one image size"),
    ({"path_sizes": [40]}, "multiples of 16"),
    ({"path_rounds": 0}, "path_rounds"),
    ({"concurrent_cases": 2}, "concurrent_cases"),
    ({"concurrent_cpu_size": 16}, ">= 32"),
])
def test_bad_paths_settings_are_rejected(section, message):
    with pytest.raises(ConfigError, match=message):
        timing.load_bench_params({"bench": section})


def _paths_config(tmp_path):
    params = read_params(REPO / "params.yaml")
    params["common"] = {**params["common"], "device": "cpu"}
    params["model"] = {**params["model"], "encoder": "test_efficientnet", "decoder_channels": 16, "attribute_hidden": 8}
    params["train"] = {**params["train"], "num_workers": 0, "batch_size": 2, "cpu_threads": 1}
    params["bench"] = {"path_sizes": [32, 48], "path_rounds": 2, "concurrent_cases": 3, "concurrent_cpu_size": 32}
    return timing.bench_config(params, demo_time_file=None)


@pytest.mark.slow
def test_data_paths_and_concurrent_variants_at_a_tiny_size(tmp_path):
    from lggseg.bench.paths import bench_concurrent, bench_data_paths

    cfg = _paths_config(tmp_path)
    profile = timing.DeviceProfile(batch_size=2, warmup=0, reps=2, loss_reps=1, data_batches=1, infer_batches=1,
                                  matmul_size=8)
    with loader.open_store(cfg) as (store, _):
        paths = bench_data_paths(cfg, store, CPU, profile, 2)
    assert list(paths["sizes"]) == ["32px", "48px"] and paths["rounds"] == 2 and paths["steps_per_block"] == 2
    for entry in paths["sizes"].values():
        for path in ("loader", "resident"):
            assert entry[path]["images_per_s"] > 0 and len(entry[path]["block_s"]) == 2
        ratio = entry["resident"]["images_per_s"] / entry["loader"]["images_per_s"]
        assert entry["ratio_resident_over_loader"] == pytest.approx(ratio, rel=1e-2)
        assert entry["loader"]["workers"] == 0 and entry["resident"]["resident_load_s"] >= 0
    conc = bench_concurrent(cfg, CPU)
    assert conc["image_size"] == 32 and conc["cases"] == 3 and conc["data_path"] == "resident"
    assert set(conc["variants"]) == {"bench_full_loss", "bench_bce"}
    assert conc["ratio_concurrent_over_sequential"] == pytest.approx(conc["concurrent_s"] / conc["sequential_s"], rel=1e-2)
    assert conc["identical_results"] is True  # on the CPU both modes give the same runs
