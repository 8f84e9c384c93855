"""``lggseg report FOLDER [FOLDER ...]``: snapshots and ``lggseg reproduce`` folders read alike and merged
into one tables.md; a variant in two folders or two recipes refused in one line (exit 2)."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_report import PARAMS, metrics_file, parse_tables

from lggseg.data.store import load_store
from lggseg.errors import DataError
from lggseg.reporting.folder import FolderWriter, read_folder
from lggseg.reporting.merge import EXECUTION_KEYS, build_report_from_folders, main, recipe
from lggseg.reporting.paired import REPRODUCED
from lggseg.reporting.snapshot import add_side_files, stamp_project, write_snapshot
from lggseg.reporting.snapshot import main as snapshot_main

REPO = Path(__file__).resolve().parents[2]
N = 12  # test patients
SHA = "cd" * 32
TABLE3 = ["regnet_bce", "regnet_attr_bce"]
TABLE2 = ["regnet_attr_bce_dice", "regnet_attr_bce_dice_outlier", "regnet_attr_bce_dice_isolated"]
# each variant's patient-3D Dice around which its patients lie (every patient the same offset): Table 3
# +0.10, the Dice step (across the two folders) +0.05
MEANS = {"regnet_bce": 0.55, "regnet_attr_bce": 0.65, "regnet_attr_bce_dice": 0.70, "regnet_attr_bce_dice_outlier": 0.70,
         "regnet_attr_bce_dice_isolated": 0.70}


def _metrics(name: str, sha: str = SHA) -> dict:
    m = metrics_file(MEANS.get(name, 0.6))
    m["provenance"] = {"data": {"source": "local", "fingerprint": {"sha256": sha}}, "image_size": 256,
                       "git_commit": "ab" * 20}
    return m


def _patients(name: str) -> pd.DataFrame:
    base = np.linspace(-0.05, 0.05, N)  # how hard each patient is, the same for every model
    d3 = MEANS.get(name, 0.6) + base
    return pd.DataFrame({"seed": 23, "postprocessed": [False] * N + [True] * N,
                         "patient_id": [f"TCGA_P{i:02d}" for i in range(N)] * 2, "n_slices": 20,
                         "dice_slice_mean": np.r_[d3, d3] + 0.1, "dice_3d": np.r_[d3, d3]})


def eval_figures(ws: Path, variants: list[str], store_dir: Path) -> None:
    """What the evaluate stage and the manifest stage leave in workspace ``ws`` for the figures: per variant
    ``figure_slices.npz`` of two test slices of ``store_dir``, and the store's ``components.csv`` and
    ``store.json``."""
    store = load_store(store_dir)
    rows = store.indices("test")[:2]
    truth = np.stack([np.asarray(store.masks[r]) > 0 for r in rows])
    for v in variants:
        (ws / "data" / "eval" / v).mkdir(parents=True, exist_ok=True)
        np.savez(ws / "data" / "eval" / v / "figure_slices.npz",
                 ids=np.array([f"{store.table.at[r, 'case_id']}_{int(store.table.at[r, 'slice_index'])}" for r in rows]),
                 rows=rows, image=np.stack([np.asarray(store.images[r]) for r in rows]), truth=truth,
                 prob=np.where(truth, 0.9, 0.05).astype(np.float16), threshold=np.float32(0.5),
                 prob_seed=np.int64(23), min_area=np.int64(49), selection=np.array("quantile"))
    (ws / "data" / "manifest").mkdir(parents=True, exist_ok=True)
    for name in ("components.csv", "store.json"):
        shutil.copyfile(store_dir / name, ws / "data" / "manifest" / name)


def make_snapshot(root: Path, variants: list[str], params: dict | None = None, sha: str = SHA,
                  store_dir: Path | None = None) -> Path:
    """A DVC-style workspace with ``variants`` evaluated, copied out by :func:`write_snapshot`; with
    ``store_dir``, their figure slices and the component table of that store too."""
    ws = root / "ws"
    (ws / "metrics").mkdir(parents=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params or PARAMS))
    (ws / "metrics" / "fetch.json").write_text(json.dumps({"source": "local", "sha256": sha}))
    (ws / "metrics" / "data.json").write_text(json.dumps({"n_slices": 3364, "splits": {"test": {"patients": N}}}))
    for v in variants:
        (ws / "metrics" / f"{v}.json").write_text(json.dumps(_metrics(v, sha)))
        (ws / "data" / "eval" / v).mkdir(parents=True)
        _patients(v).to_csv(ws / "data" / "eval" / v / "patients.csv", index=False)
        pd.DataFrame({"seed": [23], "row": [1], "dice": [0.5]}).to_csv(ws / "data" / "eval" / v / "slices.csv", index=False)
        (ws / "models" / v / "seed_23").mkdir(parents=True)
        history = [{"epoch": e, "val/dice": 0.5 + 0.1 * e} for e in (1, 2)]
        (ws / "models" / v / "seed_23" / "result.json").write_text(json.dumps({"seed": 23, "history": history}))
    if store_dir is not None:
        eval_figures(ws, variants, store_dir)
    return write_snapshot(ws, variants, root / "snap", command="make cpu-tables", repo=REPO)


def _one_line_exit_2(capsys, argv: list[str], needle: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("report: ") and err.count("\n") == 1 and needle in err, err
    return err


@pytest.fixture(scope="module")
def table3_and_table2(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return make_snapshot(root / "t3", TABLE3), make_snapshot(root / "t2", TABLE2)


def test_a_snapshot_reads_like_a_reproduce_folder(table3_and_table2):
    t3, _ = table3_and_table2
    got = read_folder(t3)
    assert got["layout"] == "snapshot" and list(got["metrics"]) == TABLE3
    assert got["commit"] == json.loads((t3 / "snapshot.json").read_text())["project_commit"]
    assert list(got["patients"]["variant"].unique()) == TABLE3 and got["patients"]["patient_id"][0] == "TCGA_P00"
    assert got["training"][["variant", "seed", "epoch"]].values.tolist() == \
        [[v, 23, e] for v in TABLE3 for e in (1, 2)]
    assert got["files"]["figures"] is None and got["files"]["components"] is None
    assert got["files"]["fetch"] == t3 / "fetch.json"


def test_two_snapshots_make_one_report(table3_and_table2, tmp_path, capsys):
    t3, t2 = table3_and_table2
    out = tmp_path / "merged" / "tables.md"
    assert main([str(t3), str(t2), "--tables", str(out)]) == 0
    md = out.read_text()
    tables = parse_tables(md)
    where = {r["Variant"].strip("`"): r["Folder"].strip("`") for r in tables["Where the results come from"]}
    assert where == {**dict.fromkeys(TABLE3, t3.as_posix()), **dict.fromkeys(TABLE2, t2.as_posix())}
    assert "Merged by `lggseg report` from 2 folders" in md
    t2_rows = [r for r in tables[next(k for k in tables if k.startswith("Table 2"))] if r["Ours (variant)"] != "not run"]
    assert len(t2_rows) == 3  # BCE from one folder, BCE + Dice and + outlier from the other
    paired2 = {r["Comparison (B vs A)"]: r for r in tables[next(k for k in tables if k.startswith("Paired: Table 2"))]}
    # B from one folder, A from the other, patient by patient: +0.05 on every one of the 12 patients
    step = paired2["`regnet_attr_bce_dice` vs `regnet_attr_bce`"]
    assert (step["n"], step["Δ patient-3D Dice"], step["Verdict"]) == (str(N), "+5.00", REPRODUCED)
    paired3 = tables[next(k for k in tables if k.startswith("Paired: Table 3"))]
    assert paired3[0]["Δ patient-3D Dice"] == "+10.00" and paired3[0]["Verdict"] == REPRODUCED
    assert "**Table 4: partly run," not in md and "**Table 4: not run**" in md
    assert re.search(r"- Figure 7: not drawn \(no figure slices for `regnet_attr_bce`, `regnet_attr_bce_dice_outlier`", md)
    assert "- Figure 8: not drawn (needs `unet_bce`, " in md
    assert (tmp_path / "merged" / "plots" / "test_dice_by_variant.png").is_file()
    assert "Not drawn: no ground-truth component table" in md


def test_a_variant_in_two_folders_is_refused(table3_and_table2, tmp_path, capsys):
    t3, _ = table3_and_table2
    again = make_snapshot(tmp_path, ["regnet_bce"])
    _one_line_exit_2(capsys, [str(t3), str(again), "--tables", str(tmp_path / "t.md")],
                     f"variant regnet_bce is in both {t3} and {again}")
    assert not (tmp_path / "t.md").exists()


def _edit(path: str, value):
    def apply(params: dict) -> dict:
        params = copy.deepcopy(params)
        *head, last = path.split(".")
        node = params
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
        return params
    return apply


@pytest.mark.parametrize(("edit", "refused"), [
    (_edit("common.image_size", 128), "common.image_size 256 vs 128"),
    (_edit("train.epochs", 7), "train.epochs"),
    (_edit("train.augment.extra", not PARAMS["train"]["augment"].get("extra", False)), "train.augment.extra"),
    (_edit("train.lr_schedule", "cosine" if PARAMS["train"].get("lr_schedule") != "cosine" else "constant"),
     "train.lr_schedule"),
    (_edit("train.empty_slice_fraction", 0.5), "train.empty_slice_fraction"),
    (_edit("manifest.split_seed", 7), "manifest.split_seed"),
    (_edit("evaluate.tta", not PARAMS.get("evaluate", {}).get("tta", False)), "evaluate.tta"),
    # what a variant sets itself may differ; so may how the run was executed, and loss settings that no
    # term of one side's loss reads (Table 3's variants use no outlier term)
    (_edit("variants.regnet_attr_bce_dice.train", {"epochs": 3}), None),
    (_edit("train.cpu_threads", 1), None),
    (_edit("common.device", "cuda"), None),
    (_edit("loss.gamma", 0.5), None),
])
def test_recipes_must_agree_except_where_a_variant_sets_its_own(table3_and_table2, tmp_path, capsys, edit, refused):
    t3, _ = table3_and_table2
    other = make_snapshot(tmp_path, TABLE2, edit(PARAMS))
    argv = [str(t3), str(other), "--tables", str(tmp_path / "t.md")]
    if refused is None:
        assert main(argv) == 0, capsys.readouterr().err
    else:
        assert refused in _one_line_exit_2(capsys, argv, "were trained with different recipes: ")


def test_other_data_is_another_recipe(table3_and_table2, tmp_path, capsys):
    t3, _ = table3_and_table2
    other = make_snapshot(tmp_path, TABLE2, sha="ef" * 32)
    _one_line_exit_2(capsys, [str(t3), str(other), "--tables", str(tmp_path / "t.md")],
                     f"data.fingerprint '{SHA}' vs '{'ef' * 32}'")


def test_recipe_leaves_out_the_variants_own_settings_and_execution():
    r = recipe(PARAMS, "regnet_attr_bce_dice_outlier", _metrics("x"))
    assert "loss.terms" not in r and "loss.outlier_mode" not in r and "tables" not in r  # its own settings
    assert r["model.attributes"] is True  # the global setting it does not override
    assert "train.epochs" in r and r["common.image_size"] == 256 and r["data.fingerprint"] == SHA
    assert "model.attributes" not in recipe(PARAMS, "regnet_bce", _metrics("x"))  # sets it itself
    assert "data.fingerprint" not in recipe(PARAMS, "regnet_bce", metrics_file())  # no provenance: unknown
    assert not EXECUTION_KEYS & r.keys() and "loss.gamma" in r
    assert "loss.gamma" not in recipe(PARAMS, "regnet_bce", _metrics("x"))  # BCE alone reads no gamma


def test_several_folders_need_tables_and_a_missing_folder_is_one_line(table3_and_table2, tmp_path, capsys):
    t3, t2 = table3_and_table2
    _one_line_exit_2(capsys, [str(t3), str(t2)], "several folders: give --tables")
    _one_line_exit_2(capsys, [str(tmp_path / "none")], "no such folder")


def _figures(prob: float, k: int = 2, side: int = 32) -> dict[str, np.ndarray]:
    truth = np.zeros((k, side, side), bool)
    truth[:, 8:20, 8:20] = True
    return {"ids": np.array([f"TCGA_P00_x_{i}" for i in range(k)]), "rows": np.arange(k),
            "image": np.full((k, side, side, 3), 60, np.uint8), "truth": truth, "threshold": np.array(0.5),
            "min_area": np.array(49), "selection": np.array("paper"),
            "prob": np.where(truth, prob, 0.1).astype(np.float32), "prob_seed": np.array(23)}


def test_a_reproduce_folder_and_a_snapshot_merge_and_figure_7_is_drawn(tmp_path):
    """Figure 7's two variants from a reproduce folder (which keeps figure slices), Table 3's other side from
    a snapshot: the paired comparison crosses the folders, the reproduce folder's components are used."""
    mine = ["regnet_attr_bce", "regnet_attr_bce_dice_outlier"]
    params = copy.deepcopy(PARAMS)
    params["variants"] = {v: PARAMS["variants"][v] for v in mine}
    out = tmp_path / "reproduce"
    writer = FolderWriter(out, params, {"git_commit": "12" * 20, "data": {"source": "local"}})
    store = tmp_path / "store"
    store.mkdir()
    pd.DataFrame({"row": [0, 1], "connectivity": [8, 8], "area": [3, 900], "height": [1, 30],
                  "width": [3, 30]}).to_csv(store / "components.csv", index=False)
    writer.add_components(store)
    for v in mine:
        writer.add_variant(v, _metrics(v), pd.DataFrame({"seed": [23], "dice": [0.5]}), _figures(0.9),
                           [{"seed": 23, "history": [{"epoch": 1, "val/dice": 0.5}]}], _patients(v))
    snap = make_snapshot(tmp_path / "s", ["regnet_bce", "regnet_attr_bce_dice", "regnet_attr_bce_dice_isolated"])
    md = build_report_from_folders([out, snap], tmp_path / "m" / "tables.md").read_text()
    assert "- Figure 7 (loss comparison, `regnet_attr_bce` vs `regnet_attr_bce_dice_outlier`)" in md
    assert (tmp_path / "m" / "plots" / "figure7_loss_comparison.png").is_file()
    assert f"From `{(out / 'components.csv').as_posix()}`" in md
    assert (tmp_path / "m" / "plots" / "component_sizes.png").is_file()
    tables = parse_tables(md)
    rows = {r["Variant"].strip("`"): r for r in tables["Where the results come from"]}
    assert rows["regnet_attr_bce"]["Kind"] == "reproduce" and rows["regnet_attr_bce"]["Project commit"] == "1212121212"
    assert rows["regnet_bce"]["Kind"] == "snapshot"
    assert "**Warning: these results come from different project commits" in md
    (t3,) = tables[next(k for k in tables if k.startswith("Paired: Table 3"))]
    assert (t3["Comparison (B vs A)"], t3["Δ patient-3D Dice"]) == ("`regnet_attr_bce` vs `regnet_bce`", "+10.00")


