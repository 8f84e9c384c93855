"""``lggseg report FOLDER [FOLDER ...]``: one ``tables.md`` (Tables 2-4, the paired per-patient comparisons)
and the figures from one or several results folders, their variants merged.

Issue #21 lets the CPU-scale Tables 2-4 be trained over several sittings, a few variants at a time, with
one commit's code and one recipe; each sitting's results land in a folder of their own: a ``lggseg
reproduce`` folder (:mod:`lggseg.reporting.folder`) or a snapshot of a DVC workspace
(:mod:`lggseg.reporting.snapshot`), both read by :func:`lggseg.reporting.folder.read_folder`. This
command puts them back together, and refuses (one line, exit status 2, :class:`MergeError`) when

- a variant is in two folders (which of the two would the table show?), or
- two folders' variants were trained with different recipes: every setting a variant does not set itself
  (:func:`recipe`: image size, epochs, schedule, augmentation, sampling, loss settings its terms read,
  inference, split, post-processing) and the data fingerprint must agree, since a paper table compares
  variants trained alike (settings of how a run is executed, such as threads or checkpoints, aside:
  :data:`EXECUTION_KEYS`).

The merged ``tables.md`` says which folder (and project commit) each variant came from; a paper row whose
variant is in none of the folders reads "not run"; Figures 7 and 8 are drawn only when every variant they
need has results and figure slices, else one line says what they need. A reproduce folder keeps whole
figure slices; a snapshot keeps only the model's half (:mod:`lggseg.reporting.figure_predictions`), so its
figures need ``--manifest DIR``: a manifest folder (``data/manifest`` of a workspace) built from the same
data, whose images and ground truth are looked up by slice id (a different data fingerprint is refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lggseg.config import load_section, resolve_variant, unused_loss_fields
from lggseg.data.store import Store, load_store
from lggseg.errors import DataError, LggsegError
from lggseg.reporting.figure_predictions import (
    check_same_data,
    figure_slices_from_store,
    has_figure_predictions,
    read_figure_predictions,
)
from lggseg.reporting.folder import load_folder_figures, read_folder
from lggseg.reporting.paired import check_patients
from lggseg.reporting.report import (
    DataSource,
    ReportSources,
    data_source,
    figure7_variants,
    figure8_variants,
    write_report,
)
from lggseg.reporting.results import Result, check_metrics, data_sha, load_components
from lggseg.reporting.tables import md_table


class MergeError(LggsegError):
    """The folders cannot make one report: a variant in two of them, or two recipes."""


EXECUTION_KEYS = frozenset({
    "variant", "label", "tables", "common.device", "train.num_workers", "train.cpu_threads", "train.log_every",
    "train.checkpoint_every", "train.data_path", "train.compile", "train.channels_last", "evaluate.batch_size",
})
"""Settings of how a run was executed, not of what was trained: they may differ between sittings."""

RECIPE_SECTIONS = ("manifest", "postprocess", "evaluate")
"""Global sections that are part of the recipe besides the variant's own resolved ``common``/``model``/
``loss``/``train``/``seeds`` (``fetch`` is where the data was, the fingerprint says what it was)."""


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, tuple):
        obj = list(obj)
    return {prefix.rstrip("."): obj}


def recipe(params: Mapping[str, Any], variant: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``variant`` trained and was evaluated with, except those it sets itself
    (``variants.<variant>``), the loss settings no term of its loss reads and :data:`EXECUTION_KEYS`; plus
    ``data.fingerprint`` (sha256 of the raw data, from the metrics' provenance, when recorded). Dotted keys."""
    run = resolve_variant(params, variant)
    flat = _flatten(run.to_dict())
    for section in RECIPE_SECTIONS:
        flat.update(_flatten({section: dataclasses.asdict(load_section(section, params))}))
    sha = data_sha(metrics)
    if sha:  # not recorded (metrics older than provenance) is unknown, not different; tables.md flags it
        flat["data.fingerprint"] = sha
    own = set(_flatten((params.get("variants") or {}).get(variant) or {}))
    skip = own | EXECUTION_KEYS | {f"loss.{f}" for f in unused_loss_fields(run)}
    return {k: v for k, v in flat.items() if k not in skip}


@dataclass(frozen=True)
class Source:
    """One folder's part of the merged report."""

    folder: Path
    layout: str  # reproduce | snapshot
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    patients: pd.DataFrame | None
    commit: str | None
    files: dict[str, Path | None]
    environment: dict[str, Any] | None


def read_source(folder: str | Path) -> Source:
    folder = Path(folder)
    content = read_folder(folder)
    if content["params"] is None:
        raise DataError(f"{folder}: no params.yaml (not a results folder of lggseg reproduce or a snapshot)")
    metrics = content["metrics"] or {}
    where = "metrics.json" if content["layout"] == "reproduce" else "metrics/"
    known = content["params"].get("variants") or {}
    stray = [v for v in metrics if v not in known]
    if stray:
        raise DataError(f"{folder}: {where} has variant(s) {stray} that its params.yaml does not define")
    return Source(folder, content["layout"], content["params"], dict(metrics), content["patients"], content["commit"],
                  content["files"], content["environment"])


