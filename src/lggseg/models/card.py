"""``MODEL_CARD.md``: what a trained model is, what it saw, what it scored and what it is for (issue #22).

:func:`lggseg.models.save_model` writes the card beside ``model.safetensors`` from the model's own
``model.json`` (architecture, run config, data fingerprint, training device, epochs and time); the
evaluate stage writes it again once the test metrics exist (:func:`write_card` with ``metrics``, the
``metrics/<variant>.json`` dict), adding them with their bootstrap intervals, conventions and the
split's patients. ``lggseg predict`` prints the card's one-line summary (:func:`card_summary`).

Only keys the model's metadata actually holds are shown; a model saved before a key existed simply
lacks that line. The card is derived data: ``.dvcignore`` keeps it out of the model directory's DVC
hash, so writing it after training does not make DVC re-train.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lggseg.io import project_commit, write_text

CARD_FILE = "MODEL_CARD.md"
_SUMMARY_MARK = "> "
_INTENDED = "research use, not a medical device"
_METRICS = (
    ("dice_slice_mean", "Dice, slice mean (empty truth + empty prediction = 1)", "dice_slice_mean_ci95"),
    ("dice_patient_3d", "Dice, per patient 3D (mean over patients)", "dice_patient_3d_ci95"),
    ("dice_tumour_slices", "Dice, slices with tumour", None),
    ("dice_micro", "Dice, all test pixels pooled", None),
    ("iou_slice_mean", "IoU, slice mean", None),
    ("empty_fp_rate", "tumour-free slices with any predicted pixel", None),
    ("hd95_px", "HD95 in pixels (tumour slices with a prediction)", None),
)


def _get(d: Mapping[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def _seed_block(metrics: Mapping[str, Any], seed: Any) -> Mapping[str, Any]:
    """The metrics of this seed's model: its ``per_seed`` block when the variant has several seeds."""
    per_seed = metrics.get("per_seed")
    if isinstance(per_seed, Mapping) and str(seed) in per_seed:
        return per_seed[str(seed)]
    return metrics


def _name(meta: Mapping[str, Any]) -> tuple[str, str]:
    run = meta.get("run_config") or {}
    variant = run.get("variant") or "model"
    label = run.get("label") or f"{meta.get('arch', '?')} {meta.get('encoder', '?')}"
    return str(variant), str(label)


_LGG = ("LGG Segmentation Dataset (Buda et al. 2019; Kaggle `mateuszbuda/lgg-mri-segmentation`): axial brain MRI "
        "of lower-grade glioma patients from The Cancer Imaging Archive (TCGA-LGG, 5 institutions), FLAIR "
        "abnormality masks drawn by hand; slices are not skull-stripped")


def _data_line(source: Any) -> str:
    if source == "demo":
        return ("- SYNTHETIC demo data (`lggseg.data.synthetic`, head phantoms in the Kaggle layout), not patient data: "
                "this model checks the pipeline; its numbers say nothing about real scans")
    if source is None:
        return f"- normally the {_LGG}; the evaluate stage states the source"
    return f"- {_LGG}"


def _inputs(meta: Mapping[str, Any]) -> str:
    cfg = meta.get("model_config") or {}
    if cfg.get("attributes") and int(meta.get("n_attributes") or 0) > 0:
        names = [str(n) for n in meta.get("attribute_names") or []]
        cols = sorted({n.split(":", 1)[-1].split("=", 1)[0] for n in names if n.startswith("attr:") and "=" in n})
        pos = " and the slice position in its case" if "attr:position" in names else ""
        return f"slices + the patient's genomic clusters ({', '.join(cols)}){pos}"
    return "slices only (no genomic attributes)"


def _test_line(metrics: Mapping[str, Any] | None, seed: Any) -> str:
    if not metrics:
        return "test metrics: not evaluated yet"
    m = _seed_block(metrics, seed)
    pp = m.get("postprocessed") if isinstance(m.get("postprocessed"), Mapping) else None
    best = pp or m
    ci = best.get("dice_patient_3d_ci95") or [None, None]
    what = " after post-processing" if pp else ""
    return (f"test Dice slice-mean {_num(best.get('dice_slice_mean'), 3)}, patient 3D {_num(best.get('dice_patient_3d'), 3)} "
            f"[95% CI {_num(ci[0], 3)}-{_num(ci[1], 3)}]{what} on {m.get('n_test_patients', '?')} patients")


