"""The report: paper Tables 2-4 beside our metrics, loud failures on bad inputs, figures written."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lggseg.config import read_params, resolve_variant
from lggseg.errors import DataError
from lggseg.reporting.paper import PAPER_TABLES
from lggseg.reporting.report import build_report, data_source, validation_curve_panels
from lggseg.reporting.results import Result, component_counts, load_components, load_metrics
from lggseg.reporting.tables import paper_matches, paper_table_markdown, provenance_lines

REPO = Path(__file__).resolve().parents[2]
PARAMS = read_params(REPO / "params.yaml")


# --------------------------------------------------------------------------- synthetic inputs


def metrics_block(dice: float = 0.9, **over) -> dict:
    """A metrics block in the layout of lggseg.evaluation.evaluate, values derived from ``dice``."""
    block = {
        "dice_slice_mean": dice,
        "iou_slice_mean": dice - 0.03,
        "dice_tumour_slices": dice - 0.05,
        "dice_patient_3d": dice - 0.02,
        "dice_micro": dice - 0.01,
        "hd95_px": 4.5,
        "hd95_n_undefined": 1,
        "empty_fp_rate": 0.04,
        "noise_components_per_slice": 0.125,
        "n_test_slices": 600,
        "n_test_patients": 15,
        "dice_slice_mean_ci95": [dice - 0.01, dice + 0.01],
        "dice_patient_3d_ci95": [dice - 0.04, dice],
    }
    block.update(over)
    return block


def metrics_file(dice: float = 0.9, seeds=(23,), std: float = 0.005, **over) -> dict:
    data = metrics_block(dice, **over)
    data["postprocessed"] = {**metrics_block(dice + 0.004, noise_components_per_slice=0.01), "min_area": 49}
    data["seeds"] = list(seeds)
    if len(seeds) > 1:
        data["seed_std"] = {k: std for k in ("dice_slice_mean", "iou_slice_mean", "dice_tumour_slices",
                                             "dice_patient_3d", "dice_micro", "hd95_px", "empty_fp_rate",
                                             "noise_components_per_slice")}
        data["postprocessed"]["seed_std"] = dict(data["seed_std"])
        data["per_seed"] = {str(s): metrics_block(dice) for s in seeds}
    return data


def write_inputs(root: Path, params: dict, dice: dict[str, float] | None = None, k: int = 3, size: int = 64,
                 fetch_source: str | None = "kaggle") -> dict[str, Path]:
    """Metrics JSONs, figure_slices.npz per variant, components.csv and data.json under ``root``."""
    dirs = {name: root / name for name in ("metrics", "eval", "manifest", "plots")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = np.array([f"TCGA_XX_{1000 + i}_20000101_{10 + i}" for i in range(k)])
    yy, xx = np.mgrid[:size, :size]
    truth = np.stack([(yy - size / 2) ** 2 + (xx - size / 2 - i) ** 2 < (size / 5 + 2 * i) ** 2 for i in range(k)])
    image = np.clip(rng.normal(70, 20, (k, size, size, 3)) + 90 * truth[..., None], 0, 255).astype(np.uint8)
    for i, name in enumerate(params["variants"]):
        d = (dice or {}).get(name, 0.85 + 0.01 * i)
        (dirs["metrics"] / f"{name}.json").write_text(json.dumps(metrics_file(d)))
        shift = np.roll(truth, i % 3, axis=2).astype(np.float32)
        prob = np.clip(0.9 * shift + 0.1 * rng.random((k, size, size)), 0, 1)
        prob[:, 5:8, 5:8] = 0.8  # a noise blob
        out = dirs["eval"] / name
        out.mkdir(exist_ok=True)
        np.savez(out / "figure_slices.npz", ids=ids, image=image, truth=truth, prob=prob.astype(np.float16))
    comps = pd.DataFrame({
        "row": [0, 0, 1, 2, 0, 0, 1, 2], "case_id": ["A"] * 8, "slice_index": [1, 1, 2, 3] * 2,
        "connectivity": [4, 4, 4, 4, 8, 8, 8, 8], "component": [1, 2, 1, 1] * 2,
        "area": [3, 48, 49, 900, 5, 48, 900, 1500], "height": [1, 6, 7, 30, 3, 8, 30, 40],
        "width": [3, 8, 7, 30, 2, 6, 30, 40],
    })
    comps.to_csv(dirs["manifest"] / "components.csv", index=False)
    (dirs["metrics"] / "data.json").write_text(json.dumps({"n_slices": 3929, "small_components": {"area_8": 1}}))
    if fetch_source is not None:
        (dirs["metrics"] / "fetch.json").write_text(json.dumps({"source": fetch_source, "n_files": 10, "sha256": "ab" * 32}))
    return dirs


def run_report(dirs: dict[str, Path], params: dict) -> str:
    out = dirs["metrics"] / "tables.md"
    build_report(params, dirs["metrics"], dirs["eval"], dirs["manifest"], out, dirs["plots"])
    return out.read_text()


def parse_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """``{section heading: rows as {header: cell}}`` for every markdown table under a ### heading."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, header = None, None
    for line in md.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("# ").strip(), None
        elif line.startswith("|") and heading:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if header is None:
                header = cells
                out[heading] = []
            elif set(cells) != {"---"}:
                out[heading].append(dict(zip(header, cells, strict=True)))
        else:
            header = None
    return out


