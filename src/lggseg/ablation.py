"""Recipe search by measurement: train each arm of an ablation, score it on val, and on test once.

Used to choose the laptop recipe (``params.laptop.yaml``, README "No GPU? Train on a laptop"); it
is not a step of the paper's pipeline. An *arm* is a set of params overrides (the same keys as
``params.yaml``) merged over a base profile; every arm trains the base's one variant through
:func:`lggseg.training.train_variant` (the code the ``train`` stage runs) on one manifest store and is
then scored by :func:`lggseg.evaluation.evaluate.evaluate_model` (the ``evaluate`` stage's code) on the
**validation** split, with and without test-time flips, and on the test split.

Honest selection: :func:`choose` ranks arms by their validation numbers only (``val_dice_slice_mean``,
ties within ``tie`` broken by ``val_dice_patient_3d``); the test columns are written for the record
and never read by the ranking. Each arm's row carries its wall times, so the table also says what
each choice costs on the machine it ran on (``machine.json``: :func:`lggseg.runtime.machine_record`).

Outputs in ``out_dir``: ``ablation.csv`` (one row per arm, rewritten atomically after every arm, so
an interrupted search keeps what it measured), ``arms/<arm>/`` (model, training result, metrics
JSONs), ``machine.json``. An arm whose row is already in ``ablation.csv`` with the same overrides is
skipped, so a killed search resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from lggseg.config import ConfigError, deep_merge, load_section, read_params, resolve_variant, variant_names
from lggseg.errors import LggsegError
from lggseg.evaluation.metrics import HEADLINE_KEYS
from lggseg.io import write_csv, write_json, write_text
from lggseg.runtime import machine_record

# The numbers an ablation row keeps from each metrics block.
ROW_METRICS = HEADLINE_KEYS


def read_arms(path: str | Path) -> dict[str, dict[str, Any]]:
    """``arms.yaml``: a mapping ``arm name -> params overrides`` (a mapping, possibly empty)."""
    arms = read_params(path)
    if not isinstance(arms, Mapping) or not arms:
        raise ConfigError(f"{path}: expected a non-empty mapping of arm name -> params overrides")
    for name, over in arms.items():
        if not isinstance(over, Mapping | None):
            raise ConfigError(f"{path}: arm {name!r} must map to params overrides, got {over!r}")
    return {str(k): dict(v or {}) for k, v in arms.items()}


def arm_params(base: Mapping[str, Any], overrides: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The arm's full params, validated for ``variant`` before any training starts."""
    params = deep_merge(base, overrides)
    if variant not in variant_names(params):
        raise ConfigError(f"variant {variant!r} is not in the profile's variants")
    resolve_variant(params, variant)
    for section in ("evaluate", "postprocess"):
        load_section(section, params)
    return params


