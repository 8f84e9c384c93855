"""Tests of lggseg.reporting.outlier_study: the Figure 9 image and map (paper section 4.3) and the blob study."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lggseg.config import LossConfig
from lggseg.reporting.outlier_study import (
    blob_study,
    figure9_areas,
    figure9_image,
    figure9_summary,
    outlier_map,
    render_figure9,
)

REPO = Path(__file__).resolve().parents[2]
CFG = LossConfig(terms=("bce", "dice", "outlier"), i=7, j=21, gamma_warmup_epochs=0, gamma_ramp_epochs=0)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return figure9_areas()


@pytest.fixture(scope="module")
def dmap() -> np.ndarray:
    return outlier_map(figure9_image(), CFG)


def _bbox(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_figure9_image_layout(labels):
    image = figure9_image()
    assert image.shape == (100, 100) and image.dtype == np.float32
    assert set(np.unique(image)) == {0.0, 1.0}
    assert np.array_equal(image > 0, labels > 0)
    assert _bbox(labels == 5) == (28, 28) and (labels == 5).sum() == 784
    assert _bbox(labels == 1) == (7, 7) and (labels == 1).sum() == 49  # exactly the noise size
    for area in (2, 3, 4):
        h, w = _bbox(labels == area)
        assert h <= 7 and w <= 7 and (labels == area).sum() < 49
    density = {a: (labels == a).sum() / np.prod(_bbox(labels == a)) for a in (1, 2, 3, 4)}
    assert min(density, key=density.get) == 2  # area 2 is the sparsest


def test_figure9_areas_are_judged_alone(labels):
    """Every white pixel of areas 1-4 is > (j-1)/2 = 10 px (Chebyshev) from every other area."""
    pts = {a: np.argwhere(labels == a) for a in range(1, 6)}
    for a in range(1, 5):
        for b in range(1, 6):
            if a != b:
                gap = np.abs(pts[a][:, None, :] - pts[b][None, :, :]).max(-1).min()
                assert gap > 10, (a, b, gap)


def test_areas_1_to_4_get_a_value_area_5_and_background_none(labels, dmap):
    for area in (1, 2, 3, 4):
        assert (dmap[labels == area] > 0).all(), area
    assert (dmap[labels == 5] == 0).all()
    assert (dmap[labels == 0] == 0).all()


@pytest.mark.parametrize(
    ("pos", "expected", "why"),
    [
        ((17, 11), 50 / 393, "area 1 centre: 49 white in N_7, ring 392 black"),
        ((14, 8), 17 / 360, "area 1 corner: 16 white in N_7, ring 33 white (= T), 359 black"),
        ((17, 35), 10 / 393, "area 2 centre lattice pixel: 9 white in N_7, ring all black"),
        ((14, 32), 5 / 388, "area 2 corner pixel: 4 white in N_7, 5 in the ring"),
    ],
)
def test_figure9_hand_values(dmap, pos, expected, why):
    assert dmap[pos] == pytest.approx(expected, rel=1e-6), why


def test_paper_statements_on_loss_ordering(labels, dmap):
    """Section 4.3: area 2 (lowest density) has the highest loss, area 1 higher loss on its edges."""
    loss = {a: float((-dmap[labels == a]).mean()) for a in (1, 2, 3, 4)}
    assert max(loss, key=loss.get) == 2
    area1 = -dmap[14:21, 8:15]
    assert area1[0, 0] > area1[3, 3] and area1[0, 3] > area1[3, 3]


def test_figure9_summary_is_json_and_consistent():
    summary = figure9_summary(LossConfig(i=3, j=9))  # the figure always uses the paper's i, j
    json.dumps(summary, allow_nan=False)
    assert (summary["i"], summary["j"], summary["threshold"]) == (7, 21, 33)
    assert summary["areas"]["area5"]["pixels_with_value"] == 0
    assert summary["areas"]["area1"]["pixels_with_value"] == 49
    assert summary["background_pixels_with_value"] == 0


def test_outlier_map_rejects_bad_images():
    with pytest.raises(ValueError, match="2-D"):
        outlier_map(np.zeros((2, 10, 10)), CFG)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        outlier_map(np.full((10, 10), 255.0), CFG)


def test_render_figure9_writes_png(tmp_path):
    out = render_figure9(tmp_path / "plots" / "fig9.png", CFG)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


@pytest.fixture(scope="module")
def study() -> dict:
    summary, _ = blob_study(CFG, steps=8, progress=False)
    return summary


@pytest.mark.parametrize(
    ("opt", "name", "verdict"),
    [
        ("sgd", "bce", "shrinks"),
        ("sgd", "outlier_paper_soft", "shrinks"),
        ("sgd", "density_only_soft", "grows"),
        ("sgd", "isolated_bce", "shrinks"),
        ("adam", "bce", "shrinks"),
        ("adam", "density_only_soft", "grows"),
        ("adam", "isolated_bce", "shrinks"),
    ],
)
def test_blob_study_directions(study, opt, name, verdict):
    run = study[opt][name]
    assert run["verdict"] == verdict
    blob_change = run["after"]["blob_mean_prob"] - run["before"]["blob_mean_prob"]
    assert (blob_change < 0) == (verdict == "shrinks")


def test_blob_study_hard_counts_equal_bce_and_json(study):
    json.dumps(study, allow_nan=False)
    for opt in ("sgd", "adam"):
        assert study[opt]["outlier_paper_hard"]["after"] == pytest.approx(study[opt]["bce"]["after"])
    # isolated_bce leaves the true region and the far background alone
    iso = study["sgd"]["isolated_bce"]
    assert iso["after"]["region_mean_prob"] == pytest.approx(iso["before"]["region_mean_prob"])
    assert iso["after"]["near_blob_area"] == 0


def test_blob_study_records_the_first_step(study):
    """One SGD step of isolated_bce takes the blob from p = 0.982 to ~0 and leaves the true region as it was.

    The term is a mean over the 16 isolated pixels, not over all 64 x 64, so at lr = H*W each blob logit
    moves by 4096 / 16 * (p - y) = 251: the size of that step is the learning rate's doing."""
    iso = study["sgd"]["isolated_bce"]
    assert iso["before"]["blob_mean_prob"] == pytest.approx(1 / (1 + math.exp(-4.0)))  # start logit 4
    assert iso["after_one_step"]["blob_mean_prob"] < 1e-3
    assert iso["after_one_step"]["region_mean_prob"] == iso["before"]["region_mean_prob"]
    # plain BCE's first SGD step moves each logit by p - y = 0.982 only: the blob stays above 0.5
    bce = study["sgd"]["bce"]["after_one_step"]["blob_mean_prob"]
    assert bce == pytest.approx(1 / (1 + math.exp(-(4.0 - 1 / (1 + math.exp(-4.0))))), abs=1e-5)


@pytest.mark.slow
def test_stage_script(tmp_path, monkeypatch):
    params = {"loss": {"terms": ["bce", "outlier"], "i": 7, "j": 21}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.syspath_prepend(str(REPO / "stages"))
    import figure9

    rc = figure9.main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--plot",
            str(tmp_path / "plots/figure9_outlier_loss.png"),
            "--study",
            str(tmp_path / "metrics/outlier_study.json"),
            "--study-plot",
            str(tmp_path / "plots/outlier_blob_study.png"),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "metrics/outlier_study.json").read_text())
    assert set(result) == {"figure9", "blob_study"}
    assert (tmp_path / "plots/outlier_blob_study.png").stat().st_size > 10_000
    sys.modules.pop("figure9", None)


def test_stage_script_bad_params(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"loss": {"i": 8}}))
    monkeypatch.syspath_prepend(str(REPO / "stages"))
    import figure9

    rc = figure9.main(["--params", str(tmp_path / "params.yaml"), "--plot", str(tmp_path / "p.png")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("figure9:") and "loss.i" in err and "\n" not in err
    assert not (tmp_path / "p.png").exists()
    sys.modules.pop("figure9", None)