def results_for(params: dict, metrics: dict[str, dict]) -> list[Result]:
    return [Result(n, resolve_variant(params, n), m) for n, m in metrics.items()]


def section(tables: dict, prefix: str) -> list[dict[str, str]]:
    (key,) = [k for k in tables if k.startswith(prefix)]
    return tables[key]


# --------------------------------------------------------------------------- tables

# (variant, table prefix, paper row label, paper DSC, paper IoU, our dice)
PAPER_CASES = [
    ("regnet_attr_bce", "Table 2", "BCE", 93.21, 90.70, 0.9187),
    ("regnet_attr_bce_dice", "Table 2", "BCE + Dice", 93.86, 91.27, 0.9412),
    ("regnet_attr_bce_dice_outlier", "Table 2", "BCE + Dice + Outlier", 94.36, 91.83, 0.9001),
    ("regnet_bce", "Table 3", "No attribute encoder", 92.80, 90.22, 0.9333),
    ("regnet_attr_bce", "Table 3", "Attribute encoder", 93.21, 91.02, 0.9187),
    ("resnet101_bce", "Table 4", "resnet101", 90.43, 87.80, 0.8555),
    ("swinv2_base_bce", "Table 4", "Swin Transformer v2 (swin_base)", 91.98, 89.19, 0.9),
    ("regnet_bce", "Table 4", "regnetz_040", 92.80, 90.22, 0.9333),
    ("unet_bce", "Table 4", "U-Net (Buda et al.)", 82.00, None, 0.8),
]


@pytest.mark.parametrize(("variant", "table", "row_label", "paper_dsc", "paper_iou", "ours"), PAPER_CASES)
def test_paper_rows_show_paper_number_ours_and_difference(variant, table, row_label, paper_dsc, paper_iou, ours):
    metrics = {n: metrics_file(0.85) for n in PARAMS["variants"]}
    metrics[variant] = metrics_file(ours)
    key = "table" + table.split()[-1]
    rows = section(parse_tables("\n".join(paper_table_markdown(key, results_for(PARAMS, metrics)))), table)
    (row,) = [r for r in rows if f"`{variant}`" in r["Ours (variant)"]]
    assert row["Paper row"] == row_label
    assert row["Paper DSC"] == f"{paper_dsc:.2f}"
    m = metrics[variant]
    for col, k in (("DSC slice-mean", "dice_slice_mean"), ("DSC tumour slices", "dice_tumour_slices"),
                   ("DSC patient-3D", "dice_patient_3d"), ("DSC micro", "dice_micro")):
        assert row[col] == f"{100 * m[k]:.2f} ({100 * m[k] - paper_dsc:+.2f})"
    if paper_iou is None:
        assert row["Paper IoU"] == "–"
        assert row["IoU slice-mean"] == f"{100 * m['iou_slice_mean']:.2f}"
    else:
        assert row["Paper IoU"] == f"{paper_iou:.2f}"
        assert row["IoU slice-mean"] == f"{100 * m['iou_slice_mean']:.2f} ({100 * m['iou_slice_mean'] - paper_iou:+.2f})"
    lo, hi = m["dice_slice_mean_ci95"]
    assert row["slice-mean 95% CI"] == f"[{100 * lo:.2f}, {100 * hi:.2f}]"
    lo, hi = m["dice_patient_3d_ci95"]
    assert row["patient-3D 95% CI"] == f"[{100 * lo:.2f}, {100 * hi:.2f}]"
    assert row["HD95 (px)"] == "4.5"
    assert row["Empty-slice FP (%)"] == "4.00"
    assert row["Seeds"] == "23"


