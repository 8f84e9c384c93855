"""Test-split evaluation of a trained variant (paper section 4.1.2 and Tables 2-4).

For every seed's model (``models/<variant>/seed_<s>/``) the test slices of the manifest store go
through the network at the model's ``image_size``; the probabilities are upsampled (bilinear) to
the stored 256 x 256 and thresholded at ``evaluate.threshold``, so every metric is computed
against the original masks whatever resolution the model ran at. Each slice is scored as
predicted and, when post-processing is configured (``postprocess.min_area > 0``, ``postprocess.largest_3d``), again after it
(:mod:`lggseg.evaluation.postprocess`), and :func:`lggseg.evaluation.metrics.summarize` turns the rows into the
metrics of ``metrics/<variant>.json``.

With several seeds the top-level values are seed means, ``seed_std`` holds the standard
deviations (ddof 1) and ``per_seed`` each seed's own block. The bootstrap intervals of the
top level are computed on the seed-averaged per-slice (per-patient) Dice, whose mean is exactly
the reported seed mean, so they describe patient-sampling uncertainty of that number.

Every metrics file carries a ``provenance`` block (:func:`provenance`): the data source and its
fingerprint, patients/cases/slices per split, the image size, the seeds, for each seed's model the
device and precision it was trained with, its epochs (planned, done, why it stopped, which one was
kept and by what rule), pretrained or random initialisation and training time, the library
versions and the git commit. The report prints it under each table and warns when one table mixes
data or image sizes, so that numbers made under different conditions are never compared silently.

It also keeps five test slices for the report's Figures 7 and 8: the paper's five image IDs
(Fig. 8 caption) that fall in the test split, completed by tumour slices at evenly spaced
quantiles of tumour size (:func:`select_figure_rows`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from lggseg.config import ConfigError, EvaluateConfig, PostprocessConfig
from lggseg.errors import DataError, ModelError
from lggseg.evaluation.metrics import SUMMARY_KEYS, bootstrap_ci, patient_rows, slice_stats, summarize
from lggseg.evaluation.postprocess import enabled as postprocess_enabled
from lggseg.evaluation.postprocess import postprocess_case
from lggseg.inference import attribute_order, find_model_dirs, predict_probabilities, uses_attributes
from lggseg.io import atomic_dir, atomic_path, write_csv, write_json
from lggseg.runtime import git_commit, project_origin, resolve_device, software_versions

if TYPE_CHECKING:
    from lggseg.data.store import Store

PAPER_FIGURE_IDS = (
    "TCGA_FG_8189_20030516_21",
    "TCGA_DU_8164_19970111_22",
    "TCGA_CS_5397_20010315_7",
    "TCGA_CS_5397_20010315_9",
    "TCGA_CS_6290_20000917_10",
)
"""Image IDs ``<case>_<slice>`` of the paper's Fig. 8 (Fig. 7 shows slices of the same kind)."""

N_FIGURE_SLICES = len(PAPER_FIGURE_IDS)
# Scalar metrics that vary between seeds (counts of slices/patients do not).
_SEED_VARYING = tuple(k for k in SUMMARY_KEYS if not k.endswith("_ci95") and k not in ("n_test_slices", "n_test_patients"))


class Evaluation(NamedTuple):
    """What :func:`evaluate_model` returns; unpacks as ``metrics, slices, patients, figures``."""

    metrics: dict[str, Any]
    slices: pd.DataFrame
    patients: pd.DataFrame
    figures: dict[str, np.ndarray]


def _row_table(store: Store) -> pd.DataFrame:
    """The manifest table indexed by store row (the ``row`` column when present)."""
    table = store.table
    if "row" in table.columns:
        table = table.set_index(table["row"].to_numpy())
    required = {"patient_id", "case_id", "slice_index", "tumour_pixels"}
    if not required <= set(table.columns):
        raise DataError(f"manifest table lacks column(s) {sorted(required - set(table.columns))}")
    return table


