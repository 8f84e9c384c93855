"""Markdown tables: each paper row beside our Dice conventions with the difference, the provenance line under
every table, and the beyond-the-paper table (post-processing, isolated-region loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lggseg.config import is_number
from lggseg.io import project_commit
from lggseg.reporting.paper import PAPER_TABLES, TABLE_NOTES, TABLE_TITLES, PaperRow
from lggseg.reporting.results import Result


def _std(m: Mapping[str, Any], key: str) -> float | None:
    """Seed standard deviation of ``key``; only multi-seed blocks (top level and postprocessed) have one."""
    v = (m.get("seed_std") or {}).get(key)
    return float(v) if is_number(v) else None


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


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
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
    commit, where = project_commit(p)
    return {
        "data": _data_identity(p),
        "size": _image_size(p),
        "device": _joined([device(t) for t in runs]),
        "epochs": _joined([epochs(t) for t in runs]),
        "init": _joined([init(t) for t in runs]),
        "seeds": ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds),
        "software": versions or "versions not recorded",
        "commit": f"{where} {commit}" if commit else "no git commit",
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
    return [f"### {TABLE_TITLES[table]}", "", *md_table(header, rows), "", *provenance_lines(shown),
            f"*{TABLE_NOTES[table]}*", ""]


def _best(results: Sequence[Result], keep: Callable[[Result], bool] = lambda r: True) -> Result | None:
    pool = [r for r in results if keep(r)]
    return max(pool, key=lambda r: r.metrics["dice_slice_mean"]) if pool else None


def uses_outlier(r: Result) -> bool:
    """Whether the variant trains with the outlier term."""
    return "outlier" in r.run.loss.terms


def postprocess_comparison(results: Sequence[Result]) -> list[Result]:
    """Best variant, best variant without the outlier term, and every variant with the outlier term.

    This asks the question behind the outlier loss: does removing small components after the fact
    (``postprocess.min_area``) give a plain model what the loss gives during training?
    """
    picked: list[Result] = []
    for r in (_best(results), _best(results, lambda r: not uses_outlier(r)), *(r for r in results if uses_outlier(r))):
        if r is not None and r.name not in {p.name for p in picked}:
            picked.append(r)
    return picked


def beyond_markdown(results: Sequence[Result], absent: Sequence[Result] = ()) -> list[str]:
    """The beyond-the-paper tables; ``absent``: variants of the params without results (rows "not run")."""
    lines = ["## Beyond the paper", "", "### Our variants and the paper variants they are compared with", ""]
    beyond = [r for r in results if "beyond" in r.run.tables]
    header = ("Variant", *OURS_HEADER, "IoU slice-mean", *TAIL_HEADER)
    rows = [[f"{r.label} (`{r.name}`)", *_ours_cells(r.metrics, None), _value(r.metrics, "iou_slice_mean"),
             *_tail_cells(r.metrics), _seeds(r.metrics)] for r in beyond]
    rows += [[f"{r.label} (`{r.name}`)", "not run", *["–"] * (len(header) - 2)]
             for r in absent if "beyond" in r.run.tables]
    if rows:
        lines += [*md_table(header, rows), "", *provenance_lines(beyond)]
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
    lines += [*md_table(header, rows), "", *provenance_lines(compared)]
    if any("postprocessed" not in r.metrics for r in results):
        lines += ["Variants without a post-processed row were evaluated with `postprocess.min_area: 0` (disabled).", ""]
    return lines
