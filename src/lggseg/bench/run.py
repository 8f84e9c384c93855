"""``lggseg bench`` and the ``bench`` stage: the figures of docs/performance.md, measured on the device
present and merged into ``metrics/bench.json`` under one key per device, so machines accumulate.

The configured network with the full eq. 13 loss and random weights, on one augmented batch: the training
step under our set-up against a plain float32 loop and channels_last / bf16 alone; each loss term's share
of it and the outlier terms at j = 21/41/81; the DataLoader's rate against the step's; ``lggseg predict``
with and without TTA; unless ``--no-concurrent``, two variants trained in turns against one after another
(:mod:`lggseg.bench.measure` says how each is timed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lggseg.bench import measure as M
from lggseg.config import (
    CommonConfig,
    ConfigError,
    LossConfig,
    ManifestConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_section,
    read_params,
)
from lggseg.errors import DataError, LggsegError
from lggseg.io import write_json
from lggseg.runtime import resolve_device

# batch 0: train.batch_size; data: batches the loader is timed over; infer: repetitions of inference
PROFILES = {"cpu": {"batch": 4, "warmup": 1, "reps": 7, "data": 12, "infer": 3},
            "cuda": {"batch": 0, "warmup": 5, "reps": 20, "data": 40, "infer": 10}}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The params sections measured and the run's settings (``None``: the device profile's value)."""

    common: CommonConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    manifest: ManifestConfig
    data_dir: Path | None = None  # a manifest store; None: a small synthetic one
    batch_size: int | None = None
    reps: int | None = None
    outlier_js: tuple[int, ...] = (21, 41, 81)
    concurrent: bool = True
    concurrent_cases: int = 8
    concurrent_cpu_size: int = 64  # on CUDA: common.image_size
    synthetic_cases: int = 3

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 2:  # BatchNorm after ASPP's pooling needs 2
            raise ConfigError(f"--batch-size must be at least 2, got {self.batch_size}")
        if self.reps is not None and self.reps < 1:
            raise ConfigError(f"--reps must be at least 1, got {self.reps}")
        if self.concurrent_cpu_size % 16 or self.concurrent_cpu_size < 32:
            raise ConfigError(f"the concurrent run's image size must be a multiple of 16 and at least 32, "
                              f"got {self.concurrent_cpu_size}")

    def profile(self, device: torch.device) -> dict[str, int]:
        p = dict(PROFILES["cuda" if device.type == "cuda" else "cpu"])
        p["batch"] = self.batch_size or p["batch"] or self.train.batch_size
        p["reps"] = self.reps or p["reps"]
        return p


def bench_config(params: Mapping[str, Any] | str | Path, **options: Any) -> BenchConfig:
    """The :class:`BenchConfig` of a params file or dict: its network without pretrained weights, trained
    with every term of eq. 13 at full weight (the loss of the paper's full model)."""
    params = params if isinstance(params, Mapping) else read_params(params)
    model = dataclasses.replace(load_section("model", params), pretrained=False, weights_file=None)
    loss = dataclasses.replace(load_section("loss", params), terms=("bce", "dice", "outlier"))
    return BenchConfig(load_section("common", params), model, loss, load_section("train", params),
                       load_section("manifest", params), **options)


@contextlib.contextmanager
def open_store(cfg: BenchConfig, n_cases: int | None = None) -> Iterator[tuple[Any, str]]:
    """The store of ``cfg.data_dir``, or (``n_cases`` or no ``data_dir``) a synthetic one in a temp dir."""
    from lggseg.data.manifest import build_manifest
    from lggseg.data.store import load_store
    from lggseg.data.synthetic import generate_demo

    if cfg.data_dir is not None and n_cases is None:
        yield load_store(cfg.data_dir), str(cfg.data_dir)
        return
    n = n_cases or cfg.synthetic_cases
    with tempfile.TemporaryDirectory(prefix="lggseg-bench-") as tmp:
        build_manifest(generate_demo(Path(tmp) / "raw", n_cases=n, seed=cfg.common.seed), Path(tmp) / "store",
                       cfg.common, cfg.manifest)
        yield load_store(Path(tmp) / "store"), f"synthetic demo store ({n} cases)"