def test_every_paper_row_appears_in_order_and_unrun_rows_say_so():
    metrics = {n: metrics_file(0.9) for n in ("regnet_bce", "resnet101_bce")}
    params = copy.deepcopy(PARAMS)
    params["variants"] = {n: PARAMS["variants"][n] for n in metrics}
    rows = section(parse_tables("\n".join(paper_table_markdown("table4", results_for(params, metrics)))), "Table 4")
    assert [r["Paper row"] for r in rows] == [p.label for p in PAPER_TABLES["table4"]]
    assert sum(r["Ours (variant)"] == "not run" for r in rows) == len(PAPER_TABLES["table4"]) - 2


def test_two_seeds_give_mean_plus_minus_std():
    metrics = {n: metrics_file(0.85) for n in PARAMS["variants"]}
    metrics["regnet_attr_bce_dice"] = metrics_file(0.9, seeds=(23, 24), std=0.0123)
    rows = section(parse_tables("\n".join(paper_table_markdown("table2", results_for(PARAMS, metrics)))), "Table 2")
    (row,) = [r for r in rows if "`regnet_attr_bce_dice`" in r["Ours (variant)"]]
    assert row["DSC slice-mean"] == f"90.00 ± 1.23 ({90.0 - 93.86:+.2f})"
    assert row["Noise comp./slice"] == "0.125 ± 0.012"
    assert row["Seeds"] == "23, 24"
    (single,) = [r for r in rows if "`regnet_attr_bce`" in r["Ours (variant)"]]
    assert "±" not in single["DSC slice-mean"]


@pytest.mark.parametrize(
    ("encoder", "arch", "expected"),
    [
        ("tu-tf_efficientnet_b5.ns_jft_in1k", "deeplabv3plus", "tf_efficientnet_b5"),
        ("efficientnet_b5", "deeplabv3plus", "tf_efficientnet_b5"),
        ("swinv2_base_window8_256", "deeplabv3plus", "Swin Transformer v2 (swin_base)"),
        ("regnetz_040.ra3_in1k", "deeplabv3plus", "regnetz_040"),
        ("resnet34", "unet", "U-Net (Buda et al.)"),
        ("resnet50", "deeplabv3plus", None),  # no paper row: listed after the paper's rows
    ],
)
def test_table4_rows_are_matched_by_settings_not_names(encoder, arch, expected):
    params = copy.deepcopy(PARAMS)
    params["variants"] = {"my_run": {"tables": ["table4"], "model": {"arch": arch, "encoder": encoder, "attributes": False}}}
    pairs = paper_matches("table4", results_for(params, {"my_run": metrics_file()}))
    (row,) = [row for row, hits in pairs if hits]
    assert (row.label if row else None) == expected


def test_build_report_writes_tables_figures_and_beyond(tmp_path):
    dice = {n: 0.85 for n in PARAMS["variants"]}
    dice["regnet_attr_bce_dice"] = 0.95  # best overall
    dirs = write_inputs(tmp_path, PARAMS, dice)
    md = run_report(dirs, PARAMS)
    assert "DEMO" not in md
    tables = parse_tables(md)
    beyond = section(tables, "Our variants and the paper variants they are compared with")
    assert {r["Variant"].split("`")[1] for r in beyond} == {"regnet_attr_bce_dice", "regnet_attr_bce_dice_isolated"}
    post = section(tables, "Post-processing")
    names = [r["Variant"].split("`")[1] for r in post]
    # best overall (also the best without the outlier term), then the two outlier-term variants; raw + processed each
    assert names == ["regnet_attr_bce_dice"] * 2 + ["regnet_attr_bce_dice_outlier"] * 2 + ["regnet_attr_bce_dice_isolated"] * 2
    assert "best overall" in post[0]["Variant"]
    assert post[1]["Predictions"] == "min_area = 49 px"
    assert post[1]["Δ"] == "+0.40"
    comps = section(tables, "Dataset: ground-truth")
    assert comps[0] == {"Connectivity": "4-connected", "Components": "4", "area < 49 px": "2", "bounding box <= 7 x 7": "2",
                        "bounding box < 7 x 7": "1", "slices with a component < 49 px": "1"}
    for name in ("figure7_loss_comparison", "figure8_encoders", "component_sizes", "test_dice_by_variant",
                 "validation_curves"):
        png = dirs["plots"] / f"{name}.png"
        assert 5_000 < png.stat().st_size < 1_000_000, name  # drawn, and small enough for git (cache: false)
        with Image.open(png) as img:
            assert img.format == "PNG" and min(img.size) >= 400, name
        assert f"../plots/{name}.png" in md
    assert "figure9_outlier_loss.png" in md and "not written yet" in md