def select_figure_rows(table: pd.DataFrame, test_rows: np.ndarray, n: int = N_FIGURE_SLICES) -> tuple[list[int], str]:
    """Store rows of the figure slices and how they were chosen (``paper``, ``quantile`` or ``paper+quantile``).

    First the paper's image IDs (:data:`PAPER_FIGURE_IDS`, in that order) that are test slices.
    The rest are test slices with tumour sorted by ``(tumour_pixels, case_id, slice_index)``
    and taken at ``n`` evenly spaced interior quantiles of that order (so neither the smallest
    nor the largest tumour); if there are too few tumour slices, other test slices in store order.
    """
    test = table.loc[np.asarray(test_rows, dtype=np.int64)]
    ids = test["case_id"].astype(str) + "_" + test["slice_index"].astype(int).astype(str)
    by_id = dict(zip(ids, test.index.to_numpy(), strict=True))
    chosen = [int(by_id[i]) for i in PAPER_FIGURE_IDS if i in by_id][:n]
    need = n - len(chosen)
    if need > 0:
        tumour = test[(test["tumour_pixels"] > 0) & ~test.index.isin(chosen)]
        tumour = tumour.sort_values(["tumour_pixels", "case_id", "slice_index"], kind="stable")
        if len(tumour) > need:
            pos = np.round(np.linspace(0, len(tumour) - 1, need + 2)[1:-1]).astype(int)
            chosen += [int(r) for r in tumour.index.to_numpy()[pos]]
        else:
            chosen += [int(r) for r in tumour.index]
            rest = [int(r) for r in test.index if r not in chosen]
            chosen += rest[: n - len(chosen)]
    n_paper = sum(1 for i in PAPER_FIGURE_IDS if i in by_id)
    how = "paper" if n_paper >= n else ("quantile" if n_paper == 0 else "paper+quantile")
    return chosen, how