def _flat(prefix: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    row = {f"{prefix}{k}": metrics.get(k) for k in ROW_METRICS}
    post = metrics.get("postprocessed")
    if isinstance(post, Mapping):
        row.update({f"{prefix}pp_{k}": post.get(k) for k in ROW_METRICS})
    return row


def run_arm(name: str, params: Mapping[str, Any], variant: str, store_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train and score one arm; returns its ablation row."""
    from lggseg.evaluation.evaluate import evaluate_model
    from lggseg.training import train_variant

    run = resolve_variant(params, variant)
    cfg, post = load_section("evaluate", params), load_section("postprocess", params)
    device = run.common.device
    seed = run.seeds[0]
    model_dir = out_dir / "models" / f"seed_{seed}"
    t0 = time.perf_counter()
    result = train_variant(run, store_dir, model_dir, seed)
    t_train = time.perf_counter() - t0
    row: dict[str, Any] = {
        "arm": name,
        "epochs_done": result.get("epochs_done", len(result["history"])),
        "stop_reason": result.get("stop_reason", "completed"),
        "best_epoch": result["best_epoch"],
        "train_minutes": round(t_train / 60, 2),
        "train_images_per_second": result.get("images_per_second"),
        "val_dice_model_res": round(float(result["best_val_dice"]), 4),
    }
    t1 = time.perf_counter()
    for split, tta in (("val", False), ("val", True), ("test", False), ("test", True)):
        ev = evaluate_model(model_dir.parent, store_dir, dataclasses.replace(cfg, tta=tta), post, device, split=split)
        tag = f"{split}{'_tta' if tta else ''}"
        write_json(out_dir / f"metrics_{tag}.json", ev.metrics)
        row.update(_flat(f"{tag}_", ev.metrics))
    row["eval_minutes"] = round((time.perf_counter() - t1) / 60, 2)
    return row


# Columns of the Markdown summary: (column prefix, heading) per split/inference setting.
_SETTINGS = (("val_", "val"), ("val_tta_pp_", "val TTA+pp"), ("test_", "test"), ("test_tta_pp_", "test TTA+pp"))
_SHORT = {"dice_slice_mean": "slice", "dice_tumour_slices": "tumour", "dice_patient_3d": "3D", "dice_micro": "micro",
          "empty_fp_rate": "FP"}


def markdown(table: pd.DataFrame, chosen: str) -> str:
    """``ablation.csv`` as a Markdown table (Dice conventions and the empty-slice FP rate per setting)."""
    from lggseg.reporting.tables import _md_table

    header = ["arm", "epochs", "train min", *(f"{h} {_SHORT[k]}" for _, h in _SETTINGS for k in ROW_METRICS)]
    rows = []
    for r in table.to_dict("records"):
        name = f"**{r['arm']}** (chosen)" if r["arm"] == chosen else r["arm"]
        cells = [name, str(r["epochs_done"]), f"{r['train_minutes']:.1f}"]
        for prefix, _ in _SETTINGS:
            cells += [f"{r.get(prefix + k, float('nan')):.3f}" for k in ROW_METRICS]
        rows.append(cells)
    return "\n".join(_md_table(header, rows)) + "\n"


def choose(table: pd.DataFrame, tie: float = 0.005) -> str:
    """The arm with the best validation slice-mean Dice; within ``tie`` of it, the best val 3D Dice.

    Reads validation columns only: the test split plays no part in the choice.
    """
    if table.empty:
        raise ConfigError("no ablation rows to choose from")
    best = float(table["val_dice_slice_mean"].max())
    close = table[table["val_dice_slice_mean"] >= best - tie]
    return str(close.sort_values("val_dice_patient_3d", ascending=False, kind="stable").iloc[0]["arm"])


def run_ablation(base_path: str | Path, arms_path: str | Path, variant: str, store_dir: str | Path,
                 out_dir: str | Path) -> pd.DataFrame:
    """Train ``variant`` of the profile ``base_path`` under every arm of ``arms_path``; see the module doc."""
    base = read_params(base_path)
    arms = read_arms(arms_path)
    planned = {name: arm_params(base, over, variant) for name, over in arms.items()}  # validate all first
    out_dir, store_dir = Path(out_dir), Path(store_dir)
    table_path = out_dir / "ablation.csv"
    done = pd.read_csv(table_path) if table_path.is_file() else pd.DataFrame()
    write_json(out_dir / "machine.json", machine_record())
    rows = [r for r in done.to_dict("records") if r.get("arm") in arms
            and r.get("overrides") == json.dumps(arms[r["arm"]], sort_keys=True)]
    for name, params in planned.items():
        if any(r["arm"] == name for r in rows):
            print(f"[ablation] {name}: already measured, skipped", flush=True)
            continue
        print(f"[ablation] {name}: {json.dumps(arms[name], sort_keys=True)}", flush=True)
        row = run_arm(name, params, variant, store_dir, out_dir / "arms" / name)
        row["overrides"] = json.dumps(arms[name], sort_keys=True)
        rows.append(row)
        write_csv(table_path, pd.DataFrame(rows))
        print(f"[ablation] {name}: val slice-mean {row['val_dice_slice_mean']:.4f}, val 3D "
              f"{row['val_dice_patient_3d']:.4f}, {row['epochs_done']} epochs in {row['train_minutes']} min", flush=True)
    table = pd.DataFrame(rows)
    chosen = choose(table)
    write_text(out_dir / "ablation.md", markdown(table, chosen))
    print(f"[ablation] chosen on validation: {chosen}", flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lggseg.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="full params file of the profile")
    ap.add_argument("--variant", required=True, help="the profile's variant every arm trains")
    ap.add_argument("--arms", required=True, type=Path, help="YAML: arm name -> params overrides")
    ap.add_argument("--data", required=True, type=Path, help="manifest store (data/manifest)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (ablation.csv, arms/, machine.json)")
    args = ap.parse_args(argv)
    try:
        run_ablation(args.base, args.arms, args.variant, args.data, args.out)
    except LggsegError as exc:
        print(f"lggseg ablation: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
