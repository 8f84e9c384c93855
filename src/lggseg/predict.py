"""``lggseg predict``: segment new slices (issue #5) or NIfTI volumes (issue #22) with a trained model.

The input is one slice (``.tif``/``.png``), a case folder of the Kaggle layout
(``<case>/<case>_<n>.tif`` or ``.png``, with optional ``<case>_<n>_mask.tif``) or a folder of case folders (a
``kaggle_3m/`` folder), read by :mod:`lggseg.data.inputs`. Case folders and files are validated by :mod:`lggseg.data.layout` as
for training: slice numbers 1..n without gaps, RGB uint8 slices (grayscale and RGBA slices
are refused, not converted, because the three channels are three MRI sequences), masks with values
{0, 255}, every mask with its image. A case may have no masks at all (new data); then no Dice is
reported. A slice of another size than 256 x 256 is zero-padded to a centred square and resized to
256 x 256, and its probabilities go back the same way (:func:`lggseg.data.scans.fit_slice`).

NIfTI volumes (:func:`predict_scans`; ``--flair F [--pre T1] [--post T1C]`` or ``--input`` with
``<case>_{flair,t1,t1c}.nii.gz`` files) are cut into such slices by :mod:`lggseg.data.scans`
(reoriented to RAS, axial, a missing sequence replaced by FLAIR) and the mask is put back on the
input's grid: ``<case>_seg.nii.gz`` (uint8 0/1, the FLAIR file's header with its qform and sform),
``<case>_prob.nii.gz`` with ``--probabilities``, ``<case>_overlay.png`` (a montage of FLAIR slices with
the predicted contour) and ``cases.csv`` with the tumour volume in mL (voxels x the header's voxel
size). Conventions: docs/own-scans.md.

Preprocessing and inference are those of the evaluate stage (paper section 4.1.2): the slice is
resized to the model's ``image_size`` (:func:`lggseg.data.dataset.resize_pair`, area averaging),
normalised (:func:`lggseg.data.dataset.normalize_image`), the probabilities are upsampled bilinearly to
the native 256 x 256 and thresholded (``prob > threshold``). :func:`infer_probabilities` is that
batch -> native-resolution probabilities step, shared with :mod:`lggseg.evaluation.evaluate` and
:mod:`lggseg.bench.run`; with ``tta`` it averages the probabilities of the identity, horizontal-flip
and vertical-flip views.

Models trained with the attribute encoder (section 3.2.2) need each case's genomic clusters and
each slice's position. The clusters come from a ``data.csv``-shaped file (``--attributes``, or the
``data.csv`` of the input's ``kaggle_3m`` folder), looked up by patient id (the case folder name's
first three parts) and one-hot encoded into the model's own attribute names; a value the model
never saw in training is an error. The position is ``(n - 1) / (n_slices - 1)`` as in the manifest.
A patient without a row is an error unless ``--allow-missing-attributes``, which uses the
``missing`` category of every column (and position 0.5 for a lone slice outside a case folder).

Outputs, per slice: ``<stem>_pred.png`` (binary mask, 0/255), ``<stem>_prob.png`` (probability as
8-bit grey, ``round(255 p)``), ``<stem>_overlay.png`` (green predicted contour, red ground-truth
contour when a mask sits beside the slice; :func:`lggseg.reporting.plotting.overlay`); for case inputs they
go to ``DIR/<case>/``. ``DIR/summary.csv`` has one row per slice (tumour area in pixels, Dice where
there is truth, and the case's volume = pixels summed over its slices and 3-D Dice),
``DIR/cases.csv`` one row per case, ``DIR/predict.json`` the settings. ``DIR`` is built in a
temporary folder beside it and renamed into place at the end (:func:`lggseg.io.atomic_dir`), so an
error leaves no partial results and an existing ``DIR`` untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from lggseg.config import ConfigError
from lggseg.data.inputs import AttributeLookup, SliceInput, read_slice, resolve_inputs, visible_entries
from lggseg.data.layout import RAW_SIZE
from lggseg.data.scans import fit_slice, unfit_probabilities
from lggseg.errors import DataError, LggsegError, ModelError
from lggseg.inference import infer_probabilities, preprocess, resolve_model_dir, uses_attributes
from lggseg.io import OutputError, atomic_dir

SUMMARY_FILE = "summary.csv"
CASES_FILE = "cases.csv"
INFO_FILE = "predict.json"


# --------------------------------------------------------------------------- shared inference


# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- model and attributes


# --------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class PredictOptions:
    threshold: float = 0.5
    batch_size: int = 16
    tta: bool = False
    min_area: int = 0  # 0: no post-processing
    connectivity: int = 8
    largest_3d: bool = False  # keep each case's largest 3D region (postprocess.largest_3d)
    device: str = "auto"
    seed: int | None = None
    allow_missing_attributes: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1):
            raise ConfigError(f"--threshold must be in (0, 1), got {self.threshold!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, int) or self.min_area < 0:
            raise ConfigError(f"--postprocess-min-area must be a non-negative integer, got {self.min_area!r}")
        if self.connectivity not in (4, 8):
            raise ConfigError(f"connectivity must be 4 or 8, got {self.connectivity!r}")
        if not isinstance(self.largest_3d, bool):
            raise ConfigError(f"largest_3d must be true or false, got {self.largest_3d!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")


def _check_output(out_dir: Path) -> None:
    """Refuse to replace something that is not a previous ``lggseg predict`` output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: output exists and is not a folder")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"cannot write {out_dir}: {parent} is a file, not a folder")
    if out_dir.is_dir():
        entries = visible_entries(out_dir)
        if entries and not (out_dir / INFO_FILE).is_file():
            raise OutputError(
                f"{out_dir}: refusing to replace a non-empty folder that is not an lggseg predict output "
                f"(no {INFO_FILE}); choose a new or empty folder"
            )