def test_demo_data_is_labelled(tmp_path):
    params = copy.deepcopy(PARAMS)
    params["variants"] = {n: PARAMS["variants"][n] for n in ("regnet_attr_bce", "regnet_attr_bce_dice_outlier", "regnet_bce")}
    dirs = write_inputs(tmp_path, params, fetch_source="demo")
    md = run_report(dirs, params)
    assert md.splitlines()[2].startswith("> **DEMO / SYNTHETIC DATA.**")
    assert "Data source: **demo**" in md


@pytest.mark.parametrize(
    ("fetch_json", "params_source", "kind"),
    [
        ({"source": "demo", "n_files": 3}, "kaggle", "demo"),  # what was fetched wins over params
        ({"source": "kaggle"}, "demo", "kaggle"),
        ({"source": "local"}, "kaggle", "local"),
        (None, "demo", "demo"),  # no fetch.json: params.yaml decides
        (None, "/data/lgg.zip", "local"),
    ],
)
def test_data_source(tmp_path, fetch_json, params_source, kind):
    if fetch_json is not None:
        (tmp_path / "fetch.json").write_text(json.dumps(fetch_json))
    params = {**PARAMS, "fetch": {**PARAMS["fetch"], "source": params_source}}
    source = data_source(tmp_path, params)
    assert source.kind == kind and source.demo == (kind == "demo")
    assert ("not found" in source.detail) == (fetch_json is None)


# --------------------------------------------------------------------------- provenance


def provenance(size: int = 256, source: str = "kaggle", sha: str = "ab" * 32, hours: float = 1.0) -> dict:
    """A provenance block in the layout of lggseg.evaluation.evaluate (one seed trained on a GPU in bf16)."""
    return {
        "data": {"source": source, "fingerprint": {"n_files": 7860, "total_bytes": 1, "sha256": sha},
                 "split_unit": "patient", "n_slices": 3929, "splits": {}},
        "image_size": size,
        "seeds": {"train": [23], "split": 23, "bootstrap": 23},
        "training": {"23": {"image_size": size, "pretrained": True, "epochs": 50, "epochs_done": 50,
                            "stop_reason": "completed", "wall_seconds": hours * 3600, "device": "cuda",
                            "hardware": {"device": "cuda", "device_name": "NVIDIA H200", "precision": "bf16 autocast"},
                            "software": {"torch": "2.14.1", "timm": "1.0.31", "segmentation_models_pytorch": "0.6.0"}}},
        "evaluation": {"device": "cuda", "software": {"torch": "2.14.1"}},
        "git_commit": "1f4f4dbaed57c7fc7d32e711d8d8b6a02d485a5f",
    }


TABLE2 = ("regnet_attr_bce", "regnet_attr_bce_dice", "regnet_attr_bce_dice_outlier")


def table2_lines(provs: dict[str, dict | None]) -> list[str]:
    metrics = {n: metrics_file(0.85) for n in PARAMS["variants"]}
    for name, prov in provs.items():
        if prov is not None:
            metrics[name]["provenance"] = prov
    md = paper_table_markdown("table2", results_for(PARAMS, metrics))
    return [line for line in md if line.startswith(("Provenance:", "**Warning"))]


def test_one_provenance_line_under_a_table_of_alike_results():
    lines = table2_lines({n: provenance() for n in TABLE2})
    assert lines == [
        "Provenance: kaggle data abababababab, patient split seed 23 · 256 px · cuda (NVIDIA H200), bf16 autocast · "
        "50/50 epochs · pretrained · seed 23 · training 3.00 h in all · torch 2.14.1, timm 1.0.31, smp 0.6.0 · "
        "commit 1f4f4dbaed."
    ]


