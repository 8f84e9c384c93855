"""Safe, atomic extraction of zip archives (the Kaggle download and local copies of it).

``zipfile.ZipFile.extractall`` trusts member names; an archive from elsewhere must not be able to
write outside the destination. :func:`safe_extract_zip` refuses, before writing anything:

* absolute names (``/etc/x``, ``C:/x``, ``\\\\server\\x``) and names with a ``..`` component
  (backslashes count as separators, so ``..\\x`` is refused too);
* symlink entries (Unix mode ``S_IFLNK`` in the high 16 bits of ``external_attr``) whose target is
  absolute or resolves outside the destination, and any member whose path runs through a symlink
  entry (a link to ``.`` followed by ``link/../x`` would otherwise escape); chained links are
  checked again with the OS's own resolution once they exist;

and it is atomic: members are written into a temporary folder beside ``dest_dir`` which replaces
``dest_dir`` only once everything is extracted (:func:`lggseg.io.atomic_dir`); on any error nothing
is left behind. Symlinks that stay inside are recreated last, after every regular file is written.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from lggseg.errors import FetchError
from lggseg.io import atomic_dir

_CHUNK = 1 << 20


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _clean_name(zip_path: Path, name: str) -> PurePosixPath:
    """The member name as a relative POSIX path; raises on absolute names and ``..``."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise FetchError(f"{zip_path}: refusing member {name!r}: absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"{zip_path}: refusing member {name!r}: '..' in path")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _strip_prefix(name: PurePosixPath, prefix: PurePosixPath | None) -> PurePosixPath | None:
    """``name`` relative to ``prefix``, or None when the member lies outside it."""
    if prefix is None:
        return name
    try:
        return name.relative_to(prefix)
    except ValueError:
        return None


def safe_extract_zip(zip_path: str | Path, dest_dir: str | Path, member_prefix: str | None = None) -> Path:
    """Extract ``zip_path`` into ``dest_dir`` (replaced whole, atomically) and return ``dest_dir``.

    With ``member_prefix`` (a folder inside the archive, e.g. ``"kaggle_3m"``) only the members
    under it are extracted, with the prefix removed, so ``dest_dir`` receives that folder's content.
    Raises :class:`lggseg.errors.FetchError` naming the archive (and member) on a corrupt or unsafe
    archive or an empty selection.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    prefix = None
    if member_prefix not in (None, "", "."):
        prefix = _clean_name(zip_path, member_prefix)
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise FetchError(f"{zip_path}: archive not found") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{zip_path}: not a readable zip archive ({exc})") from None
    with zf:
        plan = _plan(zip_path, zf.infolist(), prefix)
        if not any(not info.is_dir() for info, _ in plan):
            where = f" under {member_prefix!r}" if prefix is not None else ""
            raise FetchError(f"{zip_path}: no files{where} in the archive")
        with atomic_dir(dest_dir) as tmp:
            _extract(zip_path, zf, plan, tmp)
    return dest_dir


def _plan(
    zip_path: Path, infos: list[zipfile.ZipInfo], prefix: PurePosixPath | None
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Validate every selected member up front, so a bad archive is refused before any write."""
    plan = []
    links: set[PurePosixPath] = set()
    for info in infos:
        rel = _strip_prefix(_clean_name(zip_path, info.filename), prefix)
        if rel is None or rel == PurePosixPath("."):
            continue
        plan.append((info, rel))
        if _is_symlink(info):
            links.add(rel)
    for info, rel in plan:
        if any(parent in links for parent in rel.parents):
            raise FetchError(f"{zip_path}: refusing member {info.filename!r}: its path runs through a symlink entry")
    return plan


def _link_target(zip_path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: PurePosixPath) -> str:
    target = zf.read(info).decode("utf-8", errors="replace")
    unified = target.replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join(str(rel.parent), unified))
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":") or resolved == ".." or resolved.startswith("../"):
        raise FetchError(f"{zip_path}: refusing symlink {info.filename!r} -> {target!r}: target escapes the destination")
    return target


def _extract(zip_path: Path, zf: zipfile.ZipFile, plan: list[tuple[zipfile.ZipInfo, PurePosixPath]], root: Path) -> None:
    files = [(i, r) for i, r in plan if not i.is_dir() and not _is_symlink(i)]
    links = [(i, r, _link_target(zip_path, zf, i, r)) for i, r in plan if _is_symlink(i)]
    real_root = os.path.realpath(root)
    total = sum(i.file_size for i, _ in files)
    with tqdm(total=total, desc=f"extract {zip_path.name}", unit="B", unit_scale=True, leave=False) as bar:
        for info, rel in plan:
            if info.is_dir() and not _is_symlink(info):
                (root / rel).mkdir(parents=True, exist_ok=True)
        for info, rel in files:
            out = root / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            # Belt and braces: the checks above already exclude this, but never write outside root.
            if os.path.commonpath([real_root, os.path.realpath(out.parent)]) != real_root:
                raise FetchError(f"{zip_path}: refusing member {info.filename!r}: resolves outside the destination")
            try:
                with zf.open(info) as src, open(out, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        bar.update(len(chunk))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
                raise FetchError(f"{zip_path}: member {info.filename!r} is corrupt ({exc})") from None
    for _info, rel, target in links:
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() or out.is_symlink():
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            else:
                out.unlink()
        os.symlink(target, out)
    # Links may chain (a -> ".", b -> "a/../x"): let the OS resolve them now that all exist.
    for info, rel, target in links:
        resolved = os.path.realpath(root / rel)
        if os.path.commonpath([real_root, resolved]) != real_root:
            raise FetchError(f"{zip_path}: refusing symlink {info.filename!r} -> {target!r}: target escapes the destination")