COMMITTED = REPO / "results" / "cpu-tables-2026-12-03" / "table3"


@pytest.mark.skipif(not (COMMITTED / "paired.md").is_file(), reason="the committed Table 3 snapshot is not here")
def test_the_committed_table3_snapshot_gives_its_paired_md(tmp_path):
    """``lggseg report`` on the real Table 3 snapshot repeats the numbers its paired.md was made with
    (by lggseg.reporting.paired by hand): mean difference, interval and Wilcoxon p of both metrics."""
    md = build_report_from_folders([COMMITTED], tmp_path / "tables.md", tmp_path / "plots").read_text()
    (row,) = parse_tables(md)["Paired: Table 3 - attribute encoder ablation (DeepLabv3+ / regnetz_040, BCE)"]
    names = {"dice_3d": "patient-3D Dice", "dice_slice_mean": "slice-mean Dice"}
    seen = 0
    for line in (COMMITTED / "paired.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in names:
            continue
        seen += 1
        name = names[cells[0]]
        lo, hi = (float(x) for x in cells[2].strip("[]").split(","))
        assert row[f"Δ {name}"] == f"{100 * float(cells[1]):+.2f}"
        assert row[f"Δ {name} 95% CI"] == f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
        assert float(row[f"Δ {name} Wilcoxon p"]) == pytest.approx(float(cells[3]), abs=5e-3)
        assert row["n"] == cells[4]
    assert seen == 2


def test_one_folder_with_tables_elsewhere_writes_nothing_into_it(table3_and_table2, tmp_path):
    """A committed snapshot stays as it is: with --tables, the figures go beside the tables."""
    t3, _ = table3_and_table2
    before = sorted(p.relative_to(t3) for p in t3.rglob("*"))
    assert main([str(t3), "--tables", str(tmp_path / "t3.md")]) == 0
    assert sorted(p.relative_to(t3) for p in t3.rglob("*")) == before
    assert (tmp_path / "plots" / "test_dice_by_variant.png").is_file()


def test_a_snapshot_names_the_project_commit_in_every_metrics_file(table3_and_table2):
    """Workspace results name the workspace's own commit; the snapshot adds the project's (nothing else
    changes), so the tables' provenance lines name the code that ran."""
    t3, _ = table3_and_table2
    project = json.loads((t3 / "snapshot.json").read_text())["project_commit"]
    for v in TABLE3:
        stamped = json.loads((t3 / "metrics" / f"{v}.json").read_text())
        assert stamped["provenance"]["project"]["commit"] == project and project != "ab" * 20
        assert stamped["provenance"]["git_commit"] == "ab" * 20  # the workspace's, kept
        stamped["provenance"].pop("project")
        assert stamped == json.loads(json.dumps(_metrics(v)))
    assert stamp_project(t3) == []  # a second stamp changes nothing
    md = build_report_from_folders([t3], t3.parent / "t.md", t3.parent / "plots").read_text()
    assert f"commit {project[:10]}" in md and "ababababab" not in md


def test_stamping_needs_the_snapshot_record(tmp_path):
    (tmp_path / "metrics").mkdir()
    with pytest.raises(DataError, match="snapshot.json"):
        stamp_project(tmp_path)
    (tmp_path / "snapshot.json").write_text(json.dumps({"variants": []}))
    with pytest.raises(DataError, match="no project_commit"):
        stamp_project(tmp_path)


# --------------------------------------------------------------------------- figures of snapshots


FIG7 = ["regnet_attr_bce", "regnet_attr_bce_dice_outlier"]


def _fingerprint(store_dir: Path) -> str:
    return json.loads((store_dir / "store.json").read_text())["fingerprint"]["sha256"]


def test_a_snapshot_keeps_the_figure_predictions_and_components_but_no_data(store_dir, tmp_path):
    snap = make_snapshot(tmp_path, FIG7, sha=_fingerprint(store_dir), store_dir=store_dir)
    for v in FIG7:
        assert sorted(p.name for p in (snap / "rows" / v).iterdir()) == \
            ["figure_mask.png", "figure_probability.png", "figure_slices.json", "patients.csv", "slices.csv"]
    assert (snap / "components.csv").read_bytes() == (store_dir / "components.csv").read_bytes()
    files = [p for p in snap.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".npz", ".npy", ".tif"}]
    assert max(p.stat().st_size for p in files) < 100_000


