"""Paired per-patient comparisons (issue 21): statistics against hand computations, the verdict rule, the
comparisons the paper makes, and the section of tables.md on generated per-patient rows."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from test_report import PARAMS, metrics_file, parse_tables, results_for, run_report, write_inputs

from lggseg.errors import DataError
from lggseg.reporting.paired import (
    REPRODUCED,
    REVERSED,
    UNRESOLVED,
    PairedStat,
    combine,
    comparisons,
    curve_range,
    levelling_line,
    load_patients,
    pair_seeds,
    paired_differences,
    paired_stat,
    seed_spread,
    verdict,
    wilcoxon_p,
)
from lggseg.reporting.results import Result

# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("diffs", [[0.0, 1.0, 2.0, 7.0], [-3.0, 0.0, 1.0, 1.0]])
@pytest.mark.parametrize("seed", [5, 23])
def test_bootstrap_interval_is_the_exact_resampling_distributions(diffs, seed):
    # Direct computation: every one of the 4^4 equally likely resamples of 4 patients, its mean, and the
    # 2.5 / 97.5 percentiles of those means. Both cases put these percentiles inside a run of equal
    # means, so 20000 random resamples must land on the same values.
    exact = np.quantile([np.mean(t) for t in itertools.product(diffs, repeat=len(diffs))], [0.025, 0.975])
    s = paired_stat(diffs, n_samples=20000, seed=seed)
    assert s.ci == pytest.approx(tuple(exact))
    assert (s.n, s.mean) == (4, pytest.approx(np.mean(diffs)))


def test_bootstrap_of_equal_differences_is_that_difference_and_repeats_with_its_seed():
    assert paired_stat([0.02] * 5, n_samples=50, seed=1).ci == pytest.approx((0.02, 0.02))
    d = [0.1, -0.2, 0.05, 0.3, 0.0, -0.1]
    assert paired_stat(d, n_samples=200, seed=7) == paired_stat(d, n_samples=200, seed=7)
    assert paired_stat(d, n_samples=200, seed=7).ci != paired_stat(d, n_samples=200, seed=8).ci


@pytest.mark.parametrize(("diffs", "p"), [
    ([1, 2, 3, 4, 5], 2 / 32),          # all 5 ranks positive: 1 of 32 sign patterns each side
    ([-1, 2, 3, 4, 5], 2 * 2 / 32),     # W- = 1: patterns {} and {1}
    ([1, -2, 3, 4, 5], 2 * 3 / 32),     # W- = 2: {}, {1}, {2}
    ([0, 1, 2, 3, 4, 5], 2 / 32),       # a zero difference is dropped
    ([0, 0, 0], 1.0),                   # no difference at all
])
def test_wilcoxon_p_hand_computed(diffs, p):
    assert wilcoxon_p(diffs) == pytest.approx(p)


def test_wilcoxon_p_is_scipys_and_empty_is_nan():
    from scipy import stats

    d = [0.03, -0.01, 0.02, 0.05, -0.04, 0.06, 0.01]
    assert wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue)
    assert math.isnan(wilcoxon_p([]))
    assert paired_stat([]).n == 0


def _stat(mean, lo, hi, n=10, p=0.01):
    return PairedStat(n, mean, (lo, hi), p)


@pytest.mark.parametrize(("stat", "paper", "floor", "expected"), [
    (_stat(0.02, 0.01, 0.03), 0.005, None, REPRODUCED),        # excludes 0, paper's sign, no floor known
    (_stat(0.02, 0.01, 0.03), 0.005, 0.01, REPRODUCED),        # and above the seed spread
    (_stat(0.02, 0.01, 0.03), 0.005, 0.03, UNRESOLVED),        # inside the seed spread: not a finding
    (_stat(0.02, 0.01, 0.03), 0.005, 0.02, UNRESOLVED),        # equal to the spread is inside it
    (_stat(0.02, 0.01, 0.03), -0.005, 0.01, REVERSED),         # the other sign
    (_stat(-0.02, -0.03, -0.01), 0.108, 0.01, REVERSED),
    (_stat(-0.02, -0.03, -0.01), -0.004, None, REPRODUCED),
    (_stat(0.01, -0.01, 0.03), 0.005, None, UNRESOLVED),       # interval holds 0
    (_stat(0.01, 0.0, 0.03), 0.005, None, UNRESOLVED),         # touching 0 is holding it
    (_stat(0.02, 0.01, 0.03, n=1), 0.005, None, UNRESOLVED),   # one patient
    (_stat(0.02, math.nan, math.nan), 0.005, None, UNRESOLVED),
    (_stat(0.02, 0.01, 0.03, p=0.05), 0.005, None, UNRESOLVED),  # the rank test does not agree
    (_stat(0.02, 0.01, 0.03, p=0.049), 0.005, None, REPRODUCED),
    (_stat(-0.02, -0.03, -0.01, p=0.5), 0.005, None, UNRESOLVED),
    (_stat(0.02, 0.01, 0.03), None, None, "B better"),         # no claim of the paper's
    (_stat(-0.02, -0.03, -0.01), None, 0.01, "A better"),
    (_stat(-0.02, -0.03, -0.01), None, 0.05, UNRESOLVED),
])
def test_verdict_rule(stat, paper, floor, expected):
    assert verdict(stat, paper, floor) == expected


@pytest.mark.parametrize(("verdicts", "expected"), [
    ([REPRODUCED, REPRODUCED], REPRODUCED),
    ([REVERSED, REVERSED, REVERSED], REVERSED),
    ([REPRODUCED, UNRESOLVED], UNRESOLVED),
    ([REPRODUCED, REVERSED], UNRESOLVED),
    ([], UNRESOLVED),
])
def test_combine(verdicts, expected):
    assert combine(verdicts) == expected


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([23], [23], (23, 23)),
    ([23], [23, 24, 25], (23, 23)),
    ([24, 25], [25, 24, 1], (24, 24)),
    ([1], [2, 3], (1, 2)),
])
def test_pair_seeds(a, b, expected):
    assert pair_seeds(a, b) == expected


def _rows(seed, values, metric="dice_3d", patients=None):
    patients = patients or [f"P{i}" for i in range(len(values))]
    return pd.DataFrame({"seed": seed, "postprocessed": False, "patient_id": patients, metric: values})


def test_paired_differences_align_patients_and_pick_seeds():
    a = pd.concat([_rows(23, [0.5, 0.6, 0.7], patients=["P2", "P0", "P1"]), _rows(24, [0.0, 0.0, 0.0])])
    b = _rows(23, [0.9, 0.8, 0.75, 0.1], patients=["P0", "P1", "P2", "P9"])  # P9 only in b: dropped
    assert paired_differences(a, b, (23, 23), "dice_3d") == pytest.approx([0.9 - 0.6, 0.8 - 0.7, 0.75 - 0.5])
    assert paired_differences(a, b, (24, 23), "dice_3d") == pytest.approx([0.9, 0.8, 0.75])


def test_seed_spread_is_the_largest_difference_of_patient_means():
    rows = pd.concat([_rows(23, [0.8, 0.6]), _rows(24, [0.7, 0.6]), _rows(25, [0.9, 0.8])])
    # patient means 0.70, 0.65, 0.85: the pairs differ by 0.05, 0.15, 0.20
    assert seed_spread(rows, "dice_3d") == pytest.approx(0.20)
    assert seed_spread(_rows(23, [0.8, 0.6]), "dice_3d") is None


def test_load_patients_keeps_raw_rows_and_checks(tmp_path):
    path = tmp_path / "patients.csv"
    rows = pd.DataFrame({"seed": [23, 23], "postprocessed": [False, True], "patient_id": ["TCGA_A", "TCGA_A"],
                         "dice_3d": [0.7, 0.8], "dice_slice_mean": [0.9, 0.95]})
    rows.to_csv(path, index=False)
    got = load_patients(path)
    assert got[["patient_id", "dice_3d"]].values.tolist() == [["TCGA_A", 0.7]]
    rows.drop(columns="dice_3d").to_csv(path, index=False)
    with pytest.raises(DataError, match="dice_3d"):
        load_patients(path)
    rows.assign(dice_3d=[1.5, 0.8]).to_csv(path, index=False)
    with pytest.raises(DataError, match="fractions"):
        load_patients(path)


@pytest.mark.parametrize(("curve", "expected"), [
    ([0.5, 0.80, 0.805, 0.81], 0.01),   # the last three within 0.01: levelled (the rule is <=)
    ([0.80, 0.81, 0.79], 0.02),
    ([0.7, 0.8], None),                  # too short to tell
])
def test_curve_range(curve, expected):
    got = curve_range(curve)
    assert got == (None if expected is None else pytest.approx(expected))


def test_levelling_line_names_each_run():
    def result(name, curves):
        m = metrics_file()
        m["provenance"] = {"training": {s: ({} if c is None else {"val_dice_by_epoch": c}) for s, c in curves.items()}}
        return results_for(PARAMS, {name: m})[0]

    line = levelling_line([result("regnet_bce", {"23": [0.5, 0.8, 0.805, 0.81]}),
                           result("regnet_attr_bce_dice", {"23": [0.6, 0.7, 0.8], "24": [0.7, 0.8], "25": None}),
                           Result("unet_bce", results_for(PARAMS, {"unet_bce": metrics_file()})[0].run, metrics_file())])
    assert line.startswith("Levelling-off (validation Dice of the last 3 epochs within 0.01 of each other): "
                           "1 of 5 runs have levelled off; ")
    assert "not levelled (range of the last epochs): `regnet_attr_bce_dice` seed 23 (0.200)" in line
    assert "fewer than 3 epochs: `regnet_attr_bce_dice` seed 24" in line
    assert "no validation curve recorded: `regnet_attr_bce_dice` seed 25, `unet_bce`." in line


# --------------------------------------------------------------------------- the paper's comparisons


def test_the_paper_comparisons_of_params_yaml():
    results = results_for(PARAMS, {n: metrics_file() for n in PARAMS["variants"]})
    got = [(c.table, c.a.name, c.b.name, None if c.paper_diff is None else round(100 * c.paper_diff, 2))
           for c in comparisons(results)]
    assert got == [
        ("table3", "regnet_bce", "regnet_attr_bce", 0.41),
        ("table2", "regnet_attr_bce", "regnet_attr_bce_dice", 0.65),
        ("table2", "regnet_attr_bce_dice", "regnet_attr_bce_dice_outlier", 0.50),
        ("table2", "regnet_attr_bce_dice", "regnet_attr_bce_dice_isolated", None),
        ("table2", "regnet_attr_bce_dice_outlier", "regnet_attr_bce_dice_isolated", None),
        ("table4", "unet_bce", "regnet_bce", 10.80),
        ("table4", "resnet101_bce", "regnet_bce", 2.37),
        ("table4", "effb5_bce", "regnet_bce", 1.80),
        ("table4", "xception65_bce", "regnet_bce", 1.15),
        ("table4", "repvgg_b2_bce", "regnet_bce", 0.93),
        ("table4", "effv2m_bce", "regnet_bce", 0.87),
        ("table4", "swinv2_base_bce", "regnet_bce", 0.82),
    ]


# --------------------------------------------------------------------------- the report section


N_PATIENTS = 14


def _patients_csv(path, seed_means: dict[int, float], base, rng) -> None:
    """patients.csv rows: per seed, the patients' own effect ``base`` around the given mean, plus a little noise."""
    frames = []
    for seed, mean in seed_means.items():
        d3 = np.clip(mean + base + rng.normal(0, 0.002, N_PATIENTS), 0, 1)
        for post in (False, True):
            frames.append(pd.DataFrame({"seed": seed, "postprocessed": post,
                                        "patient_id": [f"TCGA_P{i:02d}" for i in range(N_PATIENTS)],
                                        "n_slices": 20, "dice_slice_mean": np.clip(d3 + 0.1, 0, 1), "dice_3d": d3}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_csv(path, index=False)


def test_report_has_paired_comparisons_noise_floor_and_verdicts(tmp_path):
    params = json.loads(json.dumps(PARAMS))
    params["variants"]["regnet_attr_bce_dice"]["seeds"] = [23, 24, 25]
    dirs = write_inputs(tmp_path, params)
    three = metrics_file(0.88, seeds=(23, 24, 25))
    three["per_seed"]["24"]["dice_slice_mean"] = 0.89
    (dirs["metrics"] / "regnet_attr_bce_dice.json").write_text(json.dumps(three))
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, N_PATIENTS)  # how hard each patient is, the same for every model
    # Table 3 clearly reproduced (+0.10); Table 2's steps inside the seed spread (0.01); Table 4: regnet worse
    # than every other encoder by 0.10 (reversed)
    means = {"regnet_bce": 0.60, "regnet_attr_bce": 0.70, "regnet_attr_bce_dice_outlier": 0.705,
             "regnet_attr_bce_dice_isolated": 0.70}
    for name in params["variants"]:
        seeds = {23: 0.70, 24: 0.71, 25: 0.70} if name == "regnet_attr_bce_dice" else {23: means.get(name, 0.70)}
        _patients_csv(dirs["eval"] / name / "patients.csv", seeds, base, rng)
    md = run_report(dirs, params)
    tables = parse_tables(md)

    t3 = tables["Paired: Table 3 - attribute encoder ablation (DeepLabv3+ / regnetz_040, BCE)"]
    assert [r["Comparison (B vs A)"] for r in t3] == ["`regnet_attr_bce` vs `regnet_bce`"]
    assert (t3[0]["n"], t3[0]["Paper Δ DSC"], t3[0]["Verdict"]) == (str(N_PATIENTS), "+0.41", REPRODUCED)
    assert float(t3[0]["Δ patient-3D Dice"]) == pytest.approx(10.0, abs=0.5)
    assert float(t3[0]["Δ patient-3D Dice Wilcoxon p"]) < 0.01
    assert "**Table 3: reproduced** (1 reproduced, of 1 comparison the paper makes)." in md

    t2 = {r["Comparison (B vs A)"]: r for r in tables[next(k for k in tables if k.startswith("Paired: Table 2"))]}
    dice_step = t2["`regnet_attr_bce_dice` vs `regnet_attr_bce`"]
    assert (dice_step["Seeds B/A"], dice_step["Verdict"]) == ("23/23", UNRESOLVED)
    assert t2["`regnet_attr_bce_dice_isolated` vs `regnet_attr_bce_dice` (ours, no paper claim)"]["Paper Δ DSC"] == "–"
    assert "**Table 2: not resolvable at this scale** (2 not resolvable at this scale, of 2 comparisons" in md

    t4 = tables[next(k for k in tables if k.startswith("Paired: Table 4"))]
    assert len(t4) == 7 and {r["Verdict"] for r in t4} == {REVERSED}
    assert "**Table 4: reversed** (7 reversed, of 7 comparisons the paper makes)." in md

    noise = tables["Noise floor: the same configuration retrained with other seeds"]
    assert (noise[0]["metric"], noise[0]["seed 24"], noise[0]["std"], noise[0]["max - min"]) == \
        ("dice_slice_mean", "89.00", "0.50", "1.00")
    spread = re.search(r"between two seeds\): patient-3D Dice ([0-9.]+) points", md)
    assert float(spread.group(1)) == pytest.approx(1.0, abs=0.1)  # seeds 23 and 24 differ by 1 point


def test_report_without_per_patient_rows_says_so(tmp_path):
    dirs = write_inputs(tmp_path, PARAMS)
    md = run_report(dirs, PARAMS)
    assert "No per-patient rows for `unet_bce`" in md
    assert "**Table 3: not run**" in md


def test_load_patients_of_one_variant_in_a_shared_file(tmp_path):
    """The ``lggseg reproduce`` folder keeps every variant's rows in one patients.csv with a variant column."""
    path = tmp_path / "patients.csv"
    rows = pd.DataFrame({"variant": ["a", "a", "b"], "seed": [23, 23, 23], "postprocessed": [False, True, False],
                         "patient_id": ["TCGA_A", "TCGA_A", "TCGA_A"], "dice_3d": [0.7, 0.8, 0.1],
                         "dice_slice_mean": [0.9, 0.95, 0.2]})
    rows.to_csv(path, index=False)
    assert load_patients(path, "b")[["patient_id", "dice_3d"]].values.tolist() == [["TCGA_A", 0.1]]
    assert "variant" not in load_patients(path, "a").columns
    with pytest.raises(DataError, match="no rows of variant c"):
        load_patients(path, "c")
    with pytest.raises(DataError, match="a patient appears twice"):
        load_patients(path)  # both variants' rows read as one variant's
    rows.drop(columns="variant").to_csv(path, index=False)
    with pytest.raises(DataError, match="no variant column"):
        load_patients(path, "a")


def test_a_subset_of_the_variants_makes_the_comparisons_it_can_and_lists_the_others(tmp_path):
    """Table 2 with its BCE + Dice + outlier variant not run yet: the Dice step is compared, the outlier step
    is listed as not run (the isolated-region variant does not stand in for it), the table is partly run."""
    params = json.loads(json.dumps(PARAMS))
    dirs = write_inputs(tmp_path, params)
    gone = ["regnet_attr_bce_dice_outlier", "unet_bce"]
    for name in gone:
        (dirs["metrics"] / f"{name}.json").unlink()
    rng = np.random.default_rng(1)
    base = rng.normal(0, 0.05, N_PATIENTS)
    for name in params["variants"]:
        if name not in gone:
            _patients_csv(dirs["eval"] / name / "patients.csv", {23: 0.75 if name == "regnet_attr_bce_dice" else 0.65},
                          base, rng)
    md = run_report(dirs, params)
    tables = parse_tables(md)
    t2 = {r["Comparison (B vs A)"]: r for r in tables[next(k for k in tables if k.startswith("Paired: Table 2"))]}
    assert t2["`regnet_attr_bce_dice` vs `regnet_attr_bce`"]["Verdict"] == REPRODUCED  # +0.10 on every patient
    assert t2["`regnet_attr_bce_dice_outlier` vs `regnet_attr_bce_dice`"]["Verdict"] == \
        "not run (no results for `regnet_attr_bce_dice_outlier`)"
    assert t2["`regnet_attr_bce_dice_outlier` vs `regnet_attr_bce_dice`"]["Δ patient-3D Dice"] == "–"
    ours = t2["`regnet_attr_bce_dice_isolated` vs `regnet_attr_bce_dice` (ours, no paper claim)"]
    assert ours["Verdict"] == "A better" and ours["n"] == str(N_PATIENTS)
    assert "**Table 2: partly run, reproduced so far** (1 reproduced, of the 1 made of the 2 comparisons the paper " \
           "makes; not run: `regnet_attr_bce_dice_outlier` vs `regnet_attr_bce_dice`)." in md
    t4 = {r["Comparison (B vs A)"]: r["Verdict"] for r in tables[next(k for k in tables if k.startswith("Paired: Table 4"))]}
    assert t4["`regnet_bce` vs `unet_bce`"] == "not run (no results for `unet_bce`)"
    assert sum(v.startswith("not run") for v in t4.values()) == 1 and len(t4) == 7
    assert "**Table 4: partly run, " in md and "**Table 3: " in md and "**Table 3: partly" not in md
