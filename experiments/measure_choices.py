"""Measures behind the README's "Quick start" reasons for the demo profile (issue #13), written to
``--out`` (``results/demo-2026-11-30/choices.json`` holds the committed run):

- ``import_seconds``: wall time of ``import torch, timm, segmentation_models_pytorch`` in a fresh
  process (what each stage process pays), 3 runs;
- ``real_peak_tumour_area_px``: each real case's largest tumour cross-section (pixels at 256x256), from a
  manifest store of the real data (the demo's synthetic lesions are sized after it);
- ``adam_step_seconds``: the optimiser update alone, torch's default (multi-tensor) Adam against the fused
  one, for two of the demo's large encoders at its settings (64 px, batch 4, float32, 2 threads);
  median of 6 steps after 2 warm-up steps.

    python experiments/measure_choices.py --store <manifest store of the 94-case copy> \
        --out results/demo-2026-11-30/choices.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_seconds(runs: int = 3) -> list[float]:
    code = "import time; t = time.perf_counter(); import torch, timm, segmentation_models_pytorch; print(time.perf_counter() - t)"
    return [round(float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout), 2) for _ in range(runs)]


def peak_areas(store: Path) -> dict[str, float]:
    import pandas as pd

    table = pd.read_csv(store / "manifest.csv")
    peaks = table.groupby("case_id")["tumour_pixels"].max()
    q = peaks.quantile([0.25, 0.5, 0.75])
    return {"cases": int(len(peaks)), "q25": float(q[0.25]), "median": float(q[0.5]), "q75": float(q[0.75]),
            "min": float(peaks.min()), "max": float(peaks.max())}


def adam_steps(variants: list[str]) -> dict[str, dict[str, float]]:
    import torch

    from lggseg.config import deep_merge, read_params, resolve_variant
    from lggseg.losses import CompoundLoss
    from lggseg.models import build_model

    torch.set_num_threads(2)
    params = deep_merge(read_params(REPO / "params.yaml"), read_params(REPO / "params.demo.yaml"))
    out = {}
    for name in variants:
        run = resolve_variant(params, name)
        row = {}
        for fused in (False, True):
            torch.manual_seed(0)
            net = build_model(run.model, 12, 64)
            opt = torch.optim.Adam(net.parameters(), lr=run.train.lr, fused=fused)
            loss_fn = CompoundLoss(run.loss)
            x, y = torch.randn(4, 3, 64, 64), (torch.rand(4, 1, 64, 64) > 0.8).float()
            times = []
            for _ in range(8):
                total, _ = loss_fn(net(x, None), y, epoch=1)
                opt.zero_grad(set_to_none=True)
                total.backward()
                t = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t)
            row["fused" if fused else "default"] = round(statistics.median(times[2:]), 3)
        row["parameters_millions"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
        out[name] = row
        print(name, row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()
    from lggseg.runtime import machine_record

    result = {"import_seconds": import_seconds(), "real_peak_tumour_area_px": peak_areas(args.store),
              "adam_step_seconds": adam_steps(["repvgg_b2_bce", "effv2m_bce"]), "machine": machine_record()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
