"""The ``fetch`` stage: obtain the LGG dataset (paper section 4.1.1) as ``<out>/kaggle_3m/``.

Sources (``fetch.source`` in params.yaml, see :class:`lggseg.config.FetchConfig`):

* ``kaggle``: ``kagglehub.dataset_download(fetch.kaggle_dataset)``. Credentials come from the usual
  places (``KAGGLE_USERNAME`` + ``KAGGLE_KEY``, ``KAGGLE_API_TOKEN``, ``$KAGGLE_CONFIG_DIR`` or
  ``~/.kaggle/kaggle.json``, ``~/.kaggle/access_token``) and are checked before any download; their
  values never appear in messages, logs or outputs.
* a local ``kaggle_3m/`` folder (or a folder holding one, such as an unpacked download): copied;
* a local zip shaped like the Kaggle download (``kaggle_3m/`` plus a duplicate
  ``lgg-mri-segmentation/kaggle_3m/``): the shallowest copy is extracted with
  :func:`lggseg.data.archive.safe_extract_zip`;
* ``demo``: :func:`lggseg.data.synthetic.generate_demo` (synthetic, labelled as such).

``data.csv`` is normalised to comma-separated UTF-8 with ``\\n`` line ends (the zip's copy may be
``;``-separated with CRLF). The whole ``<out>`` folder is built beside its destination and renamed into
place at the end, so a failed fetch leaves the previous data (or nothing) and no partial folder.

The returned fingerprint (file count, total bytes, a SHA-256 over the sorted relative paths and
per-file hashes, and the source kind) is written to ``<out>/fingerprint.json``; the stage also writes
it to ``metrics/fetch.json`` so that a silently changed dataset shows in ``dvc metrics diff``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import io
import json
import os
import shutil
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from lggseg.config import FetchConfig
from lggseg.data.archive import safe_extract_zip
from lggseg.data.synthetic import generate_demo
from lggseg.errors import FetchError
from lggseg.io import atomic_dir, write_json

RAW_NAME = "kaggle_3m"
FINGERPRINT_NAME = "fingerprint.json"
_HASH_CHUNK = 1 << 20
_WHAT_TO_DO = (
    "Either put a Kaggle API token in ~/.kaggle/kaggle.json (create it at https://www.kaggle.com/settings, "
    "chmod 600) or export KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), or set fetch.source in "
    "params.yaml to a local kaggle_3m/ folder or the downloaded lgg-mri-segmentation.zip "
    "(or to 'demo' for synthetic data)."
)


# --------------------------------------------------------------------------- fingerprint


def file_digest(path: str | Path) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Every file under ``root`` as a sorted list of relative POSIX paths."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            if full.is_file():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


def fingerprint(root: str | Path, source: str, known: Mapping[str, tuple[int, str]] | None = None) -> dict:
    """Content fingerprint of the folder ``root``.

    ``known`` maps relative paths to ``(size, sha256)`` already computed elsewhere (the manifest
    hashes each TIFF while decoding it) so those files are not read twice.
    """
    root = Path(root)
    rels = list_files(root)
    known = dict(known or {})
    todo = [r for r in rels if r not in known]
    if todo:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            digests = pool.map(lambda r: file_digest(root / r), todo)
            for rel, dig in tqdm(zip(todo, digests, strict=True), total=len(todo), desc="hash", unit="file", leave=False):
                known[rel] = dig
    h = hashlib.sha256()
    total = 0
    for rel in rels:
        size, digest = known[rel]
        total += size
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
    return {"source": source, "n_files": len(rels), "total_bytes": total, "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- data.csv


def csv_delimiter(header: str) -> str:
    """``;`` when the header line is semicolon-separated (as in the zip), else ``,``."""
    return ";" if header.count(";") > header.count(",") else ","


def normalise_data_csv(path: Path) -> bool:
    """Rewrite ``path`` as comma-separated UTF-8 with ``\\n`` line ends; True when it changed."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = text.splitlines()
    if not lines:
        raise FetchError(f"{path}: empty file")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=csv_delimiter(lines[0])))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(row for row in rows if row)
    new = buf.getvalue().encode("utf-8")
    if new == raw:
        return False
    path.write_bytes(new)
    return True


# --------------------------------------------------------------------------- kaggle credentials


