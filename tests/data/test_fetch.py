"""fetch: every source gives the same kaggle_3m/, atomically; Kaggle errors are clear and leak no secret."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import ENV
from lggseg.config import CommonConfig, FetchConfig, ManifestConfig
from lggseg.data.fetch import fetch as run_fetch
from lggseg.data.fetch import fingerprint, normalise_data_csv
from lggseg.data.manifest import build_manifest
from lggseg.data.store import load_store
from lggseg.errors import FetchError

REPO = Path(__file__).resolve().parents[2]
SECRET = "fake-secret-123"


def kaggle_shaped_zip(raw: Path, dest: Path) -> Path:
    """A zip like the Kaggle download: kaggle_3m/ plus lgg-mri-segmentation/kaggle_3m/, data.csv as ';' + CRLF."""
    lines = (raw / "data.csv").read_text().splitlines()
    semicolon = "\r\n".join(line.replace(",", ";") for line in lines) + "\r\n"
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for prefix in ("kaggle_3m", "lgg-mri-segmentation/kaggle_3m"):
            for f in sorted(raw.rglob("*")):
                if f.is_file():
                    rel = f.relative_to(raw).as_posix()
                    data = semicolon.encode() if rel == "data.csv" else f.read_bytes()
                    zf.writestr(f"{prefix}/{rel}", data)
    return dest


@pytest.fixture
def no_kaggle_credentials(tmp_path, monkeypatch):
    """An environment with no Kaggle credentials anywhere, but a stray KAGGLE_KEY holding a secret."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    return home


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_demo_source(tmp_path):
    fp = run_fetch(FetchConfig(source="demo", demo_cases=3, demo_seed=4), tmp_path / "raw")
    raw = tmp_path / "raw" / "kaggle_3m"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["fingerprint.json", "kaggle_3m"]
    assert json.loads((tmp_path / "raw" / "fingerprint.json").read_text()) == fp
    assert fp["source"] == "demo"
    files = [p for p in raw.rglob("*") if p.is_file()]
    assert fp["n_files"] == len(files) and fp["total_bytes"] == sum(p.stat().st_size for p in files)
    assert fp == fingerprint(raw, "demo")


def test_local_dir_copy_has_same_content_hash(tmp_path, demo_kaggle_dir):
    fp = run_fetch(FetchConfig(source=str(demo_kaggle_dir)), tmp_path / "raw")
    assert fp["source"] == "local"
    assert fp["sha256"] == fingerprint(demo_kaggle_dir, "x")["sha256"]
    # A folder that holds kaggle_3m/ (an unpacked download) works too.
    fp2 = run_fetch(FetchConfig(source=str(demo_kaggle_dir.parent)), tmp_path / "raw2")
    assert fp2["sha256"] == fp["sha256"]


def test_fingerprint_changes_with_content(tmp_path, demo_kaggle_dir):
    copy = tmp_path / "k"
    shutil.copytree(demo_kaggle_dir, copy)
    before = fingerprint(copy, "local")
    (copy / "README.txt").write_text("changed")
    after = fingerprint(copy, "local")
    assert after["sha256"] != before["sha256"] and after["n_files"] == before["n_files"]


def test_kaggle_zip_gives_same_manifest_as_directory(tmp_path, demo_kaggle_dir):
    z = kaggle_shaped_zip(demo_kaggle_dir, tmp_path / "lgg-mri-segmentation.zip")
    fp_zip = run_fetch(FetchConfig(source=str(z)), tmp_path / "from_zip")
    fp_dir = run_fetch(FetchConfig(source=str(demo_kaggle_dir)), tmp_path / "from_dir")
    zipped = tmp_path / "from_zip" / "kaggle_3m"
    assert "lgg-mri-segmentation" not in _tree(tmp_path / "from_zip")[0]  # one copy only
    assert _tree(zipped) == _tree(tmp_path / "from_dir" / "kaggle_3m")
    assert b"\r\n" not in (zipped / "data.csv").read_bytes() and b";" not in (zipped / "data.csv").read_bytes()
    assert fp_zip["sha256"] == fp_dir["sha256"]
    stores = []
    for name in ("from_zip", "from_dir"):
        build_manifest(tmp_path / name / "kaggle_3m", tmp_path / f"m_{name}", CommonConfig(), ManifestConfig())
        stores.append(load_store(tmp_path / f"m_{name}"))
    pd.testing.assert_frame_equal(stores[0].table, stores[1].table)
    assert np.array_equal(stores[0].images, stores[1].images) and np.array_equal(stores[0].masks, stores[1].masks)


def test_real_zip_from_restore(tmp_path, real_kaggle_dir):
    z = kaggle_shaped_zip(real_kaggle_dir, tmp_path / "real.zip")
    fp = run_fetch(FetchConfig(source=str(z)), tmp_path / "raw")
    assert fp["sha256"] == fingerprint(real_kaggle_dir, "x")["sha256"]


@pytest.mark.parametrize(
    ("raw", "expected", "changed"),
    [
        (b"Patient;A;B\r\nP1;1;\r\nP2;;3\r\n", b"Patient,A,B\nP1,1,\nP2,,3\n", True),
        (b"\xef\xbb\xbfPatient,A\nP1,2\n", b"Patient,A\nP1,2\n", True),
        (b"Patient,A\r\nP1,2\r\n", b"Patient,A\nP1,2\n", True),
        (b"Patient,A\nP1,2\n", b"Patient,A\nP1,2\n", False),
        (b"Patient,A\nP1,2", b"Patient,A\nP1,2\n", True),
    ],
    ids=["semicolon-crlf", "bom", "crlf", "canonical", "no-final-newline"],
)
def test_normalise_data_csv(tmp_path, raw, expected, changed):
    p = tmp_path / "data.csv"
    p.write_bytes(raw)
    assert normalise_data_csv(p) is changed
    assert p.read_bytes() == expected


