"""Paired per-patient comparisons of the paper's claims (issue 21, point 3) and the seed noise floor (point 4).

Wan et al. (2023) make three claims with Tables 2-4: the attribute encoder helps (Table 3: 92.80 -> 93.21),
Dice and then the outlier loss help (Table 2: 93.21 -> 93.86 -> 94.36), and regnetz_040 beats the other
encoders (Table 4). Every test patient is scored by both models of a comparison, so the question is read
the way a reviewer would: per patient, B minus A, for the patient-3D Dice and the patient's slice-mean Dice
(columns ``dice_3d`` and ``dice_slice_mean`` of ``data/eval/<variant>/patients.csv``, raw predictions), with

- a paired patient-bootstrap 95 % interval of the mean difference (:func:`lggseg.evaluation.metrics.bootstrap_ci`
  on the per-patient differences, ``evaluate.bootstrap_samples`` / ``evaluate.bootstrap_seed``);
- the Wilcoxon signed-rank p (``scipy.stats.wilcoxon``, two-sided, zero differences dropped) and n patients.

Variants are matched to the paper's rows by their settings (:func:`lggseg.reporting.tables.paper_matches`),
B is the side the paper says is better, so the paper's difference is positive. A variant trained with
several seeds enters a comparison with the seed it shares with the other side (the lowest), or its first.

The noise floor: a variant with several seeds (``variants.<name>.seeds``, params.cpu.yaml's three seeds of
regnet_attr_bce_dice) is the same configuration retrained; the *seed spread* of a paired metric is the
largest difference of its patient mean between two of those seeds. A difference inside it is not a finding.

The verdict rule (:func:`verdict`), per metric: **reproduced** when the interval excludes 0 on the paper's
side, the Wilcoxon p is below 0.05 and the difference exceeds the seed spread (when one was measured);
**reversed** the same on the other side; otherwise **not resolvable at this scale**. A comparison is reproduced (reversed) only when both metrics say so; a table is reproduced
(reversed) only when every comparison the paper makes in it is, and otherwise not resolvable.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from lggseg.errors import DataError
from lggseg.evaluation.metrics import bootstrap_ci
from lggseg.reporting.paper import TABLE_TITLES, PaperRow
from lggseg.reporting.results import SCALAR_KEYS, Result
from lggseg.reporting.tables import md_table, paper_matches

PAIRED_METRICS = {"dice_3d": "patient-3D Dice", "dice_slice_mean": "slice-mean Dice"}
"""``patients.csv`` column -> its name in the tables."""

REPRODUCED, REVERSED, UNRESOLVED = "reproduced", "reversed", "not resolvable at this scale"
ALPHA = 0.05
"""The Wilcoxon p below which a difference may count (besides its interval and the seed spread)."""
PATIENT_COLUMNS = ("seed", "postprocessed", "patient_id", *PAIRED_METRICS)


def load_patients(path: str | Path, variant: str | None = None) -> pd.DataFrame:
    """The raw (not post-processed) per-patient rows of ``patients.csv``, checked: the evaluate stage's file
    of one variant, or with ``variant`` the rows of that variant in a file with a ``variant`` column (the
    ``lggseg reproduce`` folder's, :mod:`lggseg.reporting.folder`)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"patient_id": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read per-patient rows: {exc}") from None
    return check_patients(table, path, variant)


def check_patients(table: pd.DataFrame, path: str | Path, variant: str | None = None) -> pd.DataFrame:
    """:func:`load_patients` of rows already read (``path`` names them in errors)."""
    if variant is not None:
        if "variant" not in table.columns:
            raise DataError(f"{path}: no variant column, so the rows of {variant} cannot be told apart")
        table = table[table["variant"].astype(str) == variant].drop(columns="variant")
        if table.empty:
            raise DataError(f"{path}: no rows of variant {variant}")
    missing = [c for c in PATIENT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    table = table.assign(patient_id=table["patient_id"].astype(str))
    post = table["postprocessed"].astype(str).str.lower()
    if not post.isin(["true", "false"]).all():
        raise DataError(f"{path}: column postprocessed must be True/False")
    raw = table[post == "false"]
    values = raw[list(PAIRED_METRICS)].to_numpy(dtype=float)
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise DataError(f"{path}: {list(PAIRED_METRICS)} must be fractions in [0, 1]")
    if raw.duplicated(["seed", "patient_id"]).any():
        raise DataError(f"{path}: a patient appears twice for one seed")
    return raw.reset_index(drop=True)


@dataclass(frozen=True)
class PairedStat:
    """B - A per patient: n patients, mean difference, its bootstrap interval and the Wilcoxon p."""

    n: int
    mean: float
    ci: tuple[float, float]
    p: float


def wilcoxon_p(diff: Sequence[float] | np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences (zeros dropped); 1.0 when every one is 0."""
    d = np.asarray(diff, dtype=float)
    if d.size == 0:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's small-sample notes (ties, exact vs normal) are not errors here
        return float(stats.wilcoxon(d).pvalue)


def paired_stat(diff: Sequence[float] | np.ndarray, n_samples: int = 1000, seed: int = 23) -> PairedStat:
    """:class:`PairedStat` of per-patient differences (each patient one value, so patients are resampled)."""
    d = np.asarray(diff, dtype=float)
    if d.size == 0:
        return PairedStat(0, math.nan, (math.nan, math.nan), math.nan)
    lo, hi = bootstrap_ci(d, np.arange(d.size), n_samples=n_samples, seed=seed)
    return PairedStat(int(d.size), float(d.mean()), (float(lo), float(hi)), wilcoxon_p(d))


def verdict(stat: PairedStat, paper_diff: float | None, floor: float | None) -> str:
    """The rule of the module docstring for one metric. ``paper_diff`` None: no claim of the paper's, the
    answer is then ``B better`` / ``A better`` / not resolvable by the same interval-and-spread test."""
    lo, hi = stat.ci
    if stat.n < 2 or not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return UNRESOLVED
    # a percentile bootstrap of a handful of patients can exclude 0 by itself (2 patients: always, unless
    # they differ in sign); the rank test guards against that
    if not stat.p < ALPHA:
        return UNRESOLVED
    if floor is not None and abs(stat.mean) <= floor:
        return UNRESOLVED
    sign = 1.0 if lo > 0 else -1.0
    if paper_diff is None:
        return "B better" if sign > 0 else "A better"
    if paper_diff == 0:
        return UNRESOLVED
    return REPRODUCED if sign == math.copysign(1.0, paper_diff) else REVERSED


def combine(verdicts: Sequence[str]) -> str:
    """One verdict of several (both metrics of a comparison, or the paper's comparisons of a table)."""
    if verdicts and all(v == verdicts[0] for v in verdicts):
        return verdicts[0]
    return UNRESOLVED


def pair_seeds(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """The seeds a comparison uses: the lowest one both sides have, else each side's first."""
    common = sorted(set(a) & set(b))
    return (common[0], common[0]) if common else (sorted(a)[0], sorted(b)[0])


def paired_differences(a: pd.DataFrame, b: pd.DataFrame, seeds: tuple[int, int], metric: str) -> np.ndarray:
    """``b - a`` of ``metric`` for every patient both have (rows of the given seeds), in patient order."""
    left = a[a["seed"] == seeds[0]].set_index("patient_id")[metric]
    right = b[b["seed"] == seeds[1]].set_index("patient_id")[metric]
    both = left.index.intersection(right.index).sort_values()
    return (right.loc[both] - left.loc[both]).to_numpy(dtype=float)


def seed_spread(rows: pd.DataFrame, metric: str) -> float | None:
    """The largest difference of ``metric``'s patient mean between two seeds (None with one seed)."""
    means = rows.groupby("seed")[metric].mean()
    if len(means) < 2:
        return None
    return float(max(abs(x - y) for x, y in itertools.combinations(means.to_numpy(dtype=float), 2)))


@dataclass(frozen=True)
class Comparison:
    """B against A, as one of the paper's tables puts it (``paper_diff`` in Dice points, None: not the paper's)."""

    table: str
    a: Result
    b: Result
    paper_diff: float | None

    @property
    def claim(self) -> bool:
        return self.paper_diff is not None


def _first(hits: Sequence[Result]) -> Result | None:
    return hits[0] if hits else None


def comparisons(results: Sequence[Result]) -> list[Comparison]:
    """The paper's comparisons among ``results`` (paper order), and our isolated-region variant's."""
    out: list[Comparison] = []

    def add(table: str, a: tuple[PaperRow | None, Result | None], b: tuple[PaperRow | None, Result | None],
            claim: bool = True) -> None:
        (ra, va), (rb, vb) = a, b
        if va is None or vb is None or va.name == vb.name:
            return
        diff = (rb.dsc - ra.dsc) / 100 if claim and ra is not None and rb is not None else None
        out.append(Comparison(table, va, vb, diff))

    rows3 = [(row, _first(hits)) for row, hits in paper_matches("table3", results) if row is not None]
    if len(rows3) == 2:
        add("table3", rows3[0], rows3[1])
    rows2 = []
    for row, hits in paper_matches("table2", results):
        if row is not None:
            # the paper's outlier loss is the paper's mode; ours (isolated_bce) is compared separately below
            hits = sorted(hits, key=lambda r: r.run.loss.outlier_mode != "paper")
            rows2.append((row, _first(hits)))
    for a, b in itertools.pairwise(rows2):
        add("table2", a, b)
    isolated = [r for r in results if "outlier" in r.run.loss.terms and r.run.loss.outlier_mode == "isolated_bce"]
    if isolated and len(rows2) == 3:
        for other in (rows2[1], rows2[2]):
            add("table2", other, (None, isolated[0]), claim=False)
    rows4 = [(row, _first(hits)) for row, hits in paper_matches("table4", results) if row is not None]
    best = [pair for pair in rows4 if pair[0].label == "regnetz_040"]
    if best:
        for pair in rows4:
            if pair is not best[0]:
                add("table4", pair, best[0])
    return out


@dataclass(frozen=True)
class Outcome:
    comparison: Comparison
    seeds: tuple[int, int]
    stats: dict[str, PairedStat]
    verdict: str


def evaluate_comparison(c: Comparison, patients: Mapping[str, pd.DataFrame], floors: Mapping[str, float | None],
                        n_samples: int, seed: int) -> Outcome:
    seeds = pair_seeds(c.a.metrics.get("seeds") or [23], c.b.metrics.get("seeds") or [23])
    stats_ = {m: paired_stat(paired_differences(patients[c.a.name], patients[c.b.name], seeds, m), n_samples, seed)
              for m in PAIRED_METRICS}
    return Outcome(c, seeds, stats_, combine([verdict(s, c.paper_diff, floors.get(m)) for m, s in stats_.items()]))


def noise_floor(results: Sequence[Result], patients: Mapping[str, pd.DataFrame]) -> dict[str, float | None]:
    """Per paired metric, the largest seed spread over the variants with several seeds (None: none has)."""
    out: dict[str, float | None] = {}
    for metric in PAIRED_METRICS:
        spreads = [s for r in results if r.name in patients and (s := seed_spread(patients[r.name], metric)) is not None]
        out[metric] = max(spreads) if spreads else None
    return out


# --------------------------------------------------------------------------- levelling off

LEVEL_EPOCHS = 3
LEVEL_TOLERANCE = 0.01
"""A run has levelled off when its validation Dice of the last ``LEVEL_EPOCHS`` epochs lies within
``LEVEL_TOLERANCE`` (max - min): the criterion params.cpu.yaml states before its runs."""


def curve_range(curve: Sequence[float]) -> float | None:
    """max - min of the last :data:`LEVEL_EPOCHS` values (None: fewer epochs than that)."""
    if len(curve) < LEVEL_EPOCHS:
        return None
    tail = [float(x) for x in curve[-LEVEL_EPOCHS:]]
    return max(tail) - min(tail)


def run_curves(r: Result) -> list[tuple[str, list[float] | None]]:
    """``[(seed, validation Dice per epoch or None when not recorded), ...]`` of ``r``'s training runs, from
    ``provenance.training.<seed>.val_dice_by_epoch`` (empty: no training record)."""
    training = ((r.metrics.get("provenance") or {}).get("training") or {})
    out = []
    for seed, t in training.items():
        curve = t.get("val_dice_by_epoch") if isinstance(t, Mapping) else None
        out.append((str(seed), [float(x) for x in curve] if isinstance(curve, list) else None))
    return out


def levelling_line(results: Sequence[Result]) -> str:
    """Which runs (variant, seed) meet the levelling-off criterion, from ``provenance.training.*.val_dice_by_epoch``."""
    ok, short, not_ok, unknown = [], [], [], []
    for r in results:
        runs = run_curves(r)
        if not runs:
            unknown.append(f"`{r.name}`")
        for seed, curve in runs:
            run = f"`{r.name}` seed {seed}"
            if curve is None:
                unknown.append(run)
            elif (width := curve_range(curve)) is None:
                short.append(run)
            elif width <= LEVEL_TOLERANCE + 1e-9:  # 0.81 - 0.80 is 0.0100000001 in floats
                ok.append(run)
            else:
                not_ok.append(f"{run} ({width:.3f})")
    total = len(ok) + len(short) + len(not_ok) + len(unknown)
    parts = [f"{len(ok)} of {total} runs have levelled off"]
    if not_ok:
        parts.append("not levelled (range of the last epochs): " + ", ".join(not_ok))
    if short:
        parts.append(f"fewer than {LEVEL_EPOCHS} epochs: " + ", ".join(short))
    if unknown:
        parts.append("no validation curve recorded: " + ", ".join(unknown))
    return (f"Levelling-off (validation Dice of the last {LEVEL_EPOCHS} epochs within {LEVEL_TOLERANCE} of each other): "
            + "; ".join(parts) + ".")


# --------------------------------------------------------------------------- markdown


def _pp(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:+.{digits}f}"


def _stat_cells(s: PairedStat) -> list[str]:
    ci = "n/a" if not all(math.isfinite(c) for c in s.ci) else f"[{100 * s.ci[0]:+.2f}, {100 * s.ci[1]:+.2f}]"
    p = "n/a" if not math.isfinite(s.p) else f"{s.p:.3g}"
    return [_pp(s.mean), ci, p]


_UNIT_KEYS = frozenset({"hd95_px", "noise_components_per_slice"})  # shown as they are, not in %


def _noise_lines(results: Sequence[Result], floors: Mapping[str, float | None]) -> list[str]:
    multi = [r for r in results if len(r.metrics.get("seeds") or []) > 1]
    lines = ["### Noise floor: the same configuration retrained with other seeds", ""]
    if not multi:
        return [*lines, "No variant was trained with several seeds, so the seed spread is not known and the verdicts "
                "below rest on the patient intervals alone.", ""]
    for r in multi:
        seeds = [str(s) for s in r.metrics["seeds"]]
        per_seed = r.metrics.get("per_seed") or {}
        rows = []
        for key in SCALAR_KEYS:
            vals = [(per_seed.get(s) or {}).get(key) for s in seeds]
            if key in ("n_test_slices", "n_test_patients") or any(v is None for v in vals):
                continue
            scale = 1.0 if key in _UNIT_KEYS else 100.0
            std = (r.metrics.get("seed_std") or {}).get(key)
            rows.append([key, *(f"{scale * v:.2f}" for v in vals), "–" if std is None else f"{scale * std:.2f}",
                         f"{scale * (max(vals) - min(vals)):.2f}"])
        lines += [f"`{r.name}`, seeds {', '.join(seeds)} (Dice-like metrics in %, HD95 in px):", "",
                  *md_table(("metric", *(f"seed {s}" for s in seeds), "std", "max - min"), rows), ""]
    spread = ", ".join(f"{name} {_pp(floors.get(m)).lstrip('+')} points" for m, name in PAIRED_METRICS.items())
    lines += [f"Seed spread used below (largest difference of the patient mean between two seeds): {spread}.", ""]
    return lines


def _label(r: Result) -> str:
    return f"`{r.name}`"


def _missing_side(c: Comparison, usable: Mapping[str, object], absent: set[str]) -> str:
    """Why comparison ``c`` cannot be made ("" when it can): a side without results or per-patient rows."""
    none = [r.name for r in (c.b, c.a) if r.name in absent]
    if none:
        return "no results for " + ", ".join(f"`{n}`" for n in none)
    rows = [r.name for r in (c.b, c.a) if r.name not in usable]
    return "no per-patient rows for " + ", ".join(f"`{n}`" for n in rows) if rows else ""


def table_sentence(table: str, outcomes: Sequence[Outcome], not_run: Sequence[Comparison] = ()) -> str:
    """One sentence per table: the verdict of the paper's comparisons that were made, and those not made."""
    claims = [o.verdict for o in outcomes if o.comparison.claim]
    missing = [c for c in not_run if c.claim]
    short = TABLE_TITLES[table].split(" - ")[0]
    names = ", ".join(f"{_label(c.b)} vs {_label(c.a)}" for c in missing)
    if not claims:
        if missing:
            return f"**{short}: not run** (none of the paper's {len(missing)} comparisons could be made: {names})."
        return f"**{short}: not run** (the variants of its comparisons are not all in these results)."
    word = combine(claims)
    counts = ", ".join(f"{claims.count(v)} {v}" for v in (REPRODUCED, REVERSED, UNRESOLVED) if claims.count(v))
    if missing:
        total = len(claims) + len(missing)
        return (f"**{short}: partly run, {word} so far** ({counts}, of the {len(claims)} made of the {total} "
                f"comparisons the paper makes; not run: {names}).")
    return f"**{short}: {word}** ({counts}, of {len(claims)} comparison{'s' if len(claims) > 1 else ''} the paper makes)."


def paired_markdown(results: Sequence[Result], patients: Mapping[str, pd.DataFrame], *, n_samples: int = 1000,
                    seed: int = 23, absent: Sequence[Result] = ()) -> list[str]:
    """The ``Paired comparisons`` section of tables.md: noise floor, one table and one sentence per paper table.

    ``absent``: the variants of the params that have no results (their metrics may be empty): the
    comparisons are chosen among all the variants, so a comparison with one of these is listed as not run
    rather than made with another variant in its place."""
    lines = [
        "## Paired comparisons (per patient, raw predictions)",
        "",
        "For each comparison the paper makes, B minus A for every test patient both models scored: the mean "
        "difference in Dice points, its paired patient-bootstrap 95% interval "
        f"({n_samples} resamples, seed {seed}), the Wilcoxon signed-rank p and n patients, beside the paper's "
        "difference of DSC. Slice-mean Dice here is each patient's mean over its slices. Verdict per comparison: "
        "**reproduced** when for both metrics the interval excludes 0 on the paper's side, the Wilcoxon p is below "
        f"{ALPHA} and the difference exceeds the seed spread (when measured); **reversed** the same on the other side; otherwise **not resolvable at "
        "this scale**. A table is reproduced (reversed) only when all its comparisons are.",
        "",
    ]
    lines += [levelling_line(results), ""]
    usable = {r.name: r for r in results if r.name in patients}
    absent_names = {r.name for r in absent} - {r.name for r in results}
    without_rows = [r.name for r in results if r.name not in patients]
    floors = noise_floor(list(usable.values()), patients)
    lines += _noise_lines(list(usable.values()), floors)
    if without_rows:
        lines += [f"No per-patient rows for {', '.join(f'`{n}`' for n in without_rows)}: comparisons with them are left out.", ""]
    planned = [*results, *(r for r in absent if r.name in absent_names)]
    made: list[Outcome] = []
    not_made: list[tuple[Comparison, str]] = []
    for c in comparisons(planned):
        why = _missing_side(c, usable, absent_names)
        if why:
            not_made.append((c, why))
        else:
            made.append(evaluate_comparison(c, patients, floors, n_samples, seed))
    header = ("Comparison (B vs A)", "Seeds B/A", "n", "Paper Δ DSC",
              *(f"Δ {name} {part}" for name in PAIRED_METRICS.values() for part in ("", "95% CI", "Wilcoxon p")),
              "Verdict")
    header = tuple(h.replace("  ", " ").strip() for h in header)
    for table in ("table3", "table2", "table4"):
        mine = [o for o in made if o.comparison.table == table]
        skipped = [(c, why) for c, why in not_made if c.table == table]
        lines += [f"### Paired: {TABLE_TITLES[table]}", ""]
        rows = []
        for o in mine:
            c = o.comparison
            n = {s.n for s in o.stats.values()}
            rows.append([_comparison_label(c), f"{o.seeds[1]}/{o.seeds[0]}", "/".join(str(k) for k in sorted(n)),
                         _pp(c.paper_diff), *(cell for s in o.stats.values() for cell in _stat_cells(s)), o.verdict])
        for c, why in skipped:
            rows.append([_comparison_label(c), "–", "–", _pp(c.paper_diff), *["–"] * (3 * len(PAIRED_METRICS)),
                         f"not run ({why})"])
        if rows:
            lines += [*md_table(header, rows), ""]
        lines += [table_sentence(table, mine, [c for c, _ in skipped]), ""]
    return lines


def _comparison_label(c: Comparison) -> str:
    return f"{_label(c.b)} vs {_label(c.a)}" + ("" if c.claim else " (ours, no paper claim)")