def _evaluate_one(
    seed: int,
    model: torch.nn.Module,
    meta: Mapping[str, Any],
    store: Store,
    test_rows: np.ndarray,
    figure_rows: list[int],
    cfg: EvaluateConfig,
    post: PostprocessConfig,
    device: torch.device,
    where: str,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-slice rows (raw and, if enabled, post-processed) and the figure slices' probabilities."""
    if "image_size" not in meta:
        raise ModelError(f"{where}: model metadata lacks 'image_size'")
    attr_index = None
    if uses_attributes(meta):
        names = list(meta.get("attribute_names") or [])
        n_attr = meta.get("n_attributes", len(names))
        if not names or len(names) != n_attr:
            raise ModelError(f"{where}: model metadata lists {len(names)} attribute names for {n_attr} attributes")
        attr_index = attribute_order(list(store.attribute_names), names, where)
    table = _row_table(store)
    max_area = cfg.noise_side * cfg.noise_side
    figure_pos = {r: k for k, r in enumerate(figure_rows)}
    figure_prob = np.zeros((len(figure_rows), *store.masks.shape[1:3]), dtype=np.float16)
    records: list[dict[str, Any]] = []
    model = model.to(device)
    batches = predict_probabilities(
        model, store, test_rows, image_size=int(meta["image_size"]), attribute_index=attr_index,
        batch_size=cfg.batch_size, device=device, desc=f"evaluate seed {seed}", tta=cfg.tta,
    )
    preds: dict[int, np.ndarray] = {}
    for rows, probs in batches:
        for row, prob in zip(rows, probs, strict=True):
            row = int(row)
            if row in figure_pos:
                figure_prob[figure_pos[row]] = prob.astype(np.float16)
            preds[row] = prob > cfg.threshold
    # Post-processing may look at a whole case (postprocess.largest_3d), so it runs per case.
    processed: dict[int, np.ndarray] = {}
    if postprocess_enabled(post):
        rows_in_order = table.loc[list(preds)].sort_values(["case_id", "slice_index"])
        for _, case in rows_in_order.groupby("case_id", sort=False):
            case_rows = [int(r) for r in case.index]
            for r, mask in zip(case_rows, postprocess_case(np.stack([preds[r] for r in case_rows]), post), strict=True):
                processed[r] = mask
    for row, pred in preds.items():
        truth = np.asarray(store.masks[row]) > 0
        ident = {
            "seed": seed,
            "row": row,
            "patient_id": table.at[row, "patient_id"],
            "case_id": table.at[row, "case_id"],
            "slice_index": int(table.at[row, "slice_index"]),
        }
        variants = [(False, pred)] + ([(True, processed[row])] if processed else [])
        for done, mask in variants:
            stats = slice_stats(mask, truth, noise_max_area=max_area, connectivity=cfg.connectivity)
            records.append({**ident, "postprocessed": done, **stats})
    return pd.DataFrame.from_records(records), figure_prob


def _summary(rows: pd.DataFrame, cfg: EvaluateConfig) -> dict[str, Any]:
    return summarize(rows, bootstrap_samples=cfg.bootstrap_samples, bootstrap_seed=cfg.bootstrap_seed)


def _combine(per_seed: dict[int, dict[str, Any]], rows: pd.DataFrame, cfg: EvaluateConfig) -> dict[str, Any]:
    """Seed means of the scalar metrics, seed-averaged bootstrap intervals and ``seed_std``."""
    seeds = list(per_seed)
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        if key.endswith("_ci95"):
            continue
        vals = np.array([per_seed[s][key] for s in seeds], dtype=float)
        out[key] = int(vals[0]) if key in ("n_test_slices", "n_test_patients") else float(vals.mean())
    ci = {"n_samples": cfg.bootstrap_samples, "seed": cfg.bootstrap_seed}
    by_slice = rows.groupby(["patient_id", "case_id", "slice_index"], sort=True)["dice"].mean().reset_index()
    out["dice_slice_mean_ci95"] = list(bootstrap_ci(by_slice["dice"], by_slice["patient_id"], **ci))
    pats = pd.concat([patient_rows(g).assign(seed=s) for s, g in rows.groupby("seed")], ignore_index=True)
    by_patient = pats.groupby("patient_id", sort=True)["dice_3d"].mean().reset_index()
    out["dice_patient_3d_ci95"] = list(bootstrap_ci(by_patient["dice_3d"], by_patient["patient_id"], **ci))
    out = {k: out[k] for k in SUMMARY_KEYS}
    out["seed_std"] = {k: float(np.std([per_seed[s][k] for s in seeds], ddof=1)) for k in _SEED_VARYING}
    return out


def _block(rows: pd.DataFrame, cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    per_seed = {int(s): _summary(g, cfg) for s, g in rows.groupby("seed", sort=True)}
    if len(per_seed) == 1:
        return dict(next(iter(per_seed.values()))), per_seed
    return _combine(per_seed, rows, cfg), per_seed


def evaluate_loaded(
    models: Mapping[int, tuple[torch.nn.Module, Mapping[str, Any]]],
    store: Store,
    cfg: EvaluateConfig,
    post: PostprocessConfig,
    device: str | torch.device = "auto",
    split: str = "test",
) -> Evaluation:
    """:func:`evaluate_model` on already loaded ``{seed: (model, meta)}`` and an opened store.

    ``split`` is the split scored (``test``; ``val`` to choose between recipes without looking at
    the test split, ``evaluate.split``: docs/experiments.md); the metric keys keep their ``test`` names
    and ``split`` says which one it was.
    """
    if not models:
        raise ModelError("no model to evaluate")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"evaluation split must be train, val or test, got {split!r}")
    device = resolve_device(device)
    test_rows = np.asarray(store.indices(split), dtype=np.int64)
    if test_rows.size == 0:
        raise DataError(f"the manifest store has no {split} slices")
    table = _row_table(store)
    figure_rows, how = select_figure_rows(table, test_rows)
    all_rows, figure_probs = [], []
    for seed, (model, meta) in sorted(models.items()):
        where = str(meta.get("model_dir", f"seed {seed}"))
        rows, prob = _evaluate_one(int(seed), model, meta, store, test_rows, figure_rows, cfg, post, device, where)
        all_rows.append(rows)
        figure_probs.append(prob)
    slices = pd.concat(all_rows, ignore_index=True)
    patients = pd.concat(
        [patient_rows(g).assign(seed=s, postprocessed=p) for (s, p), g in slices.groupby(["seed", "postprocessed"])],
        ignore_index=True,
    )
    patients = patients[["seed", "postprocessed", *[c for c in patients.columns if c not in ("seed", "postprocessed")]]]

    metrics, per_seed = _block(slices[~slices["postprocessed"]], cfg)
    if postprocess_enabled(post):
        pp, pp_per_seed = _block(slices[slices["postprocessed"]], cfg)
        rule = {"min_area": post.min_area, "largest_3d": post.largest_3d}
        metrics["postprocessed"] = {**pp, **rule}
        for s in per_seed:
            per_seed[s]["postprocessed"] = {**pp_per_seed[s], **rule}
    seeds = sorted(int(s) for s in models)
    metrics["seeds"] = seeds
    metrics["tta"] = cfg.tta
    metrics["split"] = split
    if len(seeds) > 1:
        metrics["per_seed"] = {str(s): per_seed[s] for s in seeds}
    metrics["provenance"] = provenance(models, store, cfg, device)

    figures = {
        "ids": np.array([f"{table.at[r, 'case_id']}_{int(table.at[r, 'slice_index'])}" for r in figure_rows], dtype=str),
        "rows": np.array(figure_rows, dtype=np.int64),
        "image": np.stack([np.asarray(store.images[r]) for r in figure_rows]).astype(np.uint8),
        "truth": np.stack([np.asarray(store.masks[r]) > 0 for r in figure_rows]),
        "prob": figure_probs[0],
        "prob_seed": np.array(seeds[0], dtype=np.int64),
        "threshold": np.array(cfg.threshold, dtype=np.float32),
        "min_area": np.array(post.min_area, dtype=np.int64),
        "selection": np.array(how),
    }
    return Evaluation(jsonable(metrics), slices, patients, figures)


def evaluate_model(
    model_dirs: Mapping[int, str | Path] | str | Path,
    store_dir: str | Path | Any,
    cfg: EvaluateConfig,
    post: PostprocessConfig,
    device: str | torch.device = "auto",
    split: str = "test",
) -> Evaluation:
    """Evaluate one variant's models on the test split (or ``split``) of a manifest store.

    ``model_dirs`` is ``{seed: model dir}`` or ``models/<variant>`` (its ``seed_<s>/`` sub-dirs);
    ``store_dir`` a manifest store directory (or an opened store). Returns the metrics dict
    (JSON-ready: NaN -> None), the per-slice rows (column ``postprocessed`` tells raw from
    post-processed), the per-patient rows and the figure inputs (:func:`write_figure_slices`).
    """
    from lggseg.data.store import load_store
    from lggseg.models import load_model

    dirs = find_model_dirs(model_dirs) if isinstance(model_dirs, (str, Path)) else dict(model_dirs)
    device = resolve_device(device)
    store = load_store(store_dir) if isinstance(store_dir, (str, Path)) else store_dir
    models = {}
    for seed, d in sorted(dirs.items()):
        model, meta = load_model(d, device)
        models[int(seed)] = (model, {**meta, "model_dir": str(d)})
    return evaluate_loaded(models, store, cfg, post, device, split)


SPLITS = ("train", "val", "test")
# Training facts copied from each model's model.json (or, for older models, its result.json).
_TRAINING_KEYS = ("image_size", "pretrained", "epochs", "epochs_planned", "epochs_done", "stop_reason", "max_minutes",
                  "best_epoch", "best_val_dice", "best_epoch_gamma", "selection_rule", "gamma_max", "gamma_reached_full",
                  "wall_seconds", "train_seconds", "device", "world_size", "hardware", "software", "fingerprint")


def _training_record(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``model.json`` over the ``result.json`` beside it; models saved before a key existed lack it."""
    record: dict[str, Any] = {}
    model_dir = meta.get("model_dir")
    if model_dir:
        try:
            stored = json.loads((Path(model_dir) / "result.json").read_text())
            if isinstance(stored, Mapping):
                record.update(stored)
        except (OSError, ValueError):
            pass  # result.json is a by-product; model.json alone still describes the model
    record.update(meta)
    return record


def training_provenance(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What one seed's model records about its training, with defaults for older model directories."""
    rec = _training_record(meta)
    out = {k: rec.get(k) for k in _TRAINING_KEYS}
    if out["pretrained"] is None:
        out["pretrained"] = ((rec.get("run_config") or {}).get("model") or {}).get("pretrained")
    # Before train.max_minutes every run did all its epochs.
    out["epochs_planned"] = rec.get("epochs_planned", rec.get("epochs"))
    out["epochs_done"] = rec.get("epochs_done", rec.get("epochs"))
    if out["stop_reason"] is None and rec.get("epochs") is not None:
        out["stop_reason"] = "completed"
    # the validation curve, so the report can check that it levelled off (issue 21); absent when not recorded
    history = rec.get("history")
    if isinstance(history, list) and history and all(isinstance(h, Mapping) and "val/dice" in h for h in history):
        out["val_dice_by_epoch"] = [float(h["val/dice"]) for h in history]
    return out


def provenance(models: Mapping[int, tuple[torch.nn.Module, Mapping[str, Any]]], store: Store, cfg: EvaluateConfig,
               device: torch.device) -> dict[str, Any]:
    """The ``provenance`` block of ``metrics/<variant>.json``: where these numbers come from."""
    meta = getattr(store, "meta", None) or {}
    table = store.table
    splits = {}
    for split in SPLITS:
        sub = table[table["split"] == split]
        splits[split] = {"patients": int(sub["patient_id"].nunique()), "cases": int(sub["case_id"].nunique()),
                         "slices": int(len(sub))}
    training = {str(s): training_provenance(m) for s, (_, m) in sorted(models.items())}
    sizes = sorted({t["image_size"] for t in training.values() if t["image_size"] is not None})
    return {
        "data": {
            "source": meta.get("source"),
            "fingerprint": meta.get("fingerprint"),
            "split_unit": meta.get("split_unit"),
            "n_slices": int(len(table)),
            "splits": splits,
        },
        "image_size": sizes[0] if len(sizes) == 1 else sizes,
        "seeds": {"train": sorted(int(s) for s in models), "split": meta.get("split_seed"),
                  "bootstrap": cfg.bootstrap_seed},
        "training": training,
        "evaluation": {"device": device.type, "software": software_versions()},
        "git_commit": git_commit(),  # in a workspace: the workspace's own commit
        "project": project_origin(),  # the project commit the code came from (= git_commit outside a workspace)
    }


def jsonable(obj: Any) -> Any:
    """Plain Python for ``json``: numpy scalars/arrays unwrapped, NaN and infinities -> None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def write_figure_slices(dest: str | Path, figures: Mapping[str, np.ndarray]) -> Path:
    """``figure_slices.npz`` (uncompressed: float16 probabilities compress poorly), written atomically."""
    with atomic_path(dest, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **figures)
    return Path(dest)


def write_model_cards(models_dir: str | Path, metrics: Mapping[str, Any]) -> list[Path]:
    """Each seed's ``MODEL_CARD.md`` written again, now with the test metrics (:mod:`lggseg.models.card`)."""
    from lggseg.models import read_meta
    from lggseg.models.card import write_card

    return [write_card(d, read_meta(d), metrics) for d in find_model_dirs(models_dir).values()]


def write_evaluation(result: Evaluation, metrics_path: str | Path, rows_dir: str | Path) -> None:
    """``metrics_path`` (JSON, no NaN) and ``rows_dir/{slices.csv, patients.csv, figure_slices.npz}``."""
    with atomic_dir(rows_dir) as tmp:
        write_csv(tmp / "slices.csv", result.slices)
        write_csv(tmp / "patients.csv", result.patients)
        write_figure_slices(tmp / "figure_slices.npz", result.figures)
    write_json(metrics_path, result.metrics)
