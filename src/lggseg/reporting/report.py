"""The report stage: paper Tables 2-4 regenerated from ``metrics/<variant>.json``, and the figures.

Wan et al. (2023) report one DSC and one IoU per model (Tables 2-4, section 4.2) without saying how
Dice is averaged. Every table here therefore puts the paper's number beside each of our Dice
conventions (slice mean, tumour-slice mean, patient 3-D, pooled micro; see ``lggseg.evaluation.metrics``) with
the difference, so the reader can see which reading the paper's numbers resemble. Variants are
mapped to paper rows by their settings (loss terms for Table 2, ``model.attributes`` for Table 3,
``model.arch``/``model.encoder`` for Table 4) and their ``tables`` membership in ``params.yaml``,
never by variant name.

Figures: paper Fig. 7 (BCE vs BCE + Dice + outlier loss: contours and probability heatmaps),
Fig. 8 (Table 4 encoders on the same slices), the dataset's ground-truth component sizes (the
"six regions smaller than 7 x 7" of section 4.1.3) and a Dice-by-variant chart with bootstrap CIs.

Inputs that the report needs and cannot read are errors naming the file (:class:`DataError`);
numbers that come from the synthetic demo data are labelled as such in the tables and figures.
Under every table one line gives the provenance of its numbers (the ``provenance`` block that
:mod:`lggseg.evaluation.evaluate` writes: data, image size, device and precision, epochs, initialisation,
seeds, training time, versions, commit), and a warning line follows when the table mixes data
sources/fingerprints or image sizes, whose numbers must not be compared as if alike.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lggseg.config import ConfigError, RunConfig, load_section, resolve_variant, variant_names
from lggseg.data import manifest
from lggseg.errors import DataError
from lggseg.evaluation.metrics import SUMMARY_KEYS
from lggseg.io import write_text
from lggseg.reporting import plotting

# --------------------------------------------------------------------------- paper numbers

PAPER = "Wan et al. 2023"

FIGURE_FILES = {
    "figure7": "figure7_loss_comparison.png",
    "figure8": "figure8_encoders.png",
    "components": "component_sizes.png",
    "dice": "test_dice_by_variant.png",
    "figure9": "figure9_outlier_loss.png",
}


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table (DSC and IoU in percent) and the rule that says which runs it describes."""

    label: str
    dsc: float
    iou: float | None
    matches: Callable[[RunConfig], bool]


def _terms_are(*terms: str) -> Callable[[RunConfig], bool]:
    return lambda rc: set(rc.loss.terms) == set(terms)


def _encoder_family(rc: RunConfig) -> str:
    """timm name without smp's ``tu-`` prefix or a pretrained tag (``tf_efficientnet_b5.ns_jft_in1k``)."""
    name = rc.model.encoder.lower()
    name = name.removeprefix("tu-")
    return name.split(".", 1)[0]


def _deeplab_encoder(pattern: str) -> Callable[[RunConfig], bool]:
    rx = re.compile(pattern)
    return lambda rc: rc.model.arch == "deeplabv3plus" and bool(rx.fullmatch(_encoder_family(rc)))


PAPER_TABLES: dict[str, tuple[PaperRow, ...]] = {
    "table2": (
        PaperRow("BCE", 93.21, 90.70, _terms_are("bce")),
        PaperRow("BCE + Dice", 93.86, 91.27, _terms_are("bce", "dice")),
        PaperRow("BCE + Dice + Outlier", 94.36, 91.83, _terms_are("bce", "dice", "outlier")),
    ),
    "table3": (
        PaperRow("No attribute encoder", 92.80, 90.22, lambda rc: not rc.model.attributes),
        PaperRow("Attribute encoder", 93.21, 91.02, lambda rc: rc.model.attributes),
    ),
    "table4": (
        PaperRow("U-Net (Buda et al.)", 82.00, None, lambda rc: rc.model.arch == "unet"),
        PaperRow("resnet101", 90.43, 87.80, _deeplab_encoder(r"resnet101")),
        PaperRow("tf_efficientnet_b5", 91.0, 88.13, _deeplab_encoder(r"(tf_)?efficientnet_b5")),
        PaperRow("xception65", 91.65, 89.10, _deeplab_encoder(r"xception65\w*")),
        PaperRow("repvgg_b2", 91.87, 89.36, _deeplab_encoder(r"repvgg_b2")),
        PaperRow("tf_efficientnetv2_m", 91.93, 89.29, _deeplab_encoder(r"(tf_)?efficientnetv2_m")),
        PaperRow("Swin Transformer v2 (swin_base)", 91.98, 89.19, _deeplab_encoder(r"swin(v2)?_base\w*")),
        PaperRow("regnetz_040", 92.80, 90.22, _deeplab_encoder(r"regnetz_040\w*")),
    ),
}

TABLE_TITLES = {
    "table2": "Table 2 - loss-function ablation (DeepLabv3+ / regnetz_040 with the attribute encoder)",
    "table3": "Table 3 - attribute encoder ablation (DeepLabv3+ / regnetz_040, BCE)",
    "table4": "Table 4 - encoder comparison (DeepLabv3+, BCE, no attributes)",
}