def _token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _credentials() -> tuple[str | None, list[str], str]:
    """``(where found or None, secret values to scrub, hint)``; never returns values to print."""
    env = os.environ
    secrets = [v for k in ("KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME") if (v := env.get(k))]
    token = env.get("KAGGLE_API_TOKEN")
    if token:
        if Path(token).is_file():
            if content := _token_file(Path(token)):
                secrets.append(content)
                return "the file named by KAGGLE_API_TOKEN", secrets, ""
        else:
            return "KAGGLE_API_TOKEN", secrets, ""
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY", secrets, ""
    hint = ""
    if bool(env.get("KAGGLE_USERNAME")) != bool(env.get("KAGGLE_KEY")):
        hint = "KAGGLE_KEY is set but KAGGLE_USERNAME is not. " if env.get("KAGGLE_KEY") else "KAGGLE_USERNAME is set but KAGGLE_KEY is not. "
    folder = Path(env.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    creds = folder / "kaggle.json"
    if creds.is_file():
        try:
            data = json.loads(creds.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("username") and data.get("key"):
            secrets += [str(data["key"]), str(data["username"])]
            return str(creds), secrets, ""
        hint += f"{creds} exists but is not a JSON object with 'username' and 'key'. "
    for name in ("access_token", "access_token.txt"):
        if content := _token_file(Path.home() / ".kaggle" / name):
            secrets.append(content)
            return f"~/.kaggle/{name}", secrets, ""
    return None, secrets, hint


def _scrub(text: str, secrets: list[str]) -> str:
    for s in sorted(set(secrets), key=len, reverse=True):
        if len(s) >= 3:
            text = text.replace(s, "***")
    return text


def _require_credentials() -> tuple[str, list[str]]:
    where, secrets, hint = _credentials()
    if where is None:
        raise FetchError(
            f"fetch.source is 'kaggle' but no Kaggle credentials were found (looked for KAGGLE_USERNAME + KAGGLE_KEY, "
            f"KAGGLE_API_TOKEN, $KAGGLE_CONFIG_DIR or ~/.kaggle/kaggle.json, ~/.kaggle/access_token). {hint}{_WHAT_TO_DO}"
        )
    return where, secrets


def _from_kaggle(cfg: FetchConfig, tmp: Path, where: str, secrets: list[str]) -> Path:
    download = tmp / "download"
    try:
        import kagglehub

        kwargs = {}
        # Download into our temporary folder (not kagglehub's cache) so a failure leaves nothing behind.
        if "output_dir" in inspect.signature(kagglehub.dataset_download).parameters:
            kwargs["output_dir"] = str(download)
        path = Path(kagglehub.dataset_download(cfg.kaggle_dataset, **kwargs))
    except Exception as exc:  # kagglehub raises many types (HTTP, auth, network, OS); all mean "no data"
        detail = " ".join(_scrub(f"{type(exc).__name__}: {exc}", secrets).split())
        if len(detail) > 240:
            detail = detail[:237] + "..."
        raise FetchError(
            f"could not download {cfg.kaggle_dataset} from Kaggle with the credentials from {where} ({detail}). "
            f"Check the network connection and the credentials. {_WHAT_TO_DO}"
        ) from None
    found = _locate_raw_dir(path)
    target = tmp / RAW_NAME
    if found.resolve().is_relative_to(download.resolve()):
        os.replace(found, target)
        shutil.rmtree(download, ignore_errors=True)
    else:  # an older kagglehub that only knows its cache: copy out of it
        _copy_tree(found, target)
    return target


# --------------------------------------------------------------------------- local sources


def _locate_raw_dir(path: Path) -> Path:
    """The ``kaggle_3m`` folder in ``path``: ``path`` itself, or the shallowest one below it."""
    if (path / "data.csv").is_file():
        return path
    for depth in (1, 2):
        hits = sorted(p.parent for p in path.glob("/".join(["*"] * depth) + "/data.csv"))
        hits = [h for h in hits if h.name == RAW_NAME] or hits
        if hits:
            return hits[0]
    raise FetchError(f"{path}: no kaggle_3m/data.csv found; expected the Kaggle layout (kaggle_3m/<case>/..., kaggle_3m/data.csv)")


def _copy_tree(src: Path, dest: Path) -> None:
    rels = list_files(src)
    total = sum((src / r).stat().st_size for r in rels)
    with tqdm(total=total, desc=f"copy {src.name}", unit="B", unit_scale=True, leave=False) as bar:
        for rel in rels:
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out)
            bar.update(out.stat().st_size)


def _zip_prefix(zip_path: Path) -> str:
    """The folder of the shallowest ``data.csv`` in the archive (``kaggle_3m`` in the Kaggle zip)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{zip_path}: not a readable zip archive ({exc})") from None
    hits = [PurePosixPath(n.replace("\\", "/")) for n in names if n.replace("\\", "/").rsplit("/", 1)[-1] == "data.csv"]
    if not hits:
        raise FetchError(f"{zip_path}: no data.csv in the archive; expected the Kaggle download (kaggle_3m/data.csv, ...)")
    best = min(hits, key=lambda p: (len(p.parts), str(p)))
    return str(best.parent)


# --------------------------------------------------------------------------- entry point


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FetchError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in (RAW_NAME, FINGERPRINT_NAME))
        if foreign:
            raise FetchError(f"{out_dir}: refusing to replace it, it holds files fetch did not write: {foreign[:5]}")


def fetch(cfg: FetchConfig, out_dir: str | Path) -> dict:
    """Produce ``out_dir/kaggle_3m`` and ``out_dir/fingerprint.json`` (atomically); return the fingerprint."""
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    kind = cfg.kind
    # Everything that can be checked without writing is checked first: a refused fetch creates nothing.
    creds = _require_credentials() if kind == "kaggle" else None
    src = Path(cfg.source).expanduser() if kind == "local" else None
    if src is not None and not src.exists():
        raise FetchError(f"fetch.source: {src} does not exist (expected 'kaggle', 'demo', a kaggle_3m/ folder or a zip)")
    src_dir = _locate_raw_dir(src) if src is not None and src.is_dir() else None
    prefix = _zip_prefix(src) if src is not None and src_dir is None else None
    new_parents = [p for p in out_dir.absolute().parents if not p.exists()]
    try:
        with atomic_dir(out_dir) as tmp:
            target = tmp / RAW_NAME
            if kind == "demo":
                generate_demo(tmp, n_cases=cfg.demo_cases, seed=cfg.demo_seed)
            elif kind == "kaggle":
                _from_kaggle(cfg, tmp, *creds)
            elif src_dir is not None:
                _copy_tree(src_dir, target)
            else:
                safe_extract_zip(src, target, member_prefix=prefix)
            if not (target / "data.csv").is_file():
                raise FetchError(f"{cfg.source}: the fetched kaggle_3m/ has no data.csv")
            normalise_data_csv(target / "data.csv")
            fp = fingerprint(target, kind)
            write_json(tmp / FINGERPRINT_NAME, fp)
    except BaseException:
        for parent in new_parents:  # innermost first; only folders this call created and left empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return fp