def test_mixed_image_sizes_are_named_in_a_warning():
    provs = {n: provenance() for n in TABLE2}
    provs["regnet_attr_bce_dice_outlier"] = provenance(size=64)
    line, warning = table2_lines(provs)
    assert "256 px (`regnet_attr_bce`, `regnet_attr_bce_dice`); 64 px (`regnet_attr_bce_dice_outlier`)" in line
    assert warning.startswith("**Warning: this table mixes results made on different image sizes (256 px")
    assert "data (" not in warning


def test_mixed_data_sources_are_named_in_a_warning():
    provs = {n: provenance() for n in TABLE2}
    provs["regnet_attr_bce"] = provenance(source="demo", sha="cd" * 32)
    _, warning = table2_lines(provs)
    assert "different data (demo data cdcdcdcdcdcd, patient split seed 23 (`regnet_attr_bce`); kaggle data " in warning
    assert "image sizes" not in warning


def test_results_without_provenance_are_flagged():
    provs = {n: provenance() for n in TABLE2}
    provs["regnet_attr_bce_dice"] = None
    line, warning = table2_lines(provs)
    assert line.startswith("Provenance: kaggle data")
    assert warning.startswith("**Warning: no provenance recorded for `regnet_attr_bce_dice`")
    assert table2_lines({}) == ["Provenance: not recorded (these metrics files were written before evaluation recorded it)."]


def test_a_time_budget_stop_and_a_cpu_run_show_in_the_line():
    prov = provenance(size=64)
    prov["training"]["23"].update(epochs_done=3, stop_reason="time budget: train.max_minutes=30 fits 3 of 50 epochs",
                                  pretrained=False, hardware={"device": "cpu", "device_name": "AMD EPYC",
                                                              "precision": "float32"})
    (line, _) = provenance_lines(results_for(PARAMS, {"regnet_attr_bce": {**metrics_file(0.8), "provenance": prov}}))
    assert "cpu (AMD EPYC), float32 · 3/50 epochs (time budget: train.max_minutes=30 fits 3 of 50 epochs) · random init" in line


def test_build_report_prints_provenance_under_every_table(tmp_path):
    dirs = write_inputs(tmp_path, PARAMS)
    for path in dirs["metrics"].glob("*_*.json"):
        data = json.loads(path.read_text())
        data["provenance"] = provenance(size=64 if path.stem == "unet_bce" else 256)
        path.write_text(json.dumps(data))
    md = run_report(dirs, PARAMS).splitlines()
    dataset = md.index("## Dataset: ground-truth component sizes")
    paired = md.index("## Paired comparisons (per patient, raw predictions)")
    after = next(k for k in range(paired + 1, len(md)) if md[k].startswith("## "))
    # the paired section (its tables list the comparisons not made: no per-patient rows here) has no provenance
    tables = [k for k, line in enumerate(md[:dataset]) if line.startswith("| ---") and not paired < k < after]
    assert len(tables) == 5  # Tables 2-4, variants not in the paper, post-processing
    for k in tables:
        end = next(i for i in range(k, len(md)) if not md[i].startswith("|"))
        assert md[end + 1].startswith("Provenance: "), md[k - 2]
    warnings = [line for line in md if line.startswith("**Warning: this table mixes")]
    assert len(warnings) == 1 and "64 px (`unet_bce`)" in warnings[0]  # Table 4 only


# --------------------------------------------------------------------------- loud failures


def test_a_variant_without_metrics_is_not_run_not_an_error(tmp_path):
    """A report of the variants evaluated so far (a run split over several sittings): the missing variant's
    paper row says "not run", figure 8 (which needs every Table 4 variant) is skipped in one line naming it."""
    dirs = write_inputs(tmp_path, PARAMS)
    (dirs["metrics"] / "effb5_bce.json").unlink()
    md = run_report(dirs, PARAMS)
    rows = section(parse_tables(md), "Table 4")
    (row,) = [r for r in rows if r["Paper row"] == "tf_efficientnet_b5"]
    assert row["Ours (variant)"] == "not run" and row["DSC slice-mean"] == "–"
    assert sum(r["Ours (variant)"] == "not run" for r in rows) == 1
    assert "Not run yet (variants of the params without results; their rows say so): `effb5_bce`." in md
    (fig8,) = [line for line in md.splitlines() if line.startswith("- Figure 8")]
    assert fig8.startswith("- Figure 8: not drawn (needs `unet_bce`, ") and fig8.endswith("no results for `effb5_bce`)")
    assert "![figure 7]" in md and not (dirs["plots"] / "figure8_encoders.png").exists()


