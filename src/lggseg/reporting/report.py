"""The report stage: paper Tables 2-4 regenerated from ``metrics/<variant>.json``, and the figures.

Wan et al. (2023) report one DSC and one IoU per model (Tables 2-4, section 4.2) without saying how
Dice is averaged. Every table here therefore puts the paper's number beside each of our Dice
conventions (slice mean, tumour-slice mean, patient 3-D, pooled micro; see ``lggseg.evaluation.metrics``) with
the difference, so the reader can see which reading the paper's numbers resemble. Variants are
mapped to paper rows by their settings (loss terms for Table 2, ``model.attributes`` for Table 3,
``model.arch``/``model.encoder`` for Table 4) and their ``tables`` membership in ``params.yaml``,
never by variant name.

Beside the tables, the paired per-patient comparisons of the paper's claims with the seed noise floor and
a verdict per table (:mod:`lggseg.reporting.paired`, from ``data/eval/<variant>/patients.csv``).

Figures: paper Fig. 7 (BCE vs BCE + Dice + outlier loss: contours and probability heatmaps),
Fig. 8 (Table 4 encoders on the same slices), the dataset's ground-truth component sizes (the
"six regions smaller than 7 x 7" of section 4.1.3) and a Dice-by-variant chart with bootstrap CIs.

A subset of the variants is a report of that subset (Tables 2-4 trained over several sittings, issue
#21): a variant of ``params.yaml`` without ``metrics/<variant>.json`` is "not run" in its paper row and in
the paired comparisons, and a figure that needs it is skipped with one line saying which variants it
needs (:func:`figure7_variants`, :func:`figure8_variants`). Several sittings' folders are merged by
``lggseg report`` (:mod:`lggseg.reporting.merge`).

Inputs that the report needs and cannot read are errors naming the file (:class:`DataError`);
numbers that come from the synthetic demo data are labelled as such in the tables and figures.
Under every table one line gives the provenance of its numbers (the ``provenance`` block that
:mod:`lggseg.evaluation.evaluate` writes: data, image size, device and precision, epochs, initialisation,
seeds, training time, versions, commit), and a warning line follows when the table mixes data
sources/fingerprints or image sizes, whose numbers must not be compared as if alike.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from lggseg.config import load_section
from lggseg.errors import DataError
from lggseg.io import write_text
from lggseg.reporting import plotting
from lggseg.reporting.paired import LEVEL_EPOCHS, LEVEL_TOLERANCE, load_patients, paired_markdown, run_curves
from lggseg.reporting.paper import TABLE_TITLES
from lggseg.reporting.results import (
    FigureSlices,
    Result,
    below_text,
    component_counts,
    load_available,
    load_components,
    load_figure_slices,
)
from lggseg.reporting.tables import (
    beyond_markdown,
    md_table,
    paper_matches,
    paper_table_markdown,
    uses_outlier,
)

# --------------------------------------------------------------------------- paper numbers


FIGURE_FILES = {
    "figure7": "figure7_loss_comparison.png",
    "figure8": "figure8_encoders.png",
    "components": "component_sizes.png",
    "dice": "test_dice_by_variant.png",
    "curves": "validation_curves.png",
    "figure9": "figure9_outlier_loss.png",
}


# --------------------------------------------------------------------------- metrics files


# --------------------------------------------------------------------------- figure slices


# --------------------------------------------------------------------------- ground-truth components


# --------------------------------------------------------------------------- formatting


# --------------------------------------------------------------------------- tables


# --------------------------------------------------------------------------- provenance


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


def _dataset_lines(components: pd.DataFrame | None, source: Path, data_json: Path, summary: Any, fig_link: str,
                   side: int) -> list[str]:
    lines = ["## Dataset: ground-truth component sizes", ""]
    if components is None:
        lines += [f"Not drawn: no ground-truth component table (`{source.as_posix()}`) among these results "
                  "(a snapshot folder keeps none).", ""]
        return lines + _summary_lines(data_json, summary)
    lines += ["Paper section 4.1.3: *six segmentation regions smaller than 7 x 7* in the dataset (of about 3929 slices). "
              "Ground-truth connected components of every mask, counted under each reading of 'smaller than 7 x 7':", ""]
    rows = [
        [f"{conn}-connected", str(c["components"]), str(c["area_lt_side_sq"]), str(c["bbox_le_side"]),
         str(c["bbox_lt_side"]), str(c["slices_with_area_lt_side_sq"])]
        for conn, c in component_counts(components, side).items()
    ]
    lines += md_table(("Connectivity", "Components", f"area < {side * side} px", f"bounding box <= {side} x {side}",
                        f"bounding box < {side} x {side}", f"slices with a component < {side * side} px"), rows)
    lines += ["", f"From `{source.as_posix()}`.", "", f"![component sizes]({fig_link})", ""]
    return lines + _summary_lines(data_json, summary)


def _summary_lines(data_json: Path, summary: Any) -> list[str]:
    scalars = _flat_scalars(summary) if summary is not None else []
    if not scalars:
        return []
    return [f"### Dataset summary (`{data_json.as_posix()}`)", "", *md_table(("Key", "Value"), scalars), ""]


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


FigurePick = tuple[list[Result] | None, str]
"""The variants a figure draws (None: not drawn) and, when not drawn, why (which variants it needs)."""


def _needs(picked: Sequence[Result], results: Sequence[Result]) -> FigurePick:
    have = {r.name for r in results}
    lacking = [r.name for r in picked if r.name not in have]
    if lacking:
        return None, (f"needs {', '.join(f'`{r.name}`' for r in picked)}; no results for "
                      f"{', '.join(f'`{n}`' for n in lacking)}")
    return list(picked), ""


def figure7_variants(results: Sequence[Result], absent: Sequence[Result] = ()) -> FigurePick:
    """The Table 2 BCE variant and the Table 2 BCE + Dice + outlier variant (paper mode preferred), chosen
    among all the variants (``absent``: those without results), so a missing one skips the figure rather
    than putting another variant in its place."""
    t2 = [r for r in (*results, *absent) if "table2" in r.run.tables]
    bce = next((r for r in t2 if set(r.run.loss.terms) == {"bce"}), None)
    outl = sorted((r for r in t2 if uses_outlier(r)), key=lambda r: r.run.loss.outlier_mode != "paper")
    if bce is None or not outl:
        return None, ("needs a variant in table2 with loss.terms [bce] and one with the outlier term; "
                      f"table2 has {[r.name for r in t2]}")
    return _needs((bce, outl[0]), results)


def figure8_variants(results: Sequence[Result], absent: Sequence[Result] = ()) -> FigurePick:
    """Every Table 4 variant (paper order); the figure is skipped while one of them has no results."""
    ordered = [r for _, hits in paper_matches("table4", [*results, *absent]) for r in hits]
    if not ordered:
        return None, "needs at least one variant listing table4 in its tables"
    return _needs(ordered, results)


def validation_curve_panels(results: Sequence[Result]) -> dict[str, list[tuple[str, list[float]]]]:
    """Validation curves by paper table (a variant of several tables in each), then the other variants."""
    titles = {**{k: t.replace(" - ", ": ", 1) for k, t in TABLE_TITLES.items()}, "beyond": "Beyond the paper: our variants"}
    panels: dict[str, list[tuple[str, list[float]]]] = {}
    for key, title in titles.items():
        members = [r for r in results if key in r.run.tables or
                   (key == "beyond" and not set(r.run.tables) & set(TABLE_TITLES))]
        runs = [(f"{r.name} seed {seed}", curve) for r in members for seed, curve in run_curves(r) if curve]
        if runs:
            panels["\n".join(textwrap.wrap(title, 52))] = runs
    return panels


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
    # a subset of the variants (a sitting of a run split over several) is a report of that subset
    results, absent = load_available(params, metrics_dir)
    source = data_source(metrics_dir, params)
    components = load_components(manifest_dir / "components.csv")
    data_json = metrics_dir / "data.json"
    summary = _read_json(data_json) if data_json.is_file() else None
    # per-patient rows of the paired comparisons; a variant without them is named in the section, not an error
    patients = {r.name: load_patients(path) for r in results if (path := eval_dir / r.name / "patients.csv").is_file()}
    fig7, why7 = figure7_variants(results, absent)
    fig8, why8 = figure8_variants(results, absent)
    slices = {r.name: load_figure_slices(eval_dir / r.name / "figure_slices.npz")
              for r in tqdm({r.name: r for r in (*(fig7 or ()), *(fig8 or ()))}.values(), desc="figure slices",
                            leave=False)}
    write_report(params, results, source, components, slices, out_md, plots_dir,
                 where=ReportSources(eval_dir, manifest_dir / "components.csv", data_json, summary), fig7=fig7, fig8=fig8,
                 missing={"figure7": why7, "figure8": why8}, patients=patients, absent=absent)


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
    components: pd.DataFrame | None,
    slices: Mapping[str, FigureSlices],
    out_md: str | Path,
    plots_dir: str | Path,
    *,
    where: ReportSources,
    fig7: Sequence[Result] | None,
    fig8: Sequence[Result] | None,
    missing: Mapping[str, str] | None = None,
    patients: Mapping[str, pd.DataFrame] | None = None,
    absent: Sequence[Result] = (),
    origin: Sequence[str] = (),
) -> None:
    """The report of loaded, validated inputs: :func:`build_report` (the stage) and
    :func:`lggseg.reporting.merge.build_report_from_folders` (reproduce folders and snapshots) both end here.

    ``fig7``/``fig8`` None: that figure is not drawn, for the reason in ``missing[figure]``. ``patients``:
    each variant's per-patient rows (:func:`lggseg.reporting.paired.load_patients`) for the paired comparisons;
    None leaves that section out. ``absent``: the variants of the params without results (their paper rows
    say "not run", comparisons with them are listed as not run). ``components`` None: the ground-truth
    component table is not among the inputs (a snapshot folder), its figure and table are left out.
    ``origin``: markdown lines placed under the header (where the results came from, when merged).
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
    if components is not None:
        counts = component_counts(components, side)
        plotting.plot_component_sizes(
            {f"{c}-connected": components.loc[components["connectivity"] == c, "area"].to_numpy() for c in counts},
            {f"{c}-connected": below_text(n, side) for c, n in counts.items()}, paths["components"], side=side,
            note=note,
        )
    plotting.plot_dice_by_variant(_dice_bars(results), paths["dice"], note=note)
    panels = validation_curve_panels(results)
    plotting.plot_validation_curves(panels, paths["curves"], LEVEL_EPOCHS, LEVEL_TOLERANCE, note=note)

    md_dir = out_md.parent
    links = {k: _relative(p, md_dir) for k, p in paths.items()}
    lines = _header_lines(source, results, side)
    lines += list(origin)
    if absent:
        lines += [f"Not run yet (variants of the params without results; their rows say so): "
                  f"{', '.join(f'`{r.name}`' for r in absent)}.", ""]
    lines += ["## Paper tables", ""]
    for table in ("table2", "table3", "table4"):
        lines += paper_table_markdown(table, results)
    if patients is not None:
        lines += paired_markdown(results, patients, n_samples=evaluate.bootstrap_samples, seed=evaluate.bootstrap_seed,
                                 absent=absent)
    lines += [f"![Test Dice by variant]({links['dice']})", ""]
    lines += ["## Figures", ""]
    lines.append(f"- Validation Dice per epoch of every run, by table: ![validation curves]({links['curves']})"
                 if panels else f"- Validation curves: none recorded in the metrics (drawn empty: {links['curves']})")
    lines.append(f"- Figure 7 (loss comparison, `{fig7[0].name}` vs `{fig7[1].name}`): ![figure 7]({links['figure7']})"
                 if fig7 is not None else f"- Figure 7: not drawn ({missing.get('figure7', 'not asked for')})")
    lines.append(f"- Figure 8 (encoders of Table 4): ![figure 8]({links['figure8']})"
                 if fig8 is not None else f"- Figure 8: not drawn ({missing.get('figure8', 'not asked for')})")
    if where.figure9:
        fig9_state = "" if paths["figure9"].is_file() else " (not written yet: run the figure9 stage)"
        lines.append(f"- Figure 9 (outlier loss on a synthetic input){fig9_state}: ![figure 9]({links['figure9']})")
    lines.append("")
    lines += beyond_markdown(results, absent)
    lines += _dataset_lines(components, where.components, where.summary_path, where.summary, links["components"], side)
    write_text(out_md, "\n".join(lines))