def merge_write(out_json: Path, key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Write ``entry`` under ``key`` of ``out_json``, keeping the other devices' blocks."""
    try:
        doc = json.loads(out_json.read_text()) if out_json.is_file() else {}
    except ValueError as exc:
        raise DataError(f"{out_json}: existing benchmark file is not valid JSON ({exc}); move it away") from None
    if not isinstance(doc, dict):
        raise DataError(f"{out_json}: existing benchmark file is not a JSON object; move it away")
    write_json(out_json, {**doc, key: entry})
    return {**doc, key: entry}


def run_benchmark(cfg: BenchConfig, out_json: str | Path, device: str | torch.device = "auto") -> dict[str, Any]:
    """Measure everything on ``device`` and merge it into ``out_json``; returns this device's block."""
    from lggseg.losses import CompoundLoss, full_gamma_epoch
    from lggseg.models import build_model

    t_start, load_start = time.perf_counter(), M.load_average()
    dev = resolve_device(device, indexed=True)
    p, size, info = cfg.profile(dev), cfg.common.image_size, M.device_info(dev)
    epoch = full_gamma_epoch(cfg.loss, cfg.train.epochs)  # the outlier term at full weight
    loss_fn = CompoundLoss(cfg.loss, cfg.train.epochs).to(dev)
    with open_store(cfg) as (store, source):
        n_attr = int(store.attributes.shape[1]) if cfg.model.attributes else 0
        torch.manual_seed(cfg.common.seed)
        model = build_model(cfg.model, n_attr, size).to(dev)
        b = next(iter(M.make_loader(store, size, dataclasses.replace(cfg.train, num_workers=0), cfg.common.seed,
                                    p["batch"], 1, torch.device("cpu"))))
        batch = {"image": b["image"].to(dev), "mask": b["mask"].to(dev),
                 "attributes": b["attributes"].to(dev) if cfg.model.attributes else None}
        setups = M.candidate_setups(cfg.train, dev)
        training = M.training_steps(model, loss_fn, batch, setups, dev, p["warmup"], p["reps"], cfg.train.lr, epoch)
        for v in training.values():
            v["speedup_vs_baseline"] = M.r4(v["images_per_s"] / training["baseline"]["images_per_s"], 3)
        ours = next(s.name for s in setups if s.knobs() == M.step_setup(cfg.train, dev).knobs())
        ours_ips, ours_step = training[ours]["images_per_s"], training[ours]["step"]["median_s"]
        losses = M.loss_costs(cfg.loss, batch["mask"], ours_step, cfg.outlier_js, dev, max(p["reps"], 10))
        loader = M.loader_rate(M.make_loader(store, size, cfg.train, cfg.common.seed, p["batch"], p["data"] + 1, dev))
        native = (int(store.masks.shape[1]), int(store.masks.shape[2]))
        infer = M.inference(model, batch, native, dev, p["warmup"], p["infer"])
    extra = {"concurrent": _concurrent(cfg, dev)} if cfg.concurrent else {}
    cond = {"device": info["name"], "torch": info["torch"], "threads": training[ours]["threads"],
            "image_size": size, "batch_size": p["batch"]}
    entry: dict[str, Any] = {
        "key": M.device_key(info), "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": info,
        "settings": {"arch": cfg.model.arch, "encoder": cfg.model.encoder, "attributes": cfg.model.attributes,
                     "n_attributes": n_attr, "image_size": size, "batch_size": p["batch"],
                     "loss_terms": list(cfg.loss.terms), "outlier_mode": cfg.loss.outlier_mode, "warmup": p["warmup"],
                     "reps": p["reps"], "statistic": "median", "store": source},
        "training": {"conditions": cond, "ours": ours, "speedup": training[ours]["speedup_vs_baseline"],
                     "setups": training},
        "loss": {"conditions": cond, **losses},
        "data": {"conditions": cond, "loader": loader, "model_images_per_s": ours_ips,
                 "ratio": M.r4(loader["images_per_s"] / ours_ips, 3)},
        "inference": {"conditions": cond, **infer},
        **extra,
        # busy: other work held over half the CPUs at the start (by the end our own threads add to it)
        "machine_load": {"start": load_start, "end": M.load_average(), "cpu_count": info["cpu_count"],
                         "busy": load_start is not None and load_start > 0.5 * (info["cpu_count"] or 1)},
    }
    entry["bench_seconds"] = M.r4(time.perf_counter() - t_start)
    merge_write(Path(out_json), entry["key"], entry)
    return entry


def _concurrent(cfg: BenchConfig, dev: torch.device) -> dict[str, Any]:
    """Two variants (every loss term, and BCE alone: Table 2's first and last rows), one epoch on the
    resident path, on a synthetic store of ``concurrent_cases`` cases (at 64 px on the CPU)."""
    size = cfg.common.image_size if dev.type == "cuda" else cfg.concurrent_cpu_size
    train = dataclasses.replace(cfg.train, epochs=1, data_path="resident", max_minutes=None, warmup_epochs=0)
    common = dataclasses.replace(cfg.common, image_size=size, device=dev.type)
    runs = [RunConfig(name, common, cfg.model, dataclasses.replace(cfg.loss, terms=terms), train, seeds=(cfg.common.seed,))
            for name, terms in (("bench_full_loss", cfg.loss.terms), ("bench_bce", ("bce",)))]
    with open_store(cfg, cfg.concurrent_cases) as (store, _):
        out = M.concurrent_variants(runs, store, cfg.common.seed, dev)
    return {"variants": {r.variant: list(r.loss.terms) for r in runs}, "image_size": size, "epochs": 1,
            "cases": cfg.concurrent_cases, "batch_size": train.batch_size, "data_path": "resident", **out}


def summary_lines(e: Mapping[str, Any]) -> list[str]:
    """A few human-readable lines of one device's block."""
    tr, loss, data, inf = e["training"], e["loss"], e["data"], e["inference"]
    lines = [f"{e['key']} ({e['settings']['encoder']}, {e['settings']['image_size']} px, batch "
             f"{e['settings']['batch_size']}; ours = {tr['ours']}; busy machine: {e['machine_load']['busy']})"]
    lines += [f"  train {k:<20} {v['images_per_s']:8.2f} img/s  x{v['speedup_vs_baseline']:.2f}" for k, v in tr["setups"].items()]
    lines.append("  loss share of step: " + ", ".join(f"{k} {v['share_of_step']:.2%}" for k, v in loss["terms"].items()))
    lines.append(f"  loader / step {data['ratio']:.1f}; predict {inf['plain']['slices_per_s']:.2f} slices/s, "
                 f"TTA {inf['tta']['slices_per_s']:.2f}")
    if "concurrent" in e:
        lines.append(f"  2 variants in turns / one after another: x{e['concurrent']['ratio_concurrent_over_sequential']:.2f}")
    return lines


def main(argv: list[str] | None = None, prog: str = "lggseg bench") -> int:
    """``lggseg bench``: run the benchmark; exit 2 with a one-line message on bad input."""
    ap = argparse.ArgumentParser(prog=prog, description="Benchmark training, loss, data loading and inference.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="metrics/bench.json", help="bench JSON to merge this device's block into")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: common.device)")
    ap.add_argument("--data", type=Path, default=None, help="manifest store (default: a small synthetic one)")
    ap.add_argument("--batch-size", type=int, default=None, help="instead of the device profile's batch size")
    ap.add_argument("--reps", type=int, default=None, help="instead of the device profile's repetitions")
    ap.add_argument("--no-concurrent", action="store_true", help="skip the two variants trained in turns")
    args = ap.parse_args(argv)
    try:
        cfg = bench_config(args.params, data_dir=args.data, batch_size=args.batch_size, reps=args.reps,
                           concurrent=not args.no_concurrent)
        entry = run_benchmark(cfg, args.out, args.device or cfg.common.device)
    except LggsegError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(entry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