def test_no_metrics_at_all_names_the_folder(tmp_path):
    dirs = write_inputs(tmp_path, PARAMS)
    for path in dirs["metrics"].glob("*_*.json"):
        path.unlink()
    with pytest.raises(DataError, match="no variant of the params has a metrics file"):
        run_report(dirs, PARAMS)
    assert not (dirs["metrics"] / "tables.md").exists()
    assert not any(dirs["plots"].iterdir())  # nothing written before every input was checked


def test_malformed_metrics_fail_before_anything_is_written(tmp_path):
    dirs = write_inputs(tmp_path, PARAMS)
    (dirs["metrics"] / "effb5_bce.json").write_text(json.dumps({"dice_slice_mean": 0.5}))
    with pytest.raises(DataError, match=r"effb5_bce\.json: missing key"):
        run_report(dirs, PARAMS)
    assert not (dirs["metrics"] / "tables.md").exists()
    assert not any(dirs["plots"].iterdir())


def test_stage_script_exits_nonzero_with_one_line_message(tmp_path):
    dirs = write_inputs(tmp_path, PARAMS)
    (dirs["metrics"] / "xception65_bce.json").write_text("{")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "report.py"), "--params", str(tmp_path / "params.yaml"),
         "--metrics", str(dirs["metrics"]), "--eval", str(dirs["eval"]), "--manifest", str(dirs["manifest"]),
         "--tables", str(dirs["metrics"] / "tables.md"), "--plots", str(dirs["plots"])],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "xception65_bce.json: not valid JSON" in proc.stderr and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def _drop(key):
    def edit(d):
        del d[key]
    return edit


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_drop("dice_micro"), r"missing key\(s\) \['dice_micro'\]"),
        (_set("dice_slice_mean", 93.2), r"dice_slice_mean = 93.2 is not a fraction"),
        (_set("iou_slice_mean", "0.9"), r"iou_slice_mean must be a finite number"),
        (_set("dice_slice_mean", None), r"dice_slice_mean must be a finite number"),
        (_set("dice_patient_3d_ci95", [0.9]), r"dice_patient_3d_ci95 must be \[lo, hi\]"),
        (_set("dice_slice_mean_ci95", [0.95, 0.9]), r"not an interval"),
        (_drop("seeds"), r"seeds must be a non-empty list"),
        (_set("seeds", [23, 24]), r"2 seeds but no 'seed_std'"),
        (lambda d: d["postprocessed"].pop("min_area"), r"postprocessed.min_area must be a number"),
        (lambda d: d["postprocessed"].pop("dice_micro"), r"missing key\(s\) \['postprocessed.dice_micro'\]"),
        (_set("noise_components_per_slice", -1.0), r"is negative"),
    ],
)
def test_malformed_metrics_are_rejected(tmp_path, edit, match):
    data = metrics_file(0.9)
    edit(data)
    path = tmp_path / "v.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=match) as info:
        load_metrics(path)
    assert str(path) in str(info.value)


def test_metrics_that_are_not_json_are_rejected(tmp_path):
    path = tmp_path / "v.json"
    path.write_text('{"dice_slice_mean": 0.9,')
    with pytest.raises(DataError, match=r"v\.json: not valid JSON"):
        load_metrics(path)


def test_nulls_allowed_where_metrics_can_be_undefined(tmp_path):
    data = metrics_file(0.9, hd95_px=None, empty_fp_rate=None, dice_patient_3d_ci95=[None, None])
    path = tmp_path / "v.json"
    path.write_text(json.dumps(data))
    assert load_metrics(path)["hd95_px"] is None


def test_mismatched_figure_slices_are_an_error(tmp_path):
    dirs = write_inputs(tmp_path, PARAMS)
    path = dirs["eval"] / "regnet_attr_bce_dice_outlier" / "figure_slices.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["ids"] = arrays["ids"][::-1]
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="slice ids"):
        run_report(dirs, PARAMS)


