"""Repository hygiene: data, weights and anything big never enter git; modules meet only at public names."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
FORBIDDEN_SUFFIXES = {".tif", ".tiff", ".npy", ".npz", ".pt", ".pth", ".ckpt", ".safetensors", ".zip", ".webp"}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p]


def test_no_large_files_tracked():
    big = [str(p.relative_to(REPO)) for p in _tracked() if p.is_file() and p.stat().st_size > MAX_BYTES]
    assert big == [], f"files over {MAX_BYTES} bytes are tracked by git (put data/weights under DVC): {big}"


def test_no_data_or_weights_tracked():
    bad = [str(p.relative_to(REPO)) for p in _tracked() if p.suffix.lower() in FORBIDDEN_SUFFIXES]
    assert bad == [], f"data or weight files are tracked by git: {bad}"


def test_package_never_names_shared_folder():
    offenders = []
    for folder in ("src", "stages"):
        for path in (REPO / folder).rglob("*.py"):
            if "../shared" in path.read_text() or "/shared/lgg" in path.read_text():
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"src/ and stages/ must not depend on ../shared: {offenders}"


# --------------------------------------------------------------------------- public seams

PACKAGE = REPO / "src" / "lggseg"

# (importing file, name) pairs still allowed while other branches of issue #23 rewrite those files.
ALLOWED = {
}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_of(path: Path) -> str:
    """``lggseg.data.layout`` for ``src/lggseg/data/layout.py`` (a package for its ``__init__``); ``stages.x``."""
    rel = path.relative_to(REPO / "src" if path.is_relative_to(REPO / "src") else REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "lggseg":
        return False
    base = PACKAGE.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _private_uses(source: str, me: str, package: str) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every private name of another lggseg module that ``source`` (module
    ``me`` of ``package``) imports or reaches as an attribute: ``from lggseg.x import _y`` (or relative),
    ``lggseg.x._y`` after ``import lggseg.x``, ``m._y`` after ``import lggseg.x as m`` or ``from lggseg import x as m``."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the lggseg module it stands for
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module.partition(".")[0] != "lggseg":
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if _is_module(full):
                    bound[alias.asname or alias.name] = full
                if _is_private(alias.name) and module != me:
                    found.append((node.lineno, module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == "lggseg":
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["lggseg"] = "lggseg"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain: list[str] = []
        cur: ast.expr = node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if not isinstance(cur, ast.Name) or cur.id not in bound:
            continue
        module, rest = bound[cur.id], chain[::-1]
        while rest and _is_module(f"{module}.{rest[0]}"):
            module, rest = f"{module}.{rest[0]}", rest[1:]
        # one report per use: at the attribute right after the module (``m._y``, not ``m._y.z``)
        if len(rest) == 1 and _is_private(rest[0]) and module != me:
            found.append((node.lineno, module, rest[0]))
    return found


def test_no_private_names_imported_across_modules():
    """A name used by another module is public (and typed): no ``_name`` crosses a module boundary."""
    offenders = []
    for folder in ("src", "stages"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel, me = path.relative_to(REPO).as_posix(), _module_of(path)
            package = me if path.name == "__init__.py" else me.rpartition(".")[0]
            for line, module, name in _private_uses(path.read_text(), me, package):
                if (rel, name) not in ALLOWED:
                    offenders.append(f"{rel}:{line}: {module}.{name}")
    assert offenders == [], "private names used across modules (make them public):\n" + "\n".join(offenders)


# (source of a module lggseg.data.inputs, the private uses the check must find)
PRIVATE_USES = [
    ("from lggseg.data.layout import _read, scan_raw_dir", [(1, "lggseg.data.layout", "_read")]),
    ("from .layout import _read", [(1, "lggseg.data.layout", "_read")]),  # relative
    ("from ..config import _x", [(1, "lggseg.config", "_x")]),
    ("import lggseg.data.layout\nlggseg.data.layout._read(p)", [(2, "lggseg.data.layout", "_read")]),
    ("import lggseg.data.layout as L\nL._CASE_RE.match(n)", [(2, "lggseg.data.layout", "_CASE_RE")]),
    ("from lggseg.data import layout\nlayout._read(p).strip()", [(2, "lggseg.data.layout", "_read")]),
    ("from lggseg.data.inputs import _mine", []),  # its own module
    ("from lggseg.data.layout import __doc__, scan_raw_dir", []),  # dunders are not private
    ("from lggseg.data import layout\nlayout.scan_raw_dir(p)._cache", []),  # a private attribute of a result
    ("import os\nos._exit(0)", []),  # not lggseg
]


@pytest.mark.parametrize(("source", "expected"), PRIVATE_USES)
def test_private_use_check_on_hand_made_sources(source, expected):
    assert _private_uses(source, "lggseg.data.inputs", "lggseg.data") == expected


# --------------------------------------------------------------------------- security: no unpickling, one archive extractor


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _sources() -> list[Path]:
    return sorted([*(REPO / "src").rglob("*.py"), *(REPO / "stages").rglob("*.py")])


def test_no_pickle_loading_anywhere():
    """torch.load only with weights_only=True; no pickle/joblib/dill; numpy never allow_pickle=True."""
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve") for n in names):
                    problems.append(f"{path}:{node.lineno}: imports {names}")
        for call, name in _calls(tree):
            kw = {k.arg: k.value for k in call.keywords}
            weights_only = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if name.split(".")[-2:] == ["torch", "load"] and not weights_only:
                problems.append(f"{path}:{call.lineno}: {name} without weights_only=True")
            if name.endswith("load_state_dict") and name.startswith("timm") and not weights_only:
                problems.append(f"{path}:{call.lineno}: {name} without weights_only=True")
            if name.endswith(("read_pickle", "jit.load")):
                problems.append(f"{path}:{call.lineno}: {name}")
            allow = kw.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{path}:{call.lineno}: {name}(allow_pickle=...)")
    assert problems == []


def test_archive_extraction_has_one_implementation():
    """Only lggseg.data.archive extracts archives; nothing calls extractall/extract/unpack_archive or tarfile."""
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for call, name in _calls(tree):
            if name.split(".")[-1] in ("extractall", "extract", "unpack_archive"):
                offenders.append(f"{path}:{call.lineno}: {name}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and "tarfile" in ([a.name for a in node.names] + [getattr(node, "module", "")]):
                offenders.append(f"{path}:{node.lineno}: imports tarfile")
        text = path.read_text()
        if "zf.open(" in text and path.name != "archive.py":
            offenders.append(f"{path}: reads zip members itself")
    assert offenders == []
    fetch_src = (REPO / "src" / "lggseg" / "data" / "fetch.py").read_text()
    assert "safe_extract_zip(" in fetch_src