def check_disjoint(sources: Sequence[Source]) -> None:
    """Each variant in one folder only."""
    seen: dict[str, Path] = {}
    for src in sources:
        for v in src.metrics:
            if v in seen:
                raise MergeError(f"variant {v} is in both {seen[v]} and {src.folder}: a table shows one result per "
                                 "variant, so leave one of the folders out")
            seen[v] = src.folder


def check_one_recipe(sources: Sequence[Source]) -> None:
    """Every variant of one folder against every variant of another: their :func:`recipe` agree on the keys
    neither sets itself."""
    recipes = [(src, v, recipe(src.params, v, m)) for src in sources for v, m in src.metrics.items()]
    for (sa, va, ra), (sb, vb, rb) in itertools.combinations(recipes, 2):
        if sa is sb:
            continue
        diff = [k for k in sorted(ra.keys() & rb.keys()) if ra[k] != rb[k]]
        if diff:
            shown = "; ".join(f"{k} {ra[k]!r} vs {rb[k]!r}" for k in diff[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            raise MergeError(f"{sa.folder} ({va}) and {sb.folder} ({vb}) were trained with different recipes: "
                             f"{shown}{more}; a table needs one recipe")


def _results(sources: Sequence[Source]) -> tuple[list[Result], list[Result], dict[str, Source]]:
    """The variants with results (folder order), the params' variants without (from the first folder that
    defines each) and each result's folder."""
    results, origin = [], {}
    for src in sources:
        for v, m in src.metrics.items():
            name = f"{src.folder / ('metrics.json' if src.layout == 'reproduce' else 'metrics')}[{v}]"
            results.append(Result(v, resolve_variant(src.params, v), check_metrics(m, name)))
            origin[v] = src
    absent: dict[str, Result] = {}
    for src in sources:
        for v in src.params.get("variants") or {}:
            if v not in origin and v not in absent:
                absent[v] = Result(v, resolve_variant(src.params, v), {})
    return results, list(absent.values()), origin


def _patients(sources: Sequence[Source], results: Sequence[Result]) -> dict[str, pd.DataFrame]:
    out = {}
    for src in sources:
        rows = src.patients
        if rows is None:
            continue
        where = src.folder / ("patients.csv" if src.layout == "reproduce" else "rows/<variant>/patients.csv")
        for r in results:
            if r.name in src.metrics and (rows["variant"].astype(str) == r.name).any():
                out[r.name] = check_patients(rows, where, r.name)
    return out


def _data_source(src: Source) -> DataSource:
    if src.layout == "snapshot":
        return data_source(src.folder, src.params)  # its fetch.json, else its params
    data = (src.environment or {}).get("data") or {}
    fp = (data.get("fingerprint") or {}).get("sha256")
    return DataSource(str(data.get("source") or "unknown"),
                      f"`{(src.folder / 'environment.json').as_posix()}`: raw={data.get('raw')}, "
                      f"fingerprint={fp[:12] + '...' if fp else None}")


def _merged_source(sources: Sequence[Source]) -> DataSource:
    each = [_data_source(s) for s in sources]
    if len(each) == 1:
        return each[0]
    kinds = {d.kind for d in each}
    # one demo folder makes the whole report a demo one: its numbers must not pass for real ones
    kind = "demo" if "demo" in kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    return DataSource(kind, "; ".join(f"{s.folder.as_posix()}: {d.detail}" for s, d in zip(sources, each, strict=True)))


def _summary(sources: Sequence[Source]) -> tuple[Path, Any]:
    """The dataset summary of the first folder that has one (the recipe check made the data the same)."""
    for src in sources:
        if (path := src.files.get("data")) is not None:
            try:
                return path, json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: not valid JSON: {exc}") from None
        summary = ((src.environment or {}).get("data") or {}).get("summary")
        if summary is not None:
            return src.folder / "environment.json", summary
    return sources[0].folder / "data.json", None


def origin_lines(results: Sequence[Result], origin: Mapping[str, Source]) -> list[str]:
    """Where each variant's results came from (tables.md, under the header)."""
    rows = [[f"`{r.name}`", f"`{origin[r.name].folder.as_posix()}`", origin[r.name].layout,
             (origin[r.name].commit or "not recorded")[:10]] for r in results]
    lines = ["## Where the results come from", "", *md_table(("Variant", "Folder", "Kind", "Project commit"), rows), ""]
    folders = list(dict.fromkeys(s.folder for s in origin.values()))
    if len(folders) > 1:
        lines += [f"Merged by `lggseg report` from {len(folders)} folders; their variants were trained with one recipe "
                  "(every setting a variant does not set itself, and the data fingerprint, checked to agree).", ""]
    commits = {s.commit for s in origin.values()}
    if len(commits) > 1:
        lines += [f"**Warning: these results come from different project commits "
                  f"({', '.join(sorted((c or 'not recorded')[:10] for c in commits))}).**", ""]
    return lines


def _figures(sources: Sequence[Source], results: Sequence[Result], absent: Sequence[Result], store: Store | None
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], Path]:
    """The figure slices of the folders (a snapshot's completed from ``store``), Figures 7-8's variants or
    why they are not drawn."""
    slices: dict[str, Any] = {}
    need_manifest: set[str] = set()
    where = None
    for src in sources:
        if src.layout == "snapshot":
            for v in src.metrics:
                folder = src.folder / "rows" / v
                if not has_figure_predictions(folder):
                    continue
                if store is None:
                    need_manifest.add(v)
                    continue
                check_same_data(store.meta, store.root, src.metrics[v], src.folder / "metrics" / f"{v}.json")
                slices[v] = figure_slices_from_store(read_figure_predictions(folder), store, folder)
                where = where or folder
        elif src.files.get("figures") is not None:
            slices.update(load_folder_figures(src.files["figures"], list(src.metrics)))
            where = where or src.files["figures"]
    figs: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for key, pick in (("figure7", figure7_variants), ("figure8", figure8_variants)):
        figs[key], missing[key] = pick(results, absent)
        if figs[key] is not None and (lacking := [r.name for r in figs[key] if r.name not in slices]):
            figs[key] = None
            named = ", ".join(f"`{n}`" for n in lacking)
            if set(lacking) <= need_manifest:
                missing[key] = (f"the snapshots keep the predictions of {named} but not the data: give --manifest DIR, "
                                "a manifest folder built from the same data, to draw it")
            else:
                missing[key] = (f"no figure slices for {named} (a `lggseg reproduce` folder keeps them; a snapshot "
                                "keeps figure predictions since `python -m lggseg.reporting.snapshot "
                                "--add-side-files` existed)")
    return slices, figs, missing, where or sources[0].folder / "figure_slices.npz"


def build_report_from_folders(folders: Sequence[str | Path], tables: str | Path | None = None,
                              plots: str | Path | None = None, manifest: str | Path | None = None) -> Path:
    """``tables.md`` and the figures of the variants of ``folders`` together (see the module doc); returns
    the tables' path. ``tables`` defaults to ``FOLDER/tables.md`` with one folder and is required with
    several; the figures go to ``plots/`` beside it unless ``plots`` says otherwise. ``manifest``: a
    manifest folder of the same data, for the images of the snapshots' figures."""
    if not folders:
        raise MergeError("name at least one folder")
    if len(folders) > 1 and tables is None:
        raise MergeError("several folders: give --tables (where the merged tables.md goes)")
    sources = [read_source(f) for f in folders]
    store = load_store(manifest) if manifest is not None else None
    if not any(s.metrics for s in sources):
        raise DataError(f"{', '.join(str(f) for f in folders)}: no variant's metrics yet (a reproduce folder has them "
                        "once a variant has finished)")
    check_disjoint(sources)
    check_one_recipe(sources)
    results, absent, origin = _results(sources)
    first = sources[0].folder
    tables = Path(tables) if tables is not None else first / "tables.md"
    plots = Path(plots) if plots is not None else tables.parent / "plots"
    comp_path = next((s.files["components"] for s in sources if s.files.get("components") is not None), None)
    components = load_components(comp_path) if comp_path is not None else None
    slices, figs, missing, fig_path = _figures(sources, results, absent, store)
    summary_path, summary = _summary(sources)
    where = ReportSources(fig_path, comp_path or first / "components.csv", summary_path, summary, figure9=False)
    # the recipe check made the evaluation settings (threshold, bootstrap, noise side) the same in every folder
    write_report(sources[0].params, results, _merged_source(sources), components, slices, tables, plots, where=where,
                 fig7=figs["figure7"], fig8=figs["figure8"], missing=missing,
                 patients=_patients(sources, results), absent=absent, origin=origin_lines(results, origin))
    return tables


def main(argv: list[str] | None = None, prog: str = "lggseg report") -> int:
    """``lggseg report FOLDER [FOLDER ...]`` (:func:`build_report_from_folders`); the pipeline's own report is
    the ``report`` stage."""
    ap = argparse.ArgumentParser(
        prog=prog, description="Paper Tables 2-4, the paired comparisons and the figures of `lggseg reproduce` "
        "folders and result snapshots, one or several merged (same recipe, each variant in one folder).")
    ap.add_argument("folders", type=Path, nargs="+", metavar="FOLDER",
                    help="a folder lggseg reproduce wrote, or a snapshot (results/<name>/); several are merged")
    ap.add_argument("--tables", type=Path,
                    help="markdown to write (default with one folder: FOLDER/tables.md; required with several)")
    ap.add_argument("--plots", type=Path, help="folder for the figures (default: plots/ beside the tables)")
    ap.add_argument("--manifest", type=Path, metavar="DIR",
                    help="a manifest folder of the same data (a workspace's data/manifest): the images and ground "
                         "truth of the snapshots' Figures 7-8, which keep only the predictions")
    args = ap.parse_args(argv)
    try:
        path = build_report_from_folders(args.folders, args.tables, args.plots, args.manifest)
    except LggsegError as exc:
        print(f"report: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