TABLE_NOTES = {
    "table2": "Paper rows are matched on `loss.terms`; a variant's outlier mode is in its label.",
    "table3": (
        "The paper's Table 3 'Yes' row (93.21 / 91.02) is the same configuration as Table 2's BCE row, "
        "which reports IoU 90.70; both paper values are kept as printed."
    ),
    "table4": (
        "The paper's U-Net row is quoted from Buda et al. (2019), whose 82% is a mean per-patient (3-D) Dice "
        "of their own U-Net; compare it with the patient-3D column. Our U-Net is the variant named in the row."
    ),
}

# --------------------------------------------------------------------------- metrics files

# The scalar keys the evaluate stage writes (its intervals and the HD95 bookkeeping count aside).
SCALAR_KEYS = tuple(k for k in SUMMARY_KEYS if not k.endswith("_ci95") and k != "hd95_n_undefined")
FRACTION_KEYS = frozenset(
    {"dice_slice_mean", "iou_slice_mean", "dice_tumour_slices", "dice_patient_3d", "dice_micro", "empty_fp_rate"}
)
# NaN in lggseg.evaluation.metrics (e.g. no truth-empty slice for empty_fp_rate) is written as null.
NULLABLE_KEYS = frozenset({"dice_tumour_slices", "dice_patient_3d", "hd95_px", "empty_fp_rate", "noise_components_per_slice"})
CI_KEYS = ("dice_slice_mean_ci95", "dice_patient_3d_ci95")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _check_block(block: Any, path: Path, where: str, require_ci: bool) -> None:
    if not isinstance(block, Mapping):
        raise DataError(f"{path}: {where or 'top level'} must be a JSON object, got {type(block).__name__}")
    prefix = f"{where}." if where else ""
    missing = [k for k in SCALAR_KEYS if k not in block]
    if missing:
        raise DataError(f"{path}: missing key(s) {[prefix + k for k in missing]}")
    for key in SCALAR_KEYS:
        v = block[key]
        if v is None and key in NULLABLE_KEYS:
            continue
        if not _is_number(v):
            raise DataError(f"{path}: {prefix}{key} must be a finite number, got {v!r}")
        if key in FRACTION_KEYS and not 0.0 <= v <= 1.0:
            raise DataError(f"{path}: {prefix}{key} = {v!r} is not a fraction in [0, 1]")
        if v < 0:
            raise DataError(f"{path}: {prefix}{key} = {v!r} is negative")
    if block["n_test_slices"] < 1 or block["n_test_patients"] < 1:
        raise DataError(f"{path}: {prefix}n_test_slices / n_test_patients must be positive")
    for key in CI_KEYS:
        if key not in block:
            if require_ci:
                raise DataError(f"{path}: missing key {prefix}{key}")
            continue
        ci = block[key]
        if ci is None or (isinstance(ci, list) and all(c is None for c in ci)):
            continue  # undefined interval (no values to resample)
        if not (isinstance(ci, list) and len(ci) == 2 and all(_is_number(c) for c in ci)):
            raise DataError(f"{path}: {prefix}{key} must be [lo, hi], got {ci!r}")
        if not 0.0 <= ci[0] <= ci[1] <= 1.0:
            raise DataError(f"{path}: {prefix}{key} = {ci!r} is not an interval inside [0, 1]")


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read and validate one ``metrics/<variant>.json`` (layout in docs/ARCHITECTURE.md)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found (run the evaluate stage for this variant first)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    return check_metrics(data, path)


def check_metrics(data: Any, path: str | Path) -> dict[str, Any]:
    """Validate one variant's metrics (the content of ``metrics/<variant>.json``); ``path`` names it in errors."""
    path = Path(path)
    _check_block(data, path, "", require_ci=True)
    # Absent when postprocess.min_area is 0 (post-processing disabled).
    if "postprocessed" in data:
        _check_block(data["postprocessed"], path, "postprocessed", require_ci=False)
        if not _is_number(data["postprocessed"].get("min_area")):
            raise DataError(f"{path}: postprocessed.min_area must be a number")
    if "provenance" in data and not isinstance(data["provenance"], Mapping):
        raise DataError(f"{path}: provenance must be a JSON object, got {type(data['provenance']).__name__}")
    seeds = data.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise DataError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(seeds) > 1 and not isinstance(data.get("seed_std"), Mapping):
        raise DataError(f"{path}: {len(seeds)} seeds but no 'seed_std' object")
    for where, block in (("", data), ("postprocessed.", data.get("postprocessed") or {})):
        std = block.get("seed_std", {})
        if not isinstance(std, Mapping):
            raise DataError(f"{path}: {where}seed_std must be an object")
        bad = {k: v for k, v in std.items() if not (v is None or _is_number(v))}
        if bad:
            raise DataError(f"{path}: {where}seed_std values must be numbers, got {bad}")
    return data


