"""Figures 7-8 from a committed snapshot: the model's half of ``figure_slices.npz``, kept without the data.

The evaluate stage writes per variant ``data/eval/<variant>/figure_slices.npz``: the test slices that the
paper's Fig. 7 (loss comparison) and Fig. 8 (encoders) show, as the dataset's image and ground truth plus the
model's probability map. The image and the ground truth are the dataset's and are never committed
(``tests/test_repo_hygiene.py`` refuses ``.npz`` files in git); the probabilities are the model's. A snapshot
(:mod:`lggseg.reporting.snapshot`) therefore keeps, in ``rows/<variant>/``:

* ``figure_probability.png``: 8-bit grayscale, the K probability maps stacked top to bottom (K*H x W),
  each pixel ``round(255 p)``: the heatmap, quantised to 1/255;
* ``figure_mask.png``: 1-bit, the same layout: ``p > threshold`` decided on the evaluate stage's own map,
  so that a redrawn figure's contours, Dice captions and component counts are those of the evaluation
  (the quantised heatmap alone could flip a pixel within 1/510 of the threshold);
* ``figure_slices.json``: the slice ids, their store rows, the threshold, the seed whose model drew them
  and how the slices were chosen.

Together 10-32 KB per variant at 256 px (the CPU-scale tables' 12 variants). :func:`figure_slices_from_store` puts the images and the
ground truth back from a manifest folder built from the same data (its fingerprint must equal the one in
the metrics' provenance), which is what ``lggseg report SNAPSHOT ... --manifest DIR`` does
(:mod:`lggseg.reporting.merge`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lggseg.data.store import Store
from lggseg.errors import DataError
from lggseg.io import write_bytes, write_json
from lggseg.reporting.results import FigureSlices, check_figure_slices, data_sha

PROBABILITY = "figure_probability.png"
MASK = "figure_mask.png"
RECORD = "figure_slices.json"
FILES = (PROBABILITY, MASK, RECORD)

_SCALARS = ("prob_seed", "min_area", "selection")


@dataclass(frozen=True)
class FigurePredictions:
    """One variant's figure predictions as a snapshot keeps them."""

    ids: list[str]
    rows: list[int]
    prob: np.ndarray  # float32 (K, H, W) in [0, 1]; ``prob > threshold`` is the evaluation's decision
    threshold: float


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array)
    # no dithering: the 1-bit mask must be the decision itself
    img = img.convert(mode, dither=Image.Dither.NONE) if mode == "1" else img
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_figure_predictions(figure_npz: str | Path, dest_dir: str | Path) -> list[Path]:
    """Write :data:`FILES` into ``dest_dir`` from an evaluate stage's ``figure_slices.npz``; returns them."""
    figure_npz, dest_dir = Path(figure_npz), Path(dest_dir)
    try:
        with np.load(figure_npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{figure_npz}: not found; has the evaluate stage run?") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{figure_npz}: not a readable .npz file: {exc}") from None
    missing = [k for k in ("ids", "rows", "prob", "threshold") if k not in arrays]
    if missing:
        raise DataError(f"{figure_npz}: missing array(s) {missing}; has {sorted(arrays)}")
    prob = arrays["prob"].astype(np.float32)
    if prob.ndim != 3 or prob.shape[0] != len(arrays["ids"]) or len(arrays["rows"]) != prob.shape[0]:
        raise DataError(f"{figure_npz}: prob {prob.shape} must be (K, H, W) for the {len(arrays['ids'])} slice ids")
    if not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1:
        raise DataError(f"{figure_npz}: prob must hold probabilities in [0, 1]")
    k, h, w = prob.shape
    threshold = float(arrays["threshold"])
    record = {
        "ids": [str(i) for i in arrays["ids"]],
        "rows": [int(r) for r in arrays["rows"]],
        "height": h,
        "width": w,
        "threshold": threshold,
        **{key: arrays[key].item() for key in _SCALARS if key in arrays},
        "files": {PROBABILITY: "round(255 * probability), slices stacked top to bottom",
                  MASK: "probability > threshold, as the evaluation decided it",
                  "from": figure_npz.name},
    }
    stacked = prob.reshape(k * h, w)
    paths = [dest_dir / PROBABILITY, dest_dir / MASK, dest_dir / RECORD]
    write_bytes(paths[0], _png(np.round(stacked * 255).astype(np.uint8), "L"))
    write_bytes(paths[1], _png((stacked > threshold).astype(np.uint8) * 255, "1"))
    write_json(paths[2], record)
    return paths