@pytest.mark.parametrize(("defined", "needle"), [
    # not defined in the params at all
    (("regnet_attr_bce", "regnet_bce"), "needs a variant in table2 with loss.terms [bce] and one with the outlier term"),
    # defined, but the outlier variant has no results yet: the isolated-region one does not stand in for it
    (("regnet_attr_bce", "regnet_bce", "regnet_attr_bce_dice_outlier", "regnet_attr_bce_dice_isolated"),
     "needs `regnet_attr_bce`, `regnet_attr_bce_dice_outlier`; no results for `regnet_attr_bce_dice_outlier`"),
])
def test_figure7_without_its_variants_is_one_line_not_an_error(tmp_path, defined, needle):
    params = copy.deepcopy(PARAMS)
    params["variants"] = {n: PARAMS["variants"][n] for n in defined}
    dirs = write_inputs(tmp_path, params)
    (dirs["metrics"] / "regnet_attr_bce_dice_outlier.json").unlink(missing_ok=True)
    md = run_report(dirs, params)
    (fig7,) = [line for line in md.splitlines() if line.startswith("- Figure 7")]
    assert fig7.startswith("- Figure 7: not drawn (") and needle in fig7
    assert not (dirs["plots"] / "figure7_loss_comparison.png").exists()
    assert "### Table 3" in md


# --------------------------------------------------------------------------- components


def test_component_counts_under_each_convention(tmp_path):
    pd.DataFrame({
        "row": [0, 0, 1, 2, 2], "connectivity": [4, 4, 4, 8, 8], "area": [48, 49, 10, 6, 60],
        "height": [6, 7, 10, 6, 6], "width": [8, 7, 1, 1, 10],
    }).to_csv(tmp_path / "c.csv", index=False)
    counts = component_counts(load_components(tmp_path / "c.csv"), 7)
    assert counts == {
        4: {"components": 3, "area_lt_side_sq": 2, "bbox_le_side": 1, "bbox_lt_side": 0, "slices_with_area_lt_side_sq": 2},
        8: {"components": 2, "area_lt_side_sq": 1, "bbox_le_side": 1, "bbox_lt_side": 1, "slices_with_area_lt_side_sq": 1},
    }


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ({"row": [0], "connectivity": [4], "size": [3]}, r"missing column\(s\) \['area', 'height', 'width'\]"),
        ({"row": [0], "connectivity": [6], "area": [3], "height": [1], "width": [3]}, "connectivity must be 4 or 8"),
        ({"row": [0], "connectivity": [4], "area": [0], "height": [1], "width": [3]}, "must be positive"),
    ],
)
def test_bad_component_tables_are_errors(tmp_path, frame, match):
    pd.DataFrame(frame).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match=match) as info:
        load_components(tmp_path / "c.csv")
    assert "c.csv" in str(info.value)


@pytest.mark.parametrize("name", ["data.json", "fetch.json"])
def test_malformed_side_json_fails_before_anything_is_written(tmp_path, name):
    dirs = write_inputs(tmp_path, PARAMS)
    (dirs["metrics"] / name).write_text("{not json")
    with pytest.raises(DataError, match=rf"{name}: not valid JSON"):
        run_report(dirs, PARAMS)
    assert not any(dirs["plots"].iterdir())


def test_validation_curves_are_grouped_by_paper_table():
    """A variant of two tables is drawn in both; a variant of no paper table goes to the last panel; a seed
    without a curve is left out and a variant without any adds no panel."""
    def metrics(curves):
        m = metrics_file()
        m["provenance"] = {"training": {s: ({} if c is None else {"val_dice_by_epoch": c}) for s, c in curves.items()}}
        return m

    results = results_for(PARAMS, {
        "regnet_bce": metrics({"23": [0.5, 0.6, 0.61]}),  # tables 4 and 3
        "regnet_attr_bce_dice": metrics({"23": [0.4, 0.5], "24": None}),  # tables 2 and beyond
        "regnet_attr_bce_dice_isolated": metrics({"23": [0.3, 0.35]}),  # beyond only
        "unet_bce": metrics_file(),  # no training record
    })
    panels = {title.split(":")[0]: runs for title, runs in validation_curve_panels(results).items()}
    assert panels == {
        "Table 2": [("regnet_attr_bce_dice seed 23", [0.4, 0.5])],
        "Table 3": [("regnet_bce seed 23", [0.5, 0.6, 0.61])],
        "Table 4": [("regnet_bce seed 23", [0.5, 0.6, 0.61])],
        "Beyond the paper": [("regnet_attr_bce_dice seed 23", [0.4, 0.5]),
                             ("regnet_attr_bce_dice_isolated seed 23", [0.3, 0.35])],
    }