# --------------------------------------------------------------------------- figure slices


@dataclass(frozen=True)
class FigureSlices:
    """The fixed test slices every variant predicts for the figures (``figure_slices.npz``)."""

    ids: list[str]
    image: np.ndarray  # uint8 (K, H, W, 3)
    truth: np.ndarray  # bool (K, H, W)
    prob: np.ndarray  # float32 (K, H, W)


def load_figure_slices(path: str | Path) -> FigureSlices:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: figure slices not found (written by the evaluate stage)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("ids", "image", "truth", "prob") if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; has {sorted(z.files)}")
            ids, image, truth, prob = (z[k] for k in ("ids", "image", "truth", "prob"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from None
    return check_figure_slices(ids, image, truth, prob, path)


def check_figure_slices(ids: np.ndarray, image: np.ndarray, truth: np.ndarray, prob: np.ndarray,
                        path: str | Path) -> FigureSlices:
    """Validated :class:`FigureSlices` from the arrays of a ``figure_slices.npz`` (``path`` names it in errors)."""
    k = len(ids)
    if k == 0:
        raise DataError(f"{path}: holds no slices")
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[0] != k or image.shape[3] != 3:
        raise DataError(f"{path}: image must be uint8 (K, H, W, 3) with K = {k}, got {image.dtype} {image.shape}")
    hw = image.shape[1:3]
    if truth.shape != (k, *hw) or prob.shape != (k, *hw):
        raise DataError(f"{path}: truth {truth.shape} and prob {prob.shape} must both be {(k, *hw)}")
    prob = prob.astype(np.float32)
    if not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1:
        raise DataError(f"{path}: prob must hold probabilities in [0, 1]")
    return FigureSlices([str(i) for i in ids], image, truth.astype(bool), prob)


# --------------------------------------------------------------------------- ground-truth components

COMPONENT_NEEDED = ("row", "connectivity", "area", "height", "width")


def load_components(path: str | Path) -> pd.DataFrame:
    """Read ``components.csv`` of the manifest store: one row per ground-truth connected component."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ground-truth component table not found (written by the manifest stage)")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from None
    missing = [c for c in COMPONENT_NEEDED if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; has {list(table.columns)}")
    if table.empty:
        raise DataError(f"{path}: holds no components")
    try:
        values = table[list(COMPONENT_NEEDED)].to_numpy(dtype=float)
    except ValueError:
        raise DataError(f"{path}: non-numeric values in {list(COMPONENT_NEEDED)}") from None
    if not np.isfinite(values).all() or (values[:, 2:] <= 0).any():
        raise DataError(f"{path}: areas and bounding-box sides must be positive numbers")
    bad = sorted(set(table["connectivity"]) - {4, 8})
    if bad:
        raise DataError(f"{path}: connectivity must be 4 or 8, found {bad}")
    return table


def component_counts(table: pd.DataFrame, side: int) -> dict[int, dict[str, int]]:
    """``{connectivity: counts}`` of components smaller than ``side x side`` under each convention.

    ``side`` is ``evaluate.noise_side`` (by default ``loss.i``, the paper's 7).

    The conventions (area, bounding box <= side, bounding box < side) are those of
    :func:`lggseg.data.manifest.small_component_counts`, the numbers ``metrics/data.json`` also reports.
    """
    counts = manifest.small_component_counts(table, side)
    return {conn: counts[f"conn{conn}"] for conn in (4, 8) if (table["connectivity"] == conn).any()}


def _below_text(c: Mapping[str, int], side: int) -> str:
    return (f"{c['area_lt_side_sq']} with area < {side * side} px, {c['bbox_le_side']} with bounding box <= {side}x{side}, "
            f"{c['bbox_lt_side']} with bounding box < {side}x{side}")


# --------------------------------------------------------------------------- formatting


def _std(m: Mapping[str, Any], key: str) -> float | None:
    """Seed standard deviation of ``key``; only multi-seed blocks (top level and postprocessed) have one."""
    v = (m.get("seed_std") or {}).get(key)
    return float(v) if _is_number(v) else None


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def _value(m: Mapping[str, Any], key: str, *, scale: float = 100.0, digits: int = 2, paper: float | None = None) -> str:
    """``93.10 ± 0.20 (+0.11)``: mean (± seed std when several seeds) and the difference to ``paper``."""
    v = m.get(key)
    if v is None:
        return "n/a"
    text = f"{v * scale:.{digits}f}"
    std = _std(m, key)
    if std is not None:
        text += f" ± {std * scale:.{digits}f}"
    if paper is not None:
        text += f" ({_signed(v * scale - paper)})"
    return text


def _ci(m: Mapping[str, Any], key: str) -> str:
    ci = m.get(key)
    if not ci or any(c is None for c in ci):
        return "n/a"
    return f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def _seeds(m: Mapping[str, Any]) -> str:
    seeds = m.get("seeds", [])
    return ", ".join(str(s) for s in seeds) if len(seeds) <= 3 else f"{len(seeds)} seeds"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_md_row(header), _md_row(["---"] * len(header)), *(_md_row(r) for r in rows)]


OURS_HEADER = (
    "DSC slice-mean",
    "slice-mean 95% CI",
    "DSC tumour slices",
    "DSC patient-3D",
    "patient-3D 95% CI",
    "DSC micro",
)
TAIL_HEADER = ("HD95 (px)", "Empty-slice FP (%)", "Noise comp./slice", "Seeds")


def _ours_cells(m: Mapping[str, Any], paper_dsc: float | None) -> list[str]:
    return [
        _value(m, "dice_slice_mean", paper=paper_dsc),
        _ci(m, "dice_slice_mean_ci95"),
        _value(m, "dice_tumour_slices", paper=paper_dsc),
        _value(m, "dice_patient_3d", paper=paper_dsc),
        _ci(m, "dice_patient_3d_ci95"),
        _value(m, "dice_micro", paper=paper_dsc),
    ]


def _tail_cells(m: Mapping[str, Any]) -> list[str]:
    return [
        _value(m, "hd95_px", scale=1.0, digits=1),
        _value(m, "empty_fp_rate"),
        _value(m, "noise_components_per_slice", scale=1.0, digits=3),
    ]


def _paper(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Result:
    """One training variant: its resolved configuration and validated metrics."""

    name: str
    run: RunConfig
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        return self.run.label or self.name


# --------------------------------------------------------------------------- provenance


def _provenance(r: Result) -> Mapping[str, Any] | None:
    p = r.metrics.get("provenance")
    return p if isinstance(p, Mapping) else None


def _data_identity(p: Mapping[str, Any]) -> str:
    """Source, raw-data fingerprint and split of ``p``: results that differ here were not made on the same data."""
    data = p.get("data") or {}
    fp = data.get("fingerprint")
    sha = fp.get("sha256") if isinstance(fp, Mapping) else None
    split_seed = (p.get("seeds") or {}).get("split")
    return (f"{data.get('source') or 'unknown-source'} data {sha[:12] if sha else '(no fingerprint)'}, "
            f"{data.get('split_unit') or 'unknown'} split seed {split_seed if split_seed is not None else '?'}")


def _image_size(p: Mapping[str, Any]) -> str:
    size = p.get("image_size")
    return f"{'/'.join(str(s) for s in size) if isinstance(size, list) else size} px"


def _joined(values: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(values)) or "not recorded"


def _training_fields(p: Mapping[str, Any]) -> dict[str, str]:
    runs = [t for t in (p.get("training") or {}).values() if isinstance(t, Mapping)]

    def device(t: Mapping[str, Any]) -> str:
        hw = t.get("hardware") or {}
        where = hw.get("device") or t.get("device") or "device not recorded"
        name = f" ({hw['device_name']})" if hw.get("device_name") else ""
        return f"{where}{name}, {hw.get('precision') or 'precision not recorded'}"

    def epochs(t: Mapping[str, Any]) -> str:
        stop = t.get("stop_reason")
        text = f"{t.get('epochs_done', '?')}/{t.get('epochs', '?')} epochs"
        return text if stop in (None, "completed") else f"{text} ({stop})"

    def init(t: Mapping[str, Any]) -> str:
        return {True: "pretrained", False: "random init"}.get(t.get("pretrained"), "init not recorded")

    software = next((t.get("software") for t in runs if t.get("software")), None) or \
        (p.get("evaluation") or {}).get("software") or {}
    versions = ", ".join(f"{short} {software[key]}" for key, short in
                         (("torch", "torch"), ("timm", "timm"), ("segmentation_models_pytorch", "smp"))
                         if software.get(key))
    seeds = (p.get("seeds") or {}).get("train") or []
    commit = p.get("git_commit")
    return {
        "data": _data_identity(p),
        "size": _image_size(p),
        "device": _joined([device(t) for t in runs]),
        "epochs": _joined([epochs(t) for t in runs]),
        "init": _joined([init(t) for t in runs]),
        "seeds": ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds),
        "software": versions or "versions not recorded",
        "commit": f"commit {commit[:10]}" if commit else "no git commit",
    }


def _wall_hours(p: Mapping[str, Any]) -> float:
    return sum(float(t.get("wall_seconds") or 0.0) for t in (p.get("training") or {}).values()
               if isinstance(t, Mapping)) / 3600.0


def _grouped(values: Mapping[str, str]) -> str:
    """One value if every variant shares it, else each value with its variants."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{v} ({', '.join(f'`{n}`' for n in names)})" for v, names in groups.items())


def provenance_line(metrics: Mapping[str, Any]) -> str:
    """The provenance of one metrics file in a line (data, image size, device, epochs, init, seeds,
    versions, commit), or a note that it has none."""
    p = metrics.get("provenance")
    if not isinstance(p, Mapping):
        return "provenance not recorded"
    return " · ".join(_training_fields(p).values())


def provenance_lines(results: Sequence[Result]) -> list[str]:
    """The one-line provenance of a table's results, and a warning line when they mix data or image sizes."""
    if not results:
        return []
    known = {r.name: p for r in results if (p := _provenance(r)) is not None}
    missing = [r.name for r in results if r.name not in known]
    if not known:
        return ["Provenance: not recorded (these metrics files were written before evaluation recorded it).", ""]
    fields = {name: _training_fields(p) for name, p in known.items()}
    parts = [_grouped({n: f[key] for n, f in fields.items()}) for key in next(iter(fields.values()))]
    hours = sum(_wall_hours(p) for p in known.values())
    parts.insert(len(parts) - 2, f"training {hours:.2f} h in all")
    lines = ["Provenance: " + " · ".join(parts) + "."]
    mixed = []
    for key, what in (("data", "data"), ("size", "image sizes")):
        values = {n: f[key] for n, f in fields.items()}
        if len(set(values.values())) > 1:
            mixed.append(f"{what} ({_grouped(values)})")
    if mixed:
        lines.append(f"**Warning: this table mixes results made on different {' and '.join(mixed)}; "
                     "their numbers are not comparable as they stand.**")
    if missing:
        lines.append(f"**Warning: no provenance recorded for {', '.join(f'`{n}`' for n in missing)} (evaluated before "
                     "it was recorded), so it cannot be checked against the other rows.**")
    return [part for line in lines for part in (line, "")]


def paper_matches(table: str, results: Sequence[Result]) -> list[tuple[PaperRow | None, list[Result]]]:
    """Pair each row of paper ``table`` with the variants of that table it describes (paper order).

    Variants listed in ``table`` that match no paper row come last, paired with ``None``.
    """
    members = [r for r in results if table in r.run.tables]
    used: set[str] = set()
    pairs: list[tuple[PaperRow | None, list[Result]]] = []
    for row in PAPER_TABLES[table]:
        hits = [r for r in members if r.name not in used and row.matches(r.run)]
        used.update(r.name for r in hits)
        pairs.append((row, hits))
    pairs.extend((None, [r]) for r in members if r.name not in used)
    return pairs


def paper_table_markdown(table: str, results: Sequence[Result]) -> list[str]:
    header = ("Paper row", "Ours (variant)", "Paper DSC", *OURS_HEADER, "Paper IoU", "IoU slice-mean", *TAIL_HEADER)
    rows = []
    for paper_row, hits in paper_matches(table, results):
        dsc = paper_row.dsc if paper_row else None
        iou = paper_row.iou if paper_row else None
        head = paper_row.label if paper_row else "(no paper row)"
        if not hits:
            rows.append([head, "not run", _paper(dsc), *["–"] * len(OURS_HEADER), _paper(iou), "–", *["–"] * len(TAIL_HEADER)])
            continue
        for r in hits:
            m = r.metrics
            rows.append([
                head, f"{r.label} (`{r.name}`)", _paper(dsc), *_ours_cells(m, dsc), _paper(iou),
                _value(m, "iou_slice_mean", paper=iou), *_tail_cells(m), _seeds(m),
            ])
    shown = [r for _, hits in paper_matches(table, results) for r in hits]
    return [f"### {TABLE_TITLES[table]}", "", *_md_table(header, rows), "", *provenance_lines(shown),
            f"*{TABLE_NOTES[table]}*", ""]


def _best(results: Sequence[Result], keep: Callable[[Result], bool] = lambda r: True) -> Result | None:
    pool = [r for r in results if keep(r)]
    return max(pool, key=lambda r: r.metrics["dice_slice_mean"]) if pool else None


def _uses_outlier(r: Result) -> bool:
    return "outlier" in r.run.loss.terms


def postprocess_comparison(results: Sequence[Result]) -> list[Result]:
    """Best variant, best variant without the outlier term, and every variant with the outlier term.

    This asks the question behind the outlier loss: does removing small components after the fact
    (``postprocess.min_area``) give a plain model what the loss gives during training?
    """
    picked: list[Result] = []
    for r in (_best(results), _best(results, lambda r: not _uses_outlier(r)), *(r for r in results if _uses_outlier(r))):
        if r is not None and r.name not in {p.name for p in picked}:
            picked.append(r)
    return picked


def beyond_markdown(results: Sequence[Result]) -> list[str]:
    lines = ["## Beyond the paper", "", "### Variants not in the paper", ""]
    beyond = [r for r in results if "beyond" in r.run.tables]
    header = ("Variant", *OURS_HEADER, "IoU slice-mean", *TAIL_HEADER)
    rows = [[f"{r.label} (`{r.name}`)", *_ours_cells(r.metrics, None), _value(r.metrics, "iou_slice_mean"),
             *_tail_cells(r.metrics), _seeds(r.metrics)] for r in beyond]
    if rows:
        lines += [*_md_table(header, rows), "", *provenance_lines(beyond)]
    else:
        lines += ["No variant lists `beyond` in its `tables`.", ""]

    best = _best(results)
    lines += [
        "### Post-processing vs the outlier loss",
        "",
        f"Raw predictions vs the same predictions with predicted components smaller than `postprocess.min_area` "
        f"pixels removed, for the best variant by slice-mean Dice (`{best.name}`), the best one trained without "
        "the outlier term, and every variant trained with it. Δ is post-processed minus raw (percentage points).",
        "",
    ]
    header = ("Variant", "Predictions", "DSC slice-mean", "Δ", "DSC tumour slices", "DSC patient-3D", "DSC micro",
              "IoU slice-mean", "HD95 (px)", "Empty-slice FP (%)", "Noise comp./slice")
    rows = []
    compared = postprocess_comparison(results)
    for r in compared:
        raw, post = r.metrics, r.metrics.get("postprocessed")
        name = f"{r.label} (`{r.name}`)" + (" - best overall" if r is best else "")
        blocks = [("raw", raw)]
        if post is not None:
            blocks.append((f"min_area = {int(post['min_area'])} px", post))
        for what, m in blocks:
            delta = _signed(100 * (m["dice_slice_mean"] - raw["dice_slice_mean"])) if m is post else ""
            rows.append([
                name, what, _value(m, "dice_slice_mean"), delta, _value(m, "dice_tumour_slices"),
                _value(m, "dice_patient_3d"), _value(m, "dice_micro"), _value(m, "iou_slice_mean"), *_tail_cells(m),
            ])
    lines += [*_md_table(header, rows), "", *provenance_lines(compared)]
    if any("postprocessed" not in r.metrics for r in results):
        lines += ["Variants without a post-processed row were evaluated with `postprocess.min_area: 0` (disabled).", ""]
    return lines


def _flat_scalars(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out += _flat_scalars(v, f"{prefix}{k}.")
    elif isinstance(obj, (str, int, float, bool)) or obj is None:
        out.append((prefix.rstrip("."), json.dumps(obj)))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None


@dataclass(frozen=True)
class DataSource:
    kind: str  # kaggle | demo | local | unknown
    detail: str

    @property
    def demo(self) -> bool:
        return self.kind == "demo"


def data_source(metrics_dir: Path, params: Mapping[str, Any]) -> DataSource:
    """Where the evaluated data came from: ``metrics/fetch.json`` if present, else ``params.yaml``."""
    path = metrics_dir / "fetch.json"
    if path.is_file():
        info = _read_json(path)
        if not isinstance(info, Mapping):
            raise DataError(f"{path}: expected a JSON object")
        source = info.get("source")
        kind = info.get("kind") or ("demo" if source == "demo" else "kaggle" if source == "kaggle" else
                                    "local" if source else "unknown")
        # Hashes are long; their first 12 characters identify the data well enough in a table header.
        pairs = [(k, v.strip('"')) for k, v in _flat_scalars(info)[:8]]
        detail = ", ".join(f"{k}={v if len(v) <= 16 else v[:12] + '...'}" for k, v in pairs)
        return DataSource(str(kind), f"`{path.as_posix()}`: {detail}")
    fetch = load_section("fetch", params)
    return DataSource(fetch.kind, f"`fetch.source: {fetch.source}` in params ({path.as_posix()} not found)")


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _header_lines(source: DataSource, results: Sequence[Result], side: int) -> list[str]:
    lines = ["# Results: reproduction of Wan et al. 2023 (Tables 2-4) and beyond", ""]
    if source.demo:
        lines += [
            "> **DEMO / SYNTHETIC DATA.** These numbers come from the synthetic phantom dataset of `fetch.source: demo`,",
            "> not from the LGG MRI data. They only show that the pipeline runs; they are **not comparable** with the paper.",
            "",
        ]
    lines += [f"Data source: **{source.kind}** ({source.detail}).", ""]
    n = {(r.metrics["n_test_slices"], r.metrics["n_test_patients"]) for r in results}
    if len(n) == 1:
        s, p = n.pop()
        lines += [f"Test split: {s} slices from {p} patients (same for every variant).", ""]
    else:
        per = ", ".join(f"`{r.name}`: {r.metrics['n_test_slices']}/{r.metrics['n_test_patients']}" for r in results)
        lines += [f"**Warning: the variants were evaluated on different test sets** (slices/patients: {per}).", ""]
    lines += [
        "All values are percentages (HD95 in pixels, noise in components per slice). Each Dice cell shows ours and, in "
        "parentheses, ours minus the paper's DSC; with several seeds a cell is mean ± std over seeds. Dice conventions "
        "(the paper does not say which it uses):",
        "",
        "- **slice-mean**: mean Dice over all test slices, a slice with empty truth and empty prediction counting 1;",
        "- **tumour slices**: mean Dice over slices whose truth is non-empty;",
        "- **patient-3D**: Dice of each patient's whole volume, averaged over patients;",
        "- **micro**: Dice of all test pixels pooled.",
        "",
        "IoU is the slice mean. 95% CIs are patient-level bootstrap intervals. Empty-slice FP is the share of "
        f"tumour-free slices with any predicted pixel; noise components are predicted regions under {side}x{side} = {side * side} px that "
        "touch no tumour.",
        "",
    ]
    return lines


def _dataset_lines(components: pd.DataFrame, source: Path, data_json: Path, summary: Any, fig_link: str,
                   side: int) -> list[str]:
    lines = ["## Dataset: ground-truth component sizes", "",
             "Paper section 4.1.3: *six segmentation regions smaller than 7 x 7* in the dataset (of about 3929 slices). "
             "Ground-truth connected components of every mask, counted under each reading of 'smaller than 7 x 7':", ""]
    rows = [
        [f"{conn}-connected", str(c["components"]), str(c["area_lt_side_sq"]), str(c["bbox_le_side"]),
         str(c["bbox_lt_side"]), str(c["slices_with_area_lt_side_sq"])]
        for conn, c in component_counts(components, side).items()
    ]
    lines += _md_table(("Connectivity", "Components", f"area < {side * side} px", f"bounding box <= {side} x {side}",
                        f"bounding box < {side} x {side}", f"slices with a component < {side * side} px"), rows)
    lines += ["", f"From `{source.as_posix()}`.", "", f"![component sizes]({fig_link})", ""]
    if summary is not None:
        scalars = _flat_scalars(summary)
        if scalars:
            lines += [f"### Dataset summary (`{data_json.as_posix()}`)", "", *_md_table(("Key", "Value"), scalars), ""]
    return lines


# --------------------------------------------------------------------------- figures


def _figure_note(source: DataSource) -> str:
    return "DEMO DATA (synthetic) - not comparable with the paper" if source.demo else ""


def _short_label(r: Result) -> str:
    m = r.run.model
    name = m.encoder.removeprefix("tu-")
    if m.arch == "unet":
        return f"U-Net ({name})"
    return name + (" + attr." if m.attributes else "")


def _loss_label(r: Result) -> str:
    """``BCE + Dice + Outlier`` (the paper's wording), with our outlier mode when it is not the paper's."""
    label = " + ".join("BCE" if t == "bce" else t.capitalize() for t in r.run.loss.terms)
    if "outlier" in r.run.loss.terms and r.run.loss.outlier_mode != "paper":
        label += f" ({r.run.loss.outlier_mode})"
    return label


def figure7_variants(results: Sequence[Result]) -> tuple[Result, Result]:
    """The Table 2 BCE variant and the Table 2 BCE + Dice + outlier variant (paper mode preferred)."""
    t2 = [r for r in results if "table2" in r.run.tables]
    bce = next((r for r in t2 if set(r.run.loss.terms) == {"bce"}), None)
    outl = [r for r in t2 if _uses_outlier(r)]
    outl.sort(key=lambda r: r.run.loss.outlier_mode != "paper")
    if bce is None or not outl:
        raise ConfigError(
            "report: figure 7 needs a variant in table2 with loss.terms [bce] and one with the outlier term; "
            f"table2 has {[r.name for r in t2]}"
        )
    return bce, outl[0]


def figure8_variants(results: Sequence[Result]) -> list[Result]:
    ordered = [r for _, hits in paper_matches("table4", results) for r in hits]
    if not ordered:
        raise ConfigError("report: figure 8 needs at least one variant listing table4 in its tables")
    return ordered


def _dice_bars(results: Sequence[Result]) -> list[plotting.DiceBar]:
    bars = []
    for r in results:
        m = r.metrics
        paper = None
        for table in ("table2", "table3", "table4"):
            for row, hits in paper_matches(table, results):
                if row is not None and r in hits:
                    paper = row.dsc
                    break
            if paper is not None:
                break

        def ci(key: str, m: Mapping[str, Any] = m) -> tuple[float, float] | None:
            v = m.get(key)
            return None if not v or any(c is None for c in v) else (100 * v[0], 100 * v[1])

        bars.append(plotting.DiceBar(
            label=r.label, slice_mean=100 * m["dice_slice_mean"], slice_ci=ci("dice_slice_mean_ci95"),
            patient_3d=100 * (m["dice_patient_3d"] or 0.0), patient_ci=ci("dice_patient_3d_ci95"), paper=paper,
        ))
    return bars


# --------------------------------------------------------------------------- entry point


def load_results(params: Mapping[str, Any], metrics_dir: str | Path) -> list[Result]:
    """Resolve every variant of ``params`` and load its metrics file (all must exist)."""
    metrics_dir = Path(metrics_dir)
    names = variant_names(params)
    return [Result(n, resolve_variant(params, n), load_metrics(metrics_dir / f"{n}.json"))
            for n in tqdm(names, desc="metrics", unit="variant", leave=False)]


def build_report(
    params: Mapping[str, Any],
    metrics_dir: str | Path,
    eval_dir: str | Path,
    manifest_dir: str | Path,
    out_md: str | Path,
    plots_dir: str | Path,
) -> None:
    """Write ``out_md`` (Tables 2-4, beyond-the-paper, dataset analysis) and the figures in ``plots_dir``.

    Every input is read and checked before anything is written, so a missing or malformed file
    fails the stage without leaving a half-updated report.
    """
    metrics_dir, eval_dir, manifest_dir = Path(metrics_dir), Path(eval_dir), Path(manifest_dir)
    results = load_results(params, metrics_dir)
    source = data_source(metrics_dir, params)
    components = load_components(manifest_dir / "components.csv")
    data_json = metrics_dir / "data.json"
    summary = _read_json(data_json) if data_json.is_file() else None
    fig7 = figure7_variants(results)
    fig8 = figure8_variants(results)
    slices = {r.name: load_figure_slices(eval_dir / r.name / "figure_slices.npz")
              for r in tqdm({r.name: r for r in (*fig7, *fig8)}.values(), desc="figure slices", leave=False)}
    write_report(params, results, source, components, slices, out_md, plots_dir,
                 where=ReportSources(eval_dir, manifest_dir / "components.csv", data_json, summary), fig7=fig7, fig8=fig8)


@dataclass(frozen=True)
class ReportSources:
    """Where the report's inputs came from (named in its text) and the dataset summary, if any."""

    figure_slices: Path  # folder or file of the figure slices
    components: Path
    summary_path: Path
    summary: Any = None
    figure9: bool = True  # link the figure9 stage's plot (not part of a `lggseg reproduce` folder)


def write_report(
    params: Mapping[str, Any],
    results: Sequence[Result],
    source: DataSource,
    components: pd.DataFrame,
    slices: Mapping[str, FigureSlices],
    out_md: str | Path,
    plots_dir: str | Path,
    *,
    where: ReportSources,
    fig7: tuple[Result, Result] | None,
    fig8: list[Result] | None,
    missing: Mapping[str, str] | None = None,
) -> None:
    """The report of loaded, validated inputs: :func:`build_report` (the stage) and
    :func:`lggseg.reporting.folder.build_folder_report` (a ``lggseg reproduce`` folder) both end here.

    ``fig7``/``fig8`` None: that figure is not drawn, for the reason in ``missing[figure]``.
    """
    out_md, plots_dir = Path(out_md), Path(plots_dir)
    evaluate = load_section("evaluate", params)
    missing = dict(missing or {})
    drawn = [*(fig7 or ()), *(fig8 or ())]
    if drawn:
        first_name = drawn[0].name
        first = slices[first_name]
        for name in {r.name for r in drawn}:
            if slices[name].ids != first.ids:
                raise DataError(f"{where.figure_slices}: slice ids {slices[name].ids} of {name} differ from "
                                f"{first.ids} of {first_name}")

    note = _figure_note(source)
    paths = {key: plots_dir / fname for key, fname in FIGURE_FILES.items()}
    if fig7 is not None:
        plotting.plot_loss_comparison(
            first.ids, first.image, first.truth,
            [(_loss_label(r), slices[r.name].prob) for r in fig7],
            evaluate.threshold, paths["figure7"], note=note, connectivity=evaluate.connectivity,
        )
    if fig8 is not None:
        plotting.plot_encoder_grid(
            first.ids, first.image, first.truth,
            [(_short_label(r), slices[r.name].prob > evaluate.threshold) for r in fig8], paths["figure8"], note=note,
        )
    side = evaluate.noise_side
    counts = component_counts(components, side)
    plotting.plot_component_sizes(
        {f"{c}-connected": components.loc[components["connectivity"] == c, "area"].to_numpy() for c in counts},
        {f"{c}-connected": _below_text(n, side) for c, n in counts.items()}, paths["components"], side=side, note=note,
    )
    plotting.plot_dice_by_variant(_dice_bars(results), paths["dice"], note=note)

    md_dir = out_md.parent
    links = {k: _relative(p, md_dir) for k, p in paths.items()}
    lines = _header_lines(source, results, side)
    lines += ["## Paper tables", ""]
    for table in ("table2", "table3", "table4"):
        lines += paper_table_markdown(table, results)
    lines += [f"![Test Dice by variant]({links['dice']})", ""]
    lines += ["## Figures", ""]
    lines.append(f"- Figure 7 (loss comparison, `{fig7[0].name}` vs `{fig7[1].name}`): ![figure 7]({links['figure7']})"
                 if fig7 is not None else f"- Figure 7: not drawn ({missing.get('figure7', 'not asked for')})")
    lines.append(f"- Figure 8 (encoders of Table 4): ![figure 8]({links['figure8']})"
                 if fig8 is not None else f"- Figure 8: not drawn ({missing.get('figure8', 'not asked for')})")
    if where.figure9:
        fig9_state = "" if paths["figure9"].is_file() else " (not written yet: run the figure9 stage)"
        lines.append(f"- Figure 9 (outlier loss on a synthetic input){fig9_state}: ![figure 9]({links['figure9']})")
    lines.append("")
    lines += beyond_markdown(results)
    lines += _dataset_lines(components, where.components, where.summary_path, where.summary, links["components"], side)
    write_text(out_md, "\n".join(lines))