def card_summary_line(meta: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> str:
    """One line: the model, its inputs, its test Dice (or that it is not evaluated) and its intended use."""
    variant, label = _name(meta)
    seed = meta.get("seed")
    size = meta.get("image_size")
    seed_part = f", seed {seed}" if seed is not None else ""
    demo = _get(metrics, "provenance", "data", "source") == "demo"
    return (f"{label} (variant {variant}{seed_part}, {size} px, {_inputs(meta)}); {_test_line(metrics, seed)}"
            f"{' on SYNTHETIC demo data' if demo else ''}; {_INTENDED}")


def card_text(meta: Mapping[str, Any], metrics: Mapping[str, Any] | None = None, weights_bytes: int | None = None) -> str:
    """The Markdown of the card for ``meta`` (``model.json``) and, once evaluated, ``metrics``."""
    variant, label = _name(meta)
    seed = meta.get("seed")
    cfg = meta.get("model_config") or {}
    run = meta.get("run_config") or {}
    common = run.get("common") or {}
    prov = (metrics or {}).get("provenance") or {}
    data = prov.get("data") or {}
    lines = [
        f"# Model card: {label} (variant `{variant}`, seed {seed})",
        "",
        _SUMMARY_MARK + card_summary_line(meta, metrics),
        "",
        "## Model",
        "",
        f"- architecture: `{meta.get('arch', cfg.get('arch'))}` with encoder `{meta.get('encoder', cfg.get('encoder'))}`, "
        f"output stride {cfg.get('output_stride', 'n/a')}, decoder channels {cfg.get('decoder_channels', 'n/a')}",
        f"- attribute encoder (paper section 3.2.2): {'yes' if cfg.get('attributes') else 'no'}"
        + (f", {meta.get('n_attributes')} inputs" if cfg.get("attributes") else ""),
        f"- input size: {meta.get('image_size')} x {meta.get('image_size')} px (slices are resized from 256 x 256 and "
        "the probabilities back)",
        f"- parameters: {meta.get('n_parameters', 'n/a')}; file format `{meta.get('format', 'n/a')}`",
        f"- loss: {', '.join((run.get('loss') or {}).get('terms') or []) or 'n/a'}",
        "",
        "## Training data",
        "",
        _data_line(data.get("source")),
        f"- source: {data.get('source') or 'named by the evaluate stage (metrics/fetch.json of the run)'}; data "
        f"fingerprint `{meta.get('fingerprint') or data.get('fingerprint') or 'n/a'}`",
    ]
    splits = data.get("splits") or {}
    if splits:
        parts = [f"{s} {v.get('patients')} patients / {v.get('slices')} slices" for s, v in splits.items()]
        split_seed = (prov.get("seeds") or {}).get("split")
        lines.append(f"- split by {data.get('split_unit') or 'patient'} (seed {split_seed}): " + "; ".join(parts))
    else:
        lines.append(f"- split: patient-level train/val/test (70/15/15 by default), split seed {common.get('seed', 'n/a')}; "
                     "patients per split are filled in by the evaluate stage")
    lines += [
        "",
        "## Inputs",
        "",
        "- axial slices, 256 x 256, three uint8 channels in the order (pre-contrast T1, FLAIR, post-contrast T1); "
        "a sequence that was not acquired is given as a copy of FLAIR, as the dataset stores it",
        f"- {_inputs(meta)}",
        "- from NIfTI: `lggseg predict --flair F.nii.gz [--pre T1.nii.gz] [--post T1C.nii.gz]`, sequences on one grid "
        "(co-registered), reoriented and sliced axially by lggseg (docs/own-scans.md)",
        "",
        "## Test metrics",
        "",
    ]
    lines += _metric_lines(metrics, seed)
    lines += [
        "",
        "## Training",
        "",
    ]
    hw = meta.get("hardware") or {}
    sw = meta.get("software") or {}
    lines += [
        f"- device: {meta.get('device', 'n/a')}" + (f" ({hw.get('device_name')}, {hw.get('precision')})" if hw else "")
        + (f", {meta.get('world_size')} process(es)" if meta.get("world_size") else ""),
        f"- epochs: {meta.get('epochs_done', 'n/a')} done of {meta.get('epochs_planned', meta.get('epochs', 'n/a'))} "
        f"planned ({meta.get('stop_reason', 'n/a')}); kept epoch {meta.get('best_epoch', 'n/a')} "
        f"(validation Dice {_num(meta.get('best_val_dice'))}, {meta.get('selection_rule', 'best validation Dice')})",
        f"- time: {_num(meta.get('wall_seconds'), 0)} s wall, {_num(meta.get('train_seconds'), 0)} s in training steps",
        f"- initialisation: {'ImageNet-pretrained encoder' if meta.get('pretrained') else 'random (no pretrained weights)' if meta.get('pretrained') is False else 'n/a'}",
    ]
    if sw:
        lines.append("- software: " + ", ".join(f"{k} {v}" for k, v in sw.items()))
    lines += [
        "",
        "## Intended use and limits",
        "",
        f"- {_INTENDED}: for research on glioma segmentation; no output may be used for diagnosis or treatment.",
        "- trained and tested on one public dataset (TCGA-LGG, lower-grade gliomas, pre-operative scans of 5 institutions, "
        "1995-2013); not validated on other scanners, protocols, tumour types or children.",
        "- the training slices are not skull-stripped: skull-stripped input looks different at the brain edge and has not "
        "been validated; neither has input whose intensities were not 0-255 (lggseg windows those, docs/own-scans.md).",
        "- 2-D model: each axial slice is segmented alone (post-processing may link slices).",
        "",
        "## Files to share",
        "",
        f"- `model.safetensors` (the weights{f', {weights_bytes / 1e6:.1f} MB' if weights_bytes else ''}) and "
        "`model.json` (what rebuilds the network): both are needed, nothing else",
        f"- `{CARD_FILE}` (this card), so that the receiver knows what the model is",
        "- not needed: `result.json`, `dvclive/`, checkpoints (training logs)",
        "- the receiver runs `lggseg predict --model DIR ...` with lggseg installed",
        "",
    ]
    return "\n".join(lines)


def _metric_lines(metrics: Mapping[str, Any] | None, seed: Any) -> list[str]:
    if not metrics:
        return ["Not evaluated yet: the evaluate stage (`dvc repro evaluate@<variant>`) writes this card again with the "
                "test metrics."]
    m = _seed_block(metrics, seed)
    blocks = [("as predicted", m)]
    if isinstance(m.get("postprocessed"), Mapping):
        blocks.append(("after post-processing", m["postprocessed"]))
    header = "| metric | " + " | ".join(b for b, _ in blocks) + " |"
    out = [header, "| --- |" + " --- |" * len(blocks)]
    for key, text, ci_key in _METRICS:
        cells = []
        for _, b in blocks:
            value = b.get(key)
            ci = b.get(ci_key) if ci_key else None
            cells.append(_num(value) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci and None not in ci else ""))
        out.append(f"| {text} | " + " | ".join(cells) + " |")
    prov = metrics.get("provenance") or {}
    ev = prov.get("evaluation") or {}
    pp = m.get("postprocessed") if isinstance(m.get("postprocessed"), Mapping) else {}
    seeds = metrics.get("seeds") or []
    out += [
        "",
        f"Test split: {m.get('n_test_patients', 'n/a')} patients, {m.get('n_test_slices', 'n/a')} slices, never used "
        "to choose anything. Conventions: masks thresholded at probability 0.5 after bilinear upsampling to 256 x 256; "
        f"test-time augmentation (flips averaged): {'yes' if metrics.get('tta') else 'no'}; "
        + (f"post-processing: components under {pp.get('min_area')} px removed"
           + (", then each case's largest 3D region kept" if pp.get("largest_3d") else "") + "; " if pp else "")
        + "[brackets]: 95% percentile bootstrap intervals resampling patients "
        f"(seed {(prov.get('seeds') or {}).get('bootstrap', 'n/a')}); a slice with empty truth and empty prediction "
        "scores 1.",
    ]
    if len(seeds) > 1:
        out.append(f"These are the numbers of seed {seed}; the variant's {len(seeds)} seeds are summarised in its metrics file.")
    if ev:
        commit, where = project_commit(prov)
        out.append(f"Evaluated on {ev.get('device', 'n/a')}, {where} {commit or 'n/a'}.")
    return out


def write_card(model_dir: str | Path, meta: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> Path:
    """Write ``model_dir/MODEL_CARD.md`` atomically; returns its path."""
    model_dir = Path(model_dir)
    weights = model_dir / "model.safetensors"  # serialization.WEIGHTS_FILE (which imports this module)
    size = weights.stat().st_size if weights.is_file() else None
    return write_text(model_dir / CARD_FILE, card_text(meta, metrics, size))


def card_summary(model_dir: str | Path, meta: Mapping[str, Any]) -> str:
    """The summary line of ``model_dir``'s card, or one made from ``meta`` when there is no card."""
    path = Path(model_dir) / CARD_FILE
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith(_SUMMARY_MARK):
                return line[len(_SUMMARY_MARK):].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return card_summary_line(meta) + f" (no {CARD_FILE})"