def test_snapshot_figures_are_drawn_from_a_manifest_of_the_same_data(store_dir, tmp_path, capsys):
    sha = _fingerprint(store_dir)
    snap = make_snapshot(tmp_path / "a", FIG7, sha=sha, store_dir=store_dir)
    md = build_report_from_folders([snap], tmp_path / "no" / "tables.md").read_text()
    assert ("- Figure 7: not drawn (the snapshots keep the predictions of `regnet_attr_bce`, "
            "`regnet_attr_bce_dice_outlier` but not the data: give --manifest DIR") in md
    assert f"From `{(snap / 'components.csv').as_posix()}`" in md  # the dataset section needs no images

    assert main([str(snap), "--tables", str(tmp_path / "yes" / "tables.md"), "--manifest", str(store_dir)]) == 0
    md = (tmp_path / "yes" / "tables.md").read_text()
    assert "- Figure 7 (loss comparison, `regnet_attr_bce` vs `regnet_attr_bce_dice_outlier`)" in md
    assert (tmp_path / "yes" / "plots" / "figure7_loss_comparison.png").stat().st_size > 10_000

    other = tmp_path / "other-store"
    shutil.copytree(store_dir, other)
    meta = json.loads((other / "store.json").read_text())
    meta["fingerprint"]["sha256"] = "0" * 64
    (other / "store.json").write_text(json.dumps(meta))
    _one_line_exit_2(capsys, [str(snap), "--tables", str(tmp_path / "t.md"), "--manifest", str(other)],
                     "is of other data (fingerprint 000000000000)")
    _one_line_exit_2(capsys, [str(snap), "--tables", str(tmp_path / "t.md"), "--manifest", str(tmp_path / "none")],
                     "store.json: not found")


