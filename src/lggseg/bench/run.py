"""Benchmark of the hot paths of training and inference (issue #6; the model of paper sections 3.1-3.4).

One call of :func:`run_benchmark` measures, on whatever device it is given, and merges into
``metrics/bench.json`` under a per-device key (``cpu-amd-epyc``, ``cuda-nvidia-h100-80gb-hbm3``, ...)
so that CPU and CUDA results live side by side:

1. **Training throughput** (images/s) of the configured network (DeepLabv3+ ``regnetz_040`` with the
   attribute encoder, at ``common.image_size``) with the full eq. 13 loss, for a small set of step
   set-ups on one fixed batch: the plain baseline (fp32, contiguous, no compile, torch's default
   threads), the set-up :mod:`lggseg.training.trainer` uses on this device ("ours"), and the candidates that
   could make it faster (channels_last, bf16 autocast, both, and ``torch.compile`` on CUDA; bf16
   only where the CPU supports bf16). Each reports its speed-up over the baseline; the best one
   is named so that a real win can be adopted by the training code. Then "ours" and the best are
   timed again **fed by the real DataLoader**, whose workers share the cores with the step: on a
   small CPU box that contention, not arithmetic, can decide the speed, so the CPU also tries fewer
   torch threads and ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads that sleep instead of spinning
   while they wait; tried in a subprocess because OpenMP reads it at start-up).
2. **Loss cost**: forward + backward time of each term of eq. 13 (BCE, Dice, outlier in both modes,
   and the whole compound loss) on logits of the training batch's shape, as a share of "our"
   training step; and the outlier terms at ``j`` = 21, 41, 81, which must stay flat (their box
   counts are O(1) per pixel whatever the window).
3. **Data pipeline**: images/s that the training DataLoader (memmap read, resize, augmentation,
   ``train.num_workers`` workers) delivers, divided by the images/s that "our" training step
   consumes; it must stay above :data:`DATA_RATIO_TARGET` or the GPU waits for the CPU.
4. **Inference**: slices/s of the inference function of ``lggseg predict``, with and without TTA.
5. **Data paths and concurrent variants** (:mod:`lggseg.bench.paths`, issue #11; ``--no-paths`` skips
   them): the whole training step fed by the device-resident path against the DataLoader path at 64
   and 256 px, and two variants trained at once (:mod:`lggseg.training.concurrent`) against one after another.
6. **Demo wall time**: the time of the whole demo ``dvc repro``, taken as an input (it is far too
   long to run here) and recorded with its source.

Plus the model's size and forward FLOPs per image (``torch.utils.flop_counter``), the measured
matmul rate of the device (fp32 and bf16) and the share of it that training achieves.

Timing: every figure is the median of ``reps`` repetitions after ``warmup`` untimed ones (the first
call, which pays for cudnn autotuning or compilation, is reported apart); on CUDA each repetition
is bracketed by CUDA events read after one synchronisation, so asynchronous launches are neither
missed nor double-counted. Things that are compared (the step set-ups, the loss terms and the j
sweep, inference with and without TTA) are timed in turns, repetition by repetition, so that a busy
neighbour slows them alike and their ratios hold. The loader-fed loop is timed as wall time of
``reps`` steps between two synchronisations. Timings are still noisy on a shared machine: the
load average before and after is recorded (``machine_load``) and ``all_s`` keeps every repetition. The input of the isolated step is one augmented batch of the store, the
weights are random (speed does not depend on them), and every set-up starts from the same weights.

Modules: :mod:`~lggseg.bench.step` measures 1, 2 and 4 on the fixed batch, :mod:`~lggseg.bench.loader`
3 and the loader-fed loop, :mod:`~lggseg.bench.paths` 5; :mod:`~lggseg.bench.timing` holds the
parameters, the timers and 6.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lggseg.bench.loader import bench_data, bench_with_loader, first_batch, loop_variants, open_store
from lggseg.bench.step import bench_inference, bench_losses, bench_training, candidate_setups, forward_flops
from lggseg.bench.timing import (
    DATA_RATIO_TARGET,
    DEMO_TIME_FILE,
    BenchConfig,
    _r,
    bench_config,
    demo_time,
    device_info,
    device_key,
    load_average,
    machine_load,
    matmul_rate,
)
from lggseg.config import (
    deep_merge,
    read_params,
)
from lggseg.errors import DataError, LggsegError
from lggseg.io import write_json
from lggseg.runtime import resolve_device
from lggseg.training.step import step_setup

# --------------------------------------------------------------------------- the whole run


def _conditions(info: Mapping[str, Any], threads: int, image_size: int, batch_size: int) -> dict[str, Any]:
    return {"device": info["name"], "torch": info["torch"], "threads": threads,
            "image_size": image_size, "batch_size": batch_size}


def _merge_write(out_json: Path, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if out_json.is_file():
        try:
            doc = json.loads(out_json.read_text())
        except ValueError as exc:
            raise DataError(f"{out_json}: existing benchmark file is not valid JSON ({exc}); move it away") from None
        if not isinstance(doc, dict):
            raise DataError(f"{out_json}: existing benchmark file is not a JSON object; move it away")
    doc[key] = entry
    write_json(out_json, doc)
    return doc


def run_benchmark(cfg: BenchConfig, out_json: str | Path, device: str | torch.device = "auto") -> dict[str, Any]:
    """Run every measurement on ``device``, merge them into ``out_json`` under this device's key.

    Returns this device's block (its key under ``"key"``).
    """
    t_start = time.perf_counter()
    load_start = load_average()
    dev = resolve_device(device, indexed=True)
    profile = cfg.bench.profile(dev)
    batch_size = profile.batch_size or cfg.train.batch_size
    size = cfg.common.image_size
    info = device_info(dev)
    key = device_key(info)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    setups = candidate_setups(cfg.train, dev, cfg.bench)
    # model + per-setup steps + loss + data + inference + matmul
    paths = cfg.bench.paths
    progress = tqdm(total=len(setups) + 5 + 2 * paths, desc=f"bench {key}", unit="part")
    try:
        with open_store(cfg) as (store, store_source):
            torch.manual_seed(cfg.common.seed)
            n_attr = int(store.attributes.shape[1]) if cfg.model.attributes else 0
            from lggseg.models import build_model, count_parameters

            model = build_model(cfg.model, n_attr, size).to(dev)
            batch = first_batch(store, cfg, batch_size, dev)
            fwd_flops = forward_flops(model, batch)
            progress.update()

            training = bench_training(model, cfg.loss, batch, setups, dev, profile, cfg.train.lr, progress)
            base_ips = training["baseline"]["images_per_s"]
            for entry in training.values():
                entry["speedup_vs_baseline"] = _r(entry["images_per_s"] / base_ips, 3)
            best = max(training, key=lambda n: training[n]["images_per_s"])
            ours = next(s.name for s in setups if s.knobs() == step_setup(cfg.train, dev).knobs())
            by_name = {s.name: s for s in setups}
            variants = loop_variants(by_name[best], by_name[ours], dev, cfg.train.num_workers)
            progress.total += len(variants)
            with_loader = bench_with_loader(model, cfg, store, variants, dev, profile, batch_size, progress)
            recommended = max(with_loader, key=lambda n: with_loader[n]["images_per_s"])
            ours_ips = training[ours]["images_per_s"]
            ours_step = training[ours]["step"]["median_s"]
            threads = training[ours]["threads"]

            progress.set_postfix_str("matmul rate")
            rates = {"float32": matmul_rate(dev, torch.float32, profile.matmul_size)}
            bf16_ok = info["bf16"] if dev.type == "cuda" else info["bf16"]["supported"]
            if bf16_ok:
                rates["bfloat16"] = matmul_rate(dev, torch.bfloat16, profile.matmul_size)
            progress.update()
            train_flops = 3.0 * fwd_flops
            for entry in training.values():
                achieved = train_flops * entry["images_per_s"]
                dtype = "bfloat16" if entry["setup"]["bf16"] and "bfloat16" in rates else "float32"
                entry["achieved_tflops"] = _r(achieved / 1e12, 3)
                entry["share_of_matmul_rate"] = {"dtype": dtype, "share": _r(achieved / (rates[dtype] * 1e12), 3)}

            progress.set_postfix_str("loss terms")
            losses = bench_losses(cfg.loss, batch.mask, ours_step, cfg.bench.outlier_js, dev, profile)
            progress.update()
            progress.set_postfix_str("data loader")
            data = bench_data(store, cfg, batch_size, ours_ips, dev, profile)
            progress.update()
            progress.set_postfix_str("inference")
            native = (int(store.masks.shape[1]), int(store.masks.shape[2]))
            inference = bench_inference(model, batch, native, dev, profile)
            progress.update()
            n_params = count_parameters(model)
            data_paths = concurrent = None
            if paths:
                from lggseg.bench.paths import bench_concurrent, bench_data_paths

                del model, batch
                progress.set_postfix_str("resident vs loader path")
                data_paths = bench_data_paths(cfg, store, dev, profile, batch_size)
                progress.update()
                progress.set_postfix_str("two variants at once vs one after another")
                concurrent = bench_concurrent(cfg, dev)
                progress.update()
    finally:
        progress.close()

    cond = _conditions(info, threads, size, batch_size)
    entry: dict[str, Any] = {
        "key": key,
        "measured_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": info,
        "settings": {
            "arch": cfg.model.arch, "encoder": cfg.model.encoder, "attributes": cfg.model.attributes,
            "n_attributes": n_attr, "image_size": size, "batch_size": batch_size, "loss_terms": list(cfg.loss.terms),
            "outlier_mode": cfg.loss.outlier_mode, "warmup": profile.warmup, "reps": profile.reps,
            "loss_reps": profile.loss_reps, "data_batches": profile.data_batches,
            "infer_batches": profile.infer_batches, "statistic": "median", "store": store_source,
        },
        "model": {
            "parameters_m": _r(n_params / 1e6),
            "forward_gflop_per_image": _r(fwd_flops / 1e9),
            "train_gflop_per_image": _r(train_flops / 1e9),
            "flop_note": "train = 3 x forward (backward ~ 2 x forward); FlopCounterMode over-counts the "
                         "backward of grouped convolutions (regnetz), so it is not counted directly",
        },
        "matmul_tflops": {k: _r(v, 3) for k, v in rates.items()} | {"n": profile.matmul_size},
        "training": {
            "conditions": cond,
            "ours": ours,
            "speedup": training[ours]["speedup_vs_baseline"],
            "best": best,
            "best_speedup": training[best]["speedup_vs_baseline"],
            "setups": training,
            "with_loader": with_loader,
            "with_loader_recommended": recommended,
            "with_loader_gain_vs_ours": _r(with_loader[recommended]["images_per_s"] / with_loader[ours]["images_per_s"], 3),
        },
        "loss": {"conditions": cond, **losses},
        "data": {"conditions": cond, **data},
        "inference": {"conditions": cond, **inference},
        **({"data_paths": data_paths, "concurrent": concurrent} if paths else {}),
        "demo_repro": demo_time(cfg.demo_seconds, cfg.demo_time_file),
        "machine_load": machine_load(load_start, load_average()),
    }
    entry["bench_seconds"] = _r(time.perf_counter() - t_start)
    _merge_write(Path(out_json), key, entry)
    return entry


def summary_lines(entry: Mapping[str, Any]) -> list[str]:
    """A few human-readable lines of one device's results."""
    tr, loss, data, inf = entry["training"], entry["loss"], entry["data"], entry["inference"]
    s = tr["setups"]
    lines = [f"{entry['key']} ({entry['settings']['encoder']}, {entry['settings']['image_size']}px, "
             f"batch {entry['settings']['batch_size']}, {tr['conditions']['threads']} threads)"]
    lines += [f"  train {name:<28} {v['images_per_s']:>9.2f} img/s  x{v['speedup_vs_baseline']:.2f}" for name, v in s.items()]
    lines.append(f"  ours = {tr['ours']} (x{tr['speedup']:.2f}); best = {tr['best']} (x{tr['best_speedup']:.2f})")
    lines += [f"  train + loader {name:<28} {v['images_per_s']:>9.2f} img/s ({v['threads']} threads, {v['workers']} workers"
              + (f", {' '.join(f'{k}={x}' for k, x in v['env'].items())}" if v.get("env") else "") + ")"
              for name, v in tr["with_loader"].items()]
    lines.append(f"  with the loader, {tr['with_loader_recommended']} is x{tr['with_loader_gain_vs_ours']:.2f} ours")
    t = loss["terms"]
    lines.append("  loss share of step: " + ", ".join(f"{k} {t[k]['share_of_step']:.1%}" for k in ("bce", "dice", "outlier")))
    fl = loss["outlier_by_j"]["flatness"]
    lines.append("  outlier j sweep, slowest/fastest j (fastest reps): "
                 + ", ".join(f"{m} {v['max_over_min_fastest']:.2f}{'' if v['flat'] else ' NOT FLAT'}" for m, v in fl.items()))
    lines.append(f"  data: {data['loader']['images_per_s']:.1f} img/s with {data['loader']['workers']} workers, "
                 f"ratio {data['ratio']:.2f} ({'ok' if data['ok'] else 'BELOW ' + str(DATA_RATIO_TARGET)})")
    lines.append(f"  inference: {inf['plain']['slices_per_s']:.2f} slices/s, TTA {inf['tta']['slices_per_s']:.2f} slices/s")
    if "data_paths" in entry:
        for size, v in entry["data_paths"]["sizes"].items():
            lines.append(f"  step + data at {size}: loader {v['loader']['images_per_s']:.2f} img/s, resident "
                         f"{v['resident']['images_per_s']:.2f} img/s (x{v['ratio_resident_over_loader']:.2f})")
        c = entry["concurrent"]
        same = "" if "identical_results" not in c else (", results identical" if c["identical_results"]
                                                          else ", RESULTS DIFFER")
        lines.append(f"  2 variants at {c['image_size']}px: one after another {c['sequential_s']:.1f} s, at once "
                     f"{c['concurrent_s']:.1f} s (x{c['ratio_concurrent_over_sequential']:.2f}){same}")
    demo = entry["demo_repro"]
    lines.append(f"  demo dvc repro: {demo['source']}" if demo["seconds"] is None
                 else f"  demo dvc repro: {demo['seconds']:.0f} s ({demo['source']})")
    load = entry["machine_load"]
    if load["busy"]:
        lines.append(f"  WARNING: the machine was busy (load average {load['start']} -> {load['end']} on "
                     f"{load['cpu_count']} CPUs): these timings are unreliable")
    lines.append(f"  benchmark took {entry['bench_seconds']:.0f} s")
    return lines