def has_figure_predictions(folder: str | Path) -> bool:
    return all((Path(folder) / name).is_file() for name in FILES)


def _read_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("L"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable PNG: {exc}") from None
    if array.shape != shape:
        raise DataError(f"{path}: {array.shape[0]} x {array.shape[1]} pixels, {RECORD} says {shape[0]} x {shape[1]}")
    return array


def read_figure_predictions(folder: str | Path) -> FigurePredictions:
    """The probability maps of ``folder`` (:data:`FILES`): the quantised heatmap with every pixel on the
    side of the threshold that ``figure_mask.png`` records (moved to the threshold, or just above it)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        raise DataError(f"{folder / RECORD}: not found (a snapshot taken before figure predictions were kept)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / RECORD}: not readable JSON: {exc}") from None
    try:
        ids, rows = [str(i) for i in record["ids"]], [int(r) for r in record["rows"]]
        h, w, threshold = int(record["height"]), int(record["width"]), float(record["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{folder / RECORD}: needs ids, rows, height, width and threshold ({exc!r})") from None
    if not ids or len(ids) != len(rows):
        raise DataError(f"{folder / RECORD}: {len(ids)} ids and {len(rows)} rows (need the same, at least one)")
    shape = (len(ids) * h, w)
    prob = (_read_png(folder / PROBABILITY, shape).astype(np.float32) / 255).reshape(len(ids), h, w)
    above = (_read_png(folder / MASK, shape) > 0).reshape(len(ids), h, w)
    t = np.float32(threshold)
    prob[above & (prob <= t)] = np.nextafter(t, np.float32(1))
    prob[~above & (prob > t)] = t
    return FigurePredictions(ids, rows, prob, threshold)


def store_fingerprint(meta: Mapping[str, Any]) -> str | None:
    """The data sha256 of a manifest's ``store.json`` content (``Store.meta``), if recorded."""
    fp = meta.get("fingerprint")
    return fp.get("sha256") if isinstance(fp, Mapping) else None


def figure_slices_from_store(pred: FigurePredictions, store: Store, where: str | Path) -> FigureSlices:
    """:class:`FigureSlices` of ``pred`` with each slice's image and ground truth looked up by its id
    (``<case_id>_<slice_index>``) in ``store``; ``where`` names the predictions in errors."""
    table = store.table
    index = {f"{c}_{int(s)}": r for r, c, s in zip(table["row"], table["case_id"], table["slice_index"], strict=True)}
    absent = [i for i in pred.ids if i not in index]
    if absent:
        raise DataError(f"{where}: slice(s) {absent} are not in the manifest {store.root} (other data?)")
    rows = [index[i] for i in pred.ids]
    image = np.stack([np.asarray(store.images[r]) for r in rows]).astype(np.uint8)
    truth = np.stack([np.asarray(store.masks[r]) > 0 for r in rows])
    if image.shape[1:3] != pred.prob.shape[1:]:
        raise DataError(f"{where}: probability maps of {pred.prob.shape[1:]} px, the manifest {store.root} holds "
                        f"{image.shape[1:3]} px slices")
    return check_figure_slices(np.array(pred.ids), image, truth, pred.prob, where)


def check_same_data(meta: Mapping[str, Any], manifest: str | Path, metrics: Mapping[str, Any],
                    where: str | Path) -> None:
    """Refuse the manifest folder ``manifest`` (``meta``: its ``store.json``) when its data fingerprint differs
    from the one ``metrics`` (read from ``where``) record (either unrecorded: the slice ids alone must match)."""
    mine, sha = store_fingerprint(meta), data_sha(metrics)
    if sha and mine and sha != mine:
        raise DataError(f"the manifest {manifest} is of other data (fingerprint {mine[:12]}) than {where} "
                        f"({sha[:12]}): give the manifest folder built from the data the results were measured on")