def _load(model_path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model, announced by its card's one-line summary (what it is, what it scored, what it is for)."""
    from lggseg.models import load_model
    from lggseg.models.card import card_summary

    model, meta = load_model(model_path, device)
    print(f"lggseg predict: model {model_path}: {card_summary(model_path, meta)}", file=sys.stderr)
    return model, meta


def _batches(items: list[SliceInput], size: int) -> Iterator[list[SliceInput]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _read_batch(batch: list[SliceInput]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    return [read_slice(s) for s in batch]


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


class _Staging:
    """Writes into :func:`lggseg.io.atomic_dir`'s temporary folder; a failure names the final path.

    The folder as a whole is renamed into place at the end, so single files need no atomic write.
    """

    def __init__(self, tmp: Path, dest: Path) -> None:
        self.tmp, self.dest = tmp, dest

    def _write(self, rel: str, write: Any) -> None:
        try:
            write(self.tmp / rel)
        except OSError as exc:  # full disk, quota, ...
            raise OutputError(f"cannot write {self.dest / rel}: {exc.strerror or exc}") from exc

    def png(self, rel: str, array: np.ndarray) -> None:
        self._write(rel, lambda path: _save_png(path, array))

    def csv(self, rel: str, frame: pd.DataFrame) -> None:
        self._write(rel, lambda path: frame.to_csv(path, index=False))

    def nifti(self, rel: str, image: Any) -> None:
        self._write(rel, lambda path: image.to_filename(str(path)))

    def json(self, rel: str, obj: Any) -> None:
        self._write(rel, lambda path: path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def predict(
    model_dir: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    attributes: str | Path | None = None,
    options: PredictOptions | None = None,
) -> pd.DataFrame:
    """Segment every slice of ``input_path`` and write the outputs to ``out_dir`` (atomically).

    Returns the per-slice summary (the content of ``summary.csv``). Every check that needs no
    pixels (inputs, model metadata, attributes, output folder) runs before the model is loaded.
    """
    from lggseg.config import PostprocessConfig
    from lggseg.evaluation.postprocess import enabled as postprocess_enabled
    from lggseg.evaluation.postprocess import postprocess_case
    from lggseg.models import read_meta
    from lggseg.reporting.plotting import overlay
    from lggseg.runtime import resolve_device

    opts = options or PredictOptions()
    out_dir = Path(out_dir)
    device = resolve_device(opts.device)
    model_path = resolve_model_dir(model_dir, opts.seed)
    meta = read_meta(model_path)
    inputs = resolve_inputs(input_path)
    _check_output(out_dir)

    use_attr = uses_attributes(meta)
    attr_source = Path(attributes) if attributes is not None else inputs.default_attributes
    if attributes is not None and not attr_source.is_file():
        raise DataError(f"{attr_source}: attributes file not found")
    lookup = None
    vectors: dict[tuple[str, str | None], tuple[np.ndarray, bool]] = {}
    if use_attr:
        names = list(meta.get("attribute_names") or [])
        if len(names) != int(meta["n_attributes"]):
            raise ModelError(f"{model_path}: model.json lists {len(names)} attribute names for n_attributes={meta['n_attributes']}")
        lookup = AttributeLookup(names, attr_source, opts.allow_missing_attributes, model_path)
        for item in inputs.slices:
            key = (item.case_id, item.patient_id)
            if key not in vectors:
                vectors[key] = lookup.patient_vector(item.patient_id, item.case_id)
            lookup.slice_vector(vectors[key][0], item)  # position problems surface before any work
        for (case, patient), (_, found) in vectors.items():
            if not found:
                print(f"lggseg predict: warning: no attributes for {patient or case}; using the 'missing' category",
                      file=sys.stderr)

    model, meta = _load(model_path, device)
    image_size = int(meta["image_size"])
    rows: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        stage = _Staging(tmp, out_dir)
        bar = tqdm(total=len(inputs.slices), desc="predict", unit="slice")
        batches = list(_batches(inputs.slices, opts.batch_size))
        post = PostprocessConfig(min_area=opts.min_area, connectivity=opts.connectivity, largest_3d=opts.largest_3d)
        case: list[tuple[SliceInput, np.ndarray, np.ndarray | None, np.ndarray]] = []

        def write_case(items: list[tuple[SliceInput, np.ndarray, np.ndarray | None, np.ndarray]]) -> None:
            order = sorted(range(len(items)), key=lambda k: (items[k][0].slice_index is None, items[k][0].slice_index or 0))
            preds = np.stack([items[k][3] > opts.threshold for k in order])
            if postprocess_enabled(post):
                preds = postprocess_case(preds, post)
            for k, pred in zip(order, preds, strict=True):
                item, image, truth, prob = items[k]
                base = f"{item.out_dir}/{item.stem}" if item.out_dir else item.stem
                stage.png(f"{base}_pred.png", pred.astype(np.uint8) * 255)
                stage.png(f"{base}_prob.png", np.round(prob * 255).astype(np.uint8))
                stage.png(f"{base}_overlay.png", overlay(image, truth, pred))
                rows.append(_slice_row(item, base, pred, truth))

        pending = pool.submit(_read_batch, batches[0])
        for k, batch in enumerate(batches):
            current = pending.result()
            # Decode the next batch while this one runs through the network.
            if k + 1 < len(batches):
                pending = pool.submit(_read_batch, batches[k + 1])
            # Any slice size: padded to a square and resized to the dataset's 256 x 256 (identity for those).
            fitted = [fit_slice(img) for img, _ in current]
            x = torch.from_numpy(np.stack([preprocess(img, image_size) for img, _ in fitted])).to(device)
            a = None
            if lookup is not None:
                a = np.stack([lookup.slice_vector(vectors[(s.case_id, s.patient_id)][0], s) for s in batch])
                a = torch.from_numpy(a).to(device)
            probs = infer_probabilities(model, x, a, out_size=(RAW_SIZE, RAW_SIZE), tta=opts.tta).cpu().numpy()
            for item, (image, truth), prob, (_, fit) in zip(batch, current, probs, fitted, strict=True):
                # A case is written once all its slices are in: --largest-3d looks at the whole case.
                if case and case[0][0].case_id != item.case_id:
                    write_case(case)
                    case = []
                if case and case[0][1].shape != image.shape:
                    raise DataError(f"{item.image}: image is {image.shape[1]}x{image.shape[0]} in a case of "
                                    f"{case[0][1].shape[1]}x{case[0][1].shape[0]} slices; a case's slices must share one size")
                case.append((item, image, truth, unfit_probabilities(prob, fit)))
            bar.update(len(batch))
        if case:
            write_case(case)
        bar.close()
        slices = pd.DataFrame(rows)
        cases = _case_table(slices)
        slices = slices.merge(
            cases[["case_id", "volume_pixels", "dice_3d"]].rename(
                columns={"volume_pixels": "case_volume_pixels", "dice_3d": "case_dice_3d"}
            ),
            on="case_id",
            how="left",
        )
        stage.csv(SUMMARY_FILE, slices.drop(columns=["intersection"]))
        stage.csv(CASES_FILE, cases)
        stage.json(
            INFO_FILE,
            {
                "model_dir": str(model_path),
                "input": str(input_path),
                "input_kind": inputs.kind,
                "attributes": str(attr_source) if (use_attr and attr_source is not None) else None,
                "uses_attributes": use_attr,
                "image_size": image_size,
                "threshold": opts.threshold,
                "tta": opts.tta,
                "postprocess_min_area": opts.min_area,
                "postprocess_largest_3d": opts.largest_3d,
                "device": device.type,
                "n_slices": len(slices),
                "n_cases": len(cases),
                "probability_png": "round(255 * p), 8-bit grey",
            },
        )
    return slices


def _slice_row(item: SliceInput, output: str, pred: np.ndarray, truth: np.ndarray | None) -> dict[str, Any]:
    """The summary row of one slice: area in pixels and, with a truth mask, its Dice."""
    from lggseg.evaluation.metrics import confusion, dice_from_counts

    row: dict[str, Any] = {
        "case_id": item.case_id,
        "patient_id": item.patient_id or "",
        "slice_index": item.slice_index,
        "n_slices": item.n_slices,
        "position": item.position,
        "image": str(item.image),
        "output": output,
        "pred_pixels": int(pred.sum()),
        "truth_pixels": None,
        "intersection": None,
        "dice": None,
    }
    if truth is not None:
        c = confusion(pred, truth)
        row.update(truth_pixels=c.tp + c.fn, intersection=c.tp, dice=dice_from_counts(c.tp, c.tp + c.fn, c.tp + c.fp))
    return row


def _case_table(slices: pd.DataFrame) -> pd.DataFrame:
    """Per case: slices, predicted volume (pixels summed over slices), truth volume and 3-D Dice."""
    from lggseg.evaluation.metrics import dice_from_counts

    out = []
    for case_id, g in slices.groupby("case_id", sort=True):
        has_truth = g["truth_pixels"].notna().all()
        row = {
            "case_id": case_id,
            "patient_id": g["patient_id"].iloc[0],
            "n_slices": len(g),
            "volume_pixels": int(g["pred_pixels"].sum()),
            "truth_volume_pixels": int(g["truth_pixels"].sum()) if has_truth else None,
            "dice_3d": None,
            "dice_slice_mean": None,
        }
        if has_truth:
            row["dice_3d"] = dice_from_counts(g["intersection"].sum(), g["truth_pixels"].sum(), g["pred_pixels"].sum())
            row["dice_slice_mean"] = float(g["dice"].astype(float).mean())
        out.append(row)
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- NIfTI volumes


def _attribute_lookup(meta: dict[str, Any], model_path: Path, attributes: str | Path | None,
                      opts: PredictOptions) -> AttributeLookup | None:
    if not uses_attributes(meta):
        return None
    names = list(meta.get("attribute_names") or [])
    if len(names) != int(meta["n_attributes"]):
        raise ModelError(f"{model_path}: model.json lists {len(names)} attribute names for n_attributes={meta['n_attributes']}")
    source = Path(attributes) if attributes is not None else None
    if source is not None and not source.is_file():
        raise DataError(f"{source}: attributes file not found")
    return AttributeLookup(names, source, opts.allow_missing_attributes, model_path)


def _patient_of(case_id: str) -> str:
    from lggseg.data.layout import CASE_RE

    m = CASE_RE.match(case_id)
    return m.group(1) if m else case_id


def _nifti_like(data: np.ndarray, ref: Any, dtype: type, description: str) -> Any:
    """``data`` on ``ref``'s grid with ``ref``'s header: its qform and sform (and codes) kept as they are."""
    out = type(ref)(np.asarray(data, dtype=dtype), None, header=ref.header)
    out.set_data_dtype(dtype)
    out.header.set_slope_inter(1, 0)
    out.header["cal_min"], out.header["cal_max"] = 0, 1
    out.header["descrip"] = description.encode()[:79]
    return out


MONTAGE_TILES = 6
MONTAGE_TILE_PX = 192


def montage(flair: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Up to six FLAIR slices (K, rows, cols) with the predicted contour, 3 per row: the tumour's extent or the middle."""
    from lggseg.reporting.plotting import overlay

    k = flair.shape[0]
    has = np.flatnonzero(pred.reshape(k, -1).any(axis=1))
    lo, hi = (has[0], has[-1]) if has.size else (int(0.2 * (k - 1)), int(0.8 * (k - 1)))
    picks = sorted({int(round(v)) for v in np.linspace(lo, hi, min(MONTAGE_TILES, hi - lo + 1))})
    thickness = max(1, max(flair.shape[1:]) // 256)
    tiles = []
    for i in picks:
        tile = Image.fromarray(overlay(flair[i], None, pred[i], thickness))
        scale = MONTAGE_TILE_PX / max(tile.size)
        tiles.append(np.asarray(tile.resize((max(1, round(tile.size[0] * scale)), max(1, round(tile.size[1] * scale))),
                                            Image.Resampling.BILINEAR)))
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    cols = min(3, len(tiles))
    rows_n = -(-len(tiles) // cols)
    sheet = np.zeros((rows_n * h, cols * w, 3), np.uint8)
    for n, t in enumerate(tiles):
        r, c = divmod(n, cols)
        sheet[r * h : r * h + t.shape[0], c * w : c * w + t.shape[1]] = t
    return sheet


def predict_scans(
    model_dir: str | Path,
    cases: list[Any],
    out_dir: str | Path,
    attributes: str | Path | None = None,
    options: PredictOptions | None = None,
    probabilities: bool = False,
) -> pd.DataFrame:
    """Segment each case's NIfTI volumes (:class:`lggseg.data.scans.ScanCase`) and write the masks on their grids.

    Every case's files are opened and checked (readable 3-D NIfTI, sequences on one grid) before the
    model is loaded or anything is written; ``out_dir`` is built in a temporary folder and renamed
    into place at the end. Returns ``cases.csv``'s table.
    """
    from lggseg.config import PostprocessConfig
    from lggseg.data import scans
    from lggseg.evaluation.postprocess import enabled as postprocess_enabled
    from lggseg.evaluation.postprocess import postprocess_case
    from lggseg.models import read_meta
    from lggseg.runtime import resolve_device

    opts = options or PredictOptions()
    out_dir = Path(out_dir)
    device = resolve_device(opts.device)
    model_path = resolve_model_dir(model_dir, opts.seed)
    meta = read_meta(model_path)
    if len({c.case_id for c in cases}) != len(cases):
        raise DataError("two cases have the same name; outputs are named <case>_seg.nii.gz")
    headers = [scans.check_case(c) for c in cases]
    _check_output(out_dir)
    lookup = _attribute_lookup(meta, model_path, attributes, opts)
    vectors = {}
    if lookup is not None:
        for c in cases:
            vectors[c.case_id], found = lookup.patient_vector(_patient_of(c.case_id), c.case_id)
            if not found:
                print(f"lggseg predict: warning: no attributes for {c.case_id}; using the 'missing' category", file=sys.stderr)

    model, meta = _load(model_path, device)
    image_size = int(meta["image_size"])
    post = PostprocessConfig(min_area=opts.min_area, connectivity=opts.connectivity, largest_3d=opts.largest_3d)
    rows: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        stage = _Staging(tmp, out_dir)
        for case, imgs in tqdm(list(zip(cases, headers, strict=True)), desc="predict", unit="case"):
            ref = imgs["flair"]
            ornt = scans.orientation(ref.affine)
            channel: dict[str, np.ndarray] = {}
            how: dict[str, str] = {}
            for seq in imgs:
                channel[seq], how[seq] = scans.to_uint8(scans.read_data(imgs[seq], case.files[seq]), seq)
            # A sequence not acquired is a copy of FLAIR, as the dataset stores it.
            volume = np.stack([channel.get(seq, channel["flair"]) for seq in scans.SEQUENCES], axis=-1)
            slices = scans.volume_to_slices(volume, ornt)
            n = len(slices)
            prob = np.empty(slices.shape[:3], dtype=np.float32)
            for start in range(0, n, opts.batch_size):
                fitted = [scans.fit_slice(im) for im in slices[start : start + opts.batch_size]]
                x = torch.from_numpy(np.stack([preprocess(im, image_size) for im, _ in fitted])).to(device)
                a = None
                if lookup is not None:
                    items = [SliceInput(case.case_id, _patient_of(case.case_id), k + 1, n, case.files["flair"], None, "")
                             for k in range(start, start + len(fitted))]
                    a = torch.from_numpy(np.stack([lookup.slice_vector(vectors[case.case_id], it) for it in items])).to(device)
                p = infer_probabilities(model, x, a, out_size=(RAW_SIZE, RAW_SIZE), tta=opts.tta).cpu().numpy()
                prob[start : start + len(fitted)] = scans.unfit_probabilities(p, fitted[0][1])
            pred = prob > opts.threshold
            if postprocess_enabled(post):
                pred = postprocess_case(pred, post)
            seg = scans.slices_to_volume(pred.astype(np.uint8), ornt)
            zooms = [float(z) for z in ref.header.get_zooms()[:3]]
            voxels = int(seg.sum())
            base = case.case_id
            stage.nifti(f"{base}_seg.nii.gz", _nifti_like(seg, ref, np.uint8, "lggseg tumour mask (0/1)"))
            if probabilities:
                stage.nifti(f"{base}_prob.nii.gz",
                            _nifti_like(scans.slices_to_volume(prob, ornt), ref, np.float32, "lggseg tumour probability"))
            stage.png(f"{base}_overlay.png", montage(slices[..., 1], pred))
            rows.append({
                "case_id": case.case_id,
                **{f"{seq}_file": str(case.files[seq]) if seq in case.files else "(FLAIR copy)" for seq in scans.SEQUENCES},
                "shape": "x".join(str(d) for d in seg.shape),
                "voxel_mm": "x".join(f"{z:g}" for z in zooms),
                "orientation": "".join(ornt.axcodes),
                "n_axial_slices": n,
                "slice_px": f"{slices.shape[2]}x{slices.shape[1]}",
                **{f"intensity_{seq}": how.get(seq, "(FLAIR copy)") for seq in scans.SEQUENCES},
                "volume_voxels": voxels,
                "volume_ml": voxels * float(np.prod(zooms)) / 1000.0,
                "seg": f"{base}_seg.nii.gz",
            })
        table = pd.DataFrame(rows)
        stage.csv(CASES_FILE, table)
        stage.json(INFO_FILE, {
            "model_dir": str(model_path),
            "input_kind": "nifti",
            "cases": [c.case_id for c in cases],
            "uses_attributes": lookup is not None,
            "attributes": str(attributes) if (lookup is not None and attributes is not None) else None,
            "image_size": image_size,
            "threshold": opts.threshold,
            "tta": opts.tta,
            "postprocess_min_area": opts.min_area,
            "postprocess_largest_3d": opts.largest_3d,
            "probabilities": probabilities,
            "device": device.type,
            "geometry": "reoriented to RAS (closest axes), axial slices shown rows A->P, columns R->L, slice 1 inferior; "
                        "centred zero pad to a square and resize to 256 in-plane only; inverted exactly on output",
            "mask_header": "the FLAIR file's header, qform and sform kept",
        })
    return table


# --------------------------------------------------------------------------- command line


def build_parser(prog: str = "lggseg predict") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Segment MRI slices or NIfTI volumes with a trained lggseg model: binary mask, probability map, "
        "overlay and a summary of tumour areas, case volumes and Dice (where a mask sits beside the slice). "
        "NIfTI: --flair F.nii.gz [--pre T1.nii.gz] [--post T1C.nii.gz], or --input with <case>_flair/_t1/_t1c.nii.gz "
        "files; the mask <case>_seg.nii.gz lies on the FLAIR grid (docs/own-scans.md).",
    )
    ap.add_argument("--model", required=True, type=Path, help="model dir (model.json + model.safetensors) or models/<variant>")
    ap.add_argument("--input", type=Path,
                    help="a slice (.tif/.png), a case folder, a folder of case folders, a <case>_flair.nii.gz file or a "
                    "folder of <case>_{flair,t1,t1c}.nii.gz files")
    ap.add_argument("--flair", type=Path, help="one patient's FLAIR NIfTI volume (instead of --input)")
    ap.add_argument("--pre", type=Path, help="with --flair: the pre-contrast T1 volume on the same grid (default: FLAIR copy)")
    ap.add_argument("--post", type=Path, help="with --flair: the post-contrast T1 volume on the same grid (default: FLAIR copy)")
    ap.add_argument("--probabilities", action="store_true", help="NIfTI input: also write <case>_prob.nii.gz (float32)")
    ap.add_argument("--output", required=True, type=Path, help="output folder (created or replaced whole at the end)")
    ap.add_argument("--attributes", type=Path, help="data.csv-shaped file with the genomic clusters (default: the input's data.csv)")
    ap.add_argument("--allow-missing-attributes", action="store_true", help="use the 'missing' category for patients without a row")
    ap.add_argument("--postprocess-min-area", type=int, default=0, metavar="N", help="remove predicted regions under N pixels")
    ap.add_argument("--largest-3d", action="store_true",
                    help="keep only the largest 3D region of each case (its slices stacked in slice order)")
    ap.add_argument("--tta", action="store_true", help="average the probabilities of identity, h-flip and v-flip")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, help="which seed_<s>/ of a models/<variant> folder holding several")
    return ap


def _scan_cases(args: argparse.Namespace) -> list[Any] | None:
    """The NIfTI cases the arguments name, or ``None`` for slice input (TIFF/PNG)."""
    from lggseg.data.scans import case_from_files, find_cases, is_nifti

    if args.flair is not None:
        if args.input is not None:
            raise ConfigError("give --input or --flair, not both")
        return [case_from_files(args.flair, args.pre, args.post)]
    if args.pre is not None or args.post is not None:
        raise ConfigError("--pre and --post need --flair")
    if args.input is None:
        raise ConfigError("give --input (slices, case folders or NIfTI files) or --flair")
    path = Path(args.input)
    if path.is_file() and is_nifti(path):
        return find_cases(path)
    if path.is_dir() and any(is_nifti(p) for p in visible_entries(path)):
        return find_cases(path)
    if path.is_file() and path.name.lower().endswith((".nii.gz", ".gz", ".nii", ".mgz", ".mha", ".nrrd", ".dcm")):
        raise DataError(f"{path}: not a NIfTI volume or a slice image (.nii/.nii.gz or .tif/.png expected)")
    if args.probabilities:
        raise ConfigError("--probabilities is for NIfTI input; slices always get <slice>_prob.png")
    return None


def main(argv: list[str] | None = None, prog: str = "lggseg predict") -> int:
    """Console entry point; returns the exit status (2 on bad input, with a one-line message)."""
    ap = build_parser(prog)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse's own usage errors and --help
        return int(exc.code or 0)
    try:
        opts = PredictOptions(
            threshold=args.threshold, batch_size=args.batch_size, tta=args.tta, min_area=args.postprocess_min_area,
            largest_3d=args.largest_3d,
            device=args.device, seed=args.seed, allow_missing_attributes=args.allow_missing_attributes,
        )
        cases = _scan_cases(args)
        if cases is not None:
            table = predict_scans(args.model, cases, args.output, args.attributes, opts, args.probabilities)
        else:
            slices = predict(args.model, args.input, args.output, args.attributes, opts)
    except LggsegError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {args.output} left as it was", file=sys.stderr)
        return 130
    if cases is not None:
        volumes = ", ".join(f"{r.case_id} {r.volume_ml:.1f} mL" for r in table.itertuples())
        print(f"{prog}: {len(table)} case(s) -> {args.output} (tumour volume: {volumes})")
        return 0
    dice = slices["dice"].dropna().astype(float)
    msg = f"{prog}: {len(slices)} slices -> {args.output}"
    if len(dice):
        msg += f" (mean Dice {dice.mean():.4f} over {len(dice)} slices with truth)"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