def build_parser(prog: str = "lggseg bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Benchmark training, loss, data loading and inference.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="metrics/bench.json", help="bench JSON to merge this device's results into")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: common.device)")
    ap.add_argument("--data", default=None, help="manifest store to read (default: a small synthetic one)")
    ap.add_argument("--demo-seconds", type=float, default=None, help="wall time of the demo's dvc repro")
    ap.add_argument("--demo-time-file", default=str(DEMO_TIME_FILE), help='JSON {"seconds": ...} written by make demo')
    ap.add_argument("--batch-size", type=int, default=None, help="override the device profile's batch size")
    ap.add_argument("--reps", type=int, default=None, help="override the device profile's repetitions")
    ap.add_argument("--no-candidates", action="store_true", help="time only the baseline and our set-up")
    ap.add_argument("--no-compile", action="store_true", help="do not time torch.compile on CUDA")
    ap.add_argument("--no-paths", action="store_true",
                    help="skip resident vs DataLoader path and concurrent vs sequential variants")
    return ap


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of the params file with the command line's overrides of the ``bench`` section."""
    params = read_params(args.params)
    over: dict[str, Any] = {}
    profile = {k: v for k, v in (("batch_size", args.batch_size), ("reps", args.reps)) if v is not None}
    if profile:
        over.update(cpu=profile, cuda=profile)
    if args.no_candidates:
        over["candidates"] = False
    if args.no_compile:
        over["compile"] = False
    if args.no_paths:
        over["paths"] = False
    params = deep_merge(params, {"bench": over})
    return bench_config(params, args.data, args.demo_seconds, args.demo_time_file)


def main(argv: list[str] | None = None, prog: str = "lggseg bench") -> int:
    """``lggseg bench``: run the benchmark; exit 2 with a one-line message on bad input."""
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = config_from_args(args)
        entry = run_benchmark(cfg, args.out, args.device or cfg.common.device)
    except LggsegError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(entry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