def test_side_files_reach_an_older_snapshot_only_from_the_same_evaluation(store_dir, tmp_path, capsys):
    snap = make_snapshot(tmp_path, FIG7, sha=_fingerprint(store_dir))  # taken before figures were kept
    ws = tmp_path / "ws"
    assert not (snap / "components.csv").exists() and not (snap / "rows" / FIG7[0] / "figure_slices.json").exists()
    with pytest.raises(DataError, match="no figure slices"):
        add_side_files(ws, snap, repo=REPO)
    eval_figures(ws, FIG7, store_dir)
    slices = ws / "data" / "eval" / FIG7[1] / "slices.csv"
    kept = slices.read_bytes()
    slices.write_bytes(kept.replace(b"0.5", b"0.6"))  # evaluated again since the snapshot
    with pytest.raises(DataError, match="not the evaluation the snapshot"):
        add_side_files(ws, snap, repo=REPO)
    assert not (snap / "components.csv").exists()
    slices.write_bytes(kept)
    assert snapshot_main(["--workspace", str(ws), "--dest", str(snap), "--add-side-files", "--repo", str(REPO)]) == 0
    record = json.loads((snap / "snapshot.json").read_text())
    assert record["side_files"]["files"] == [f"rows/{v}/{f}" for v in FIG7 for f in
                                             ("figure_probability.png", "figure_mask.png", "figure_slices.json")] + \
        ["components.csv"]
    assert record["variants"] == FIG7 and record["command"] == "make cpu-tables"
    assert snapshot_main(["--workspace", str(ws), "--dest", str(snap), "--add-side-files", "--variant", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lggseg snapshot: --add-side-files takes") and err.count("\n") == 1


COMMITTED_ALL = REPO / "results" / "cpu-tables-2026-12-03"


@pytest.mark.skipif(not (COMMITTED_ALL / "table4" / "snapshot.json").is_file(), reason="the committed tables are not here")
def test_the_committed_tables_keep_figure_predictions_of_all_12_variants_and_no_data():
    from lggseg.reporting.figure_predictions import has_figure_predictions, read_figure_predictions

    seen, ids = [], set()
    for folder in ("table3", "table2", "table2-isolated", "table4"):
        record = json.loads((COMMITTED_ALL / folder / "snapshot.json").read_text())
        assert record["side_files"]["files"][-1] == "components.csv"
        for v in record["variants"]:
            assert has_figure_predictions(COMMITTED_ALL / folder / "rows" / v), (folder, v)
            pred = read_figure_predictions(COMMITTED_ALL / folder / "rows" / v)
            assert pred.prob.shape == (5, 256, 256)
            ids.add(tuple(pred.ids))
            seen.append(v)
    assert sorted(seen) == sorted(yaml.safe_load((REPO / "params.yaml").read_text())["variants"])  # all 12
    assert len(ids) == 1  # every variant drew the same five test slices
    assert not [p for p in COMMITTED_ALL.rglob("*") if p.suffix in {".npz", ".npy", ".tif"}]