def test_kaggle_without_credentials_fails_clearly(tmp_path, no_kaggle_credentials):
    with pytest.raises(FetchError) as err:
        run_fetch(FetchConfig(source="kaggle"), tmp_path / "data" / "raw")
    msg = str(err.value)
    assert "no Kaggle credentials" in msg and "KAGGLE_USERNAME" in msg and "fetch.source" in msg
    assert "\n" not in msg and SECRET not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_kaggle_download_error_never_shows_the_key(tmp_path, no_kaggle_credentials, monkeypatch):
    import kagglehub

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")

    def boom(handle, **kwargs):
        raise RuntimeError(f"401 for https://x/?key={SECRET}\nuser someone")

    monkeypatch.setattr(kagglehub, "dataset_download", boom)
    with pytest.raises(FetchError) as err:
        run_fetch(FetchConfig(source="kaggle"), tmp_path / "data" / "raw")
    msg = str(err.value)
    assert "could not download" in msg and "KAGGLE_USERNAME/KAGGLE_KEY" in msg
    assert SECRET not in msg and "someone" not in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_kaggle_download_is_used(tmp_path, demo_kaggle_dir, no_kaggle_credentials, monkeypatch):
    import kagglehub

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    calls = []

    def fake_download(handle, output_dir=None, **kwargs):
        calls.append((handle, output_dir))
        root = Path(output_dir)
        for prefix in ("kaggle_3m", "lgg-mri-segmentation/kaggle_3m"):
            shutil.copytree(demo_kaggle_dir, root / prefix)
        return str(root)

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    fp = run_fetch(FetchConfig(source="kaggle"), tmp_path / "raw")
    assert calls[0][0] == "mateuszbuda/lgg-mri-segmentation"
    assert Path(calls[0][1]).parent.parent == tmp_path  # into a temporary folder beside the target, not a cache
    assert fp["source"] == "kaggle" and fp["sha256"] == fingerprint(demo_kaggle_dir, "x")["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "raw"]


def test_stage_exits_2_without_credentials_and_prints_no_secret(tmp_path, no_kaggle_credentials):
    (tmp_path / "params.yaml").write_text("fetch:\n  source: kaggle\n")
    env = {k: v for k, v in os.environ.items() if k not in ("KAGGLE_USERNAME", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "fetch.py"), "--out", "data/raw", "--fingerprint", "metrics/fetch.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert SECRET not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("fetch: ") and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "params.yaml"]


def test_stage_writes_fingerprint_metric(tmp_path):
    (tmp_path / "params.yaml").write_text("fetch:\n  source: demo\n  demo_cases: 3\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "fetch.py"), "--out", "data/raw", "--fingerprint", "metrics/fetch.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    metric = json.loads((tmp_path / "metrics" / "fetch.json").read_text())
    assert metric == json.loads((tmp_path / "data" / "raw" / "fingerprint.json").read_text())
    assert set(metric) == {"source", "n_files", "total_bytes", "sha256"}


@pytest.mark.parametrize(
    ("setup", "source", "needle"),
    [
        (lambda d: None, "{d}/nowhere", "does not exist"),
        (lambda d: (d / "empty").mkdir(), "{d}/empty", "no kaggle_3m/data.csv"),
        (lambda d: (d / "bad.zip").write_bytes(b"nope"), "{d}/bad.zip", "not a readable zip"),
    ],
    ids=["missing", "empty-dir", "not-a-zip"],
)
def test_bad_local_sources(tmp_path, setup, source, needle):
    setup(tmp_path)
    with pytest.raises(FetchError, match=needle):
        run_fetch(FetchConfig(source=source.format(d=tmp_path)), tmp_path / "out" / "raw")
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_foreign_folder_and_keeps_old_data_on_failure(tmp_path, demo_kaggle_dir):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(FetchError, match="fetch did not write"):
        run_fetch(FetchConfig(source=str(demo_kaggle_dir)), out)
    assert (out / "precious.txt").read_text() == "mine"
    (out / "precious.txt").unlink()
    first = run_fetch(FetchConfig(source=str(demo_kaggle_dir)), out)
    with pytest.raises(FetchError):
        run_fetch(FetchConfig(source=str(tmp_path / "nowhere")), out)
    assert fingerprint(out / "kaggle_3m", "local") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


SECRET_USER = "fake-user-secret-456"


def test_kaggle_credentials_never_leak(tmp_path):
    """With a (fake) username and key the stage tries Kaggle and fails; neither secret reaches its output or any file."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump({"fetch": {"source": "kaggle"}}))
    env = {k: v for k, v in ENV.items() if not k.startswith("KAGGLE")}
    env.update(
        HOME=str(tmp_path / "home"), KAGGLEHUB_CACHE=str(tmp_path / "cache"), XDG_CACHE_HOME=str(tmp_path / "xdg"),
        KAGGLE_USERNAME=SECRET_USER, KAGGLE_KEY=SECRET,
    )
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "fetch.py"), "--params", "params.yaml", "--out", "data/raw",
         "--fingerprint", "metrics/fetch.json"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0  # offline (or a fake token): it must fail
    assert res.stderr.startswith("fetch: ")
    for secret in (SECRET, SECRET_USER):
        assert secret not in res.stdout + res.stderr
        leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaked == []

