"""``lggseg.io``: atomic writers, so a run that dies mid-write never leaves a file that looks complete.

Unit cases of :func:`atomic_path`, :func:`atomic_dir` and the ``write_*`` helpers, then the same
guarantees seen by a user: a full disk, an unwritable output and a killed process through
``lggseg predict`` leave the previous output byte-for-byte as it was.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import lggseg.io
from helpers import ENV, MARKER, assert_untouched, case_dir, previous_output, run_predict
from lggseg.errors import LggsegError
from lggseg.io import (
    OutputError,
    atomic_dir,
    atomic_path,
    project_commit,
    write_bytes,
    write_csv,
    write_json,
    write_text,
    write_yaml,
)
from test_predict import tree_state

# --------------------------------------------------------------------------- the writers


@pytest.mark.parametrize(("write", "obj", "expected"), [
    (write_bytes, b"\x00\xff", b"\x00\xff"),
    (write_text, "Dice 0.8\n", b"Dice 0.8\n"),
    (write_json, {"dice": 0.5, "n": [1, 2]}, b'{\n  "dice": 0.5,\n  "n": [\n    1,\n    2\n  ]\n}\n'),
    (write_yaml, {"b": 1, "a": [2]}, b"b: 1\na:\n- 2\n"),  # keys in the given order, not sorted
    (write_csv, pd.DataFrame({"x": [1, 2], "y": ["a", "b"]}), b"x,y\n1,a\n2,b\n"),
])
def test_writers_write_exactly_and_leave_nothing_beside(tmp_path, write, obj, expected):
    dest = tmp_path / "sub" / "out"  # a missing parent folder is created
    assert write(dest, obj) == dest
    assert dest.read_bytes() == expected
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out"]


def test_written_files_get_the_usual_permissions(tmp_path):
    """mkstemp creates 0600; an output gets 0666 less the umask, like any file the user creates."""
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_replaces_the_folder_whole(tmp_path):
    dest = tmp_path / "store"
    dest.mkdir()
    (dest / "old.npy").write_bytes(b"old")
    with atomic_dir(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest and list(tmp.iterdir()) == []
        (tmp / "new.npy").write_bytes(b"new")
        assert (dest / "old.npy").read_bytes() == b"old"  # still the old folder until the block ends
    assert sorted(p.name for p in dest.iterdir()) == ["new.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "store"
    dest.mkdir()
    (dest / "old.npy").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "new.npy").write_bytes(b"half")
        raise RuntimeError("died mid-write")
    assert sorted(p.name for p in dest.iterdir()) == ["old.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_unwritable_destination_is_an_output_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=re.escape(f"cannot write {blocker / 'out.json'}")) as info:
        write_json(blocker / "out.json", {})
    assert isinstance(info.value, LggsegError)  # the CLI and stages turn it into one line and exit 2
    assert blocker.read_text() == "not a folder"


# --------------------------------------------------------------------------- failures mid-write


def test_failure_inside_an_atomic_write_leaves_no_file(tmp_path):
    dest = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text('{"dice": 0.8')  # half written
        raise RuntimeError("died mid-write")
    assert list(tmp_path.iterdir()) == []
    dest.write_bytes(MARKER)
    with pytest.raises(ValueError):
        write_json(dest, {"dice": float("nan")})  # refused before anything is written
    assert dest.read_bytes() == MARKER and list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_full_disk_in_atomic_writers(tmp_path, monkeypatch, where):
    dest = tmp_path / "out.bin"
    dest.write_bytes(MARKER)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lggseg.io.os, where, no_space)
    with pytest.raises(OutputError, match=rf"cannot write {dest}: No space left on device"):
        write_bytes(dest, b"new content" * 1000)
    monkeypatch.undo()
    assert dest.read_bytes() == MARKER and sorted(tmp_path.iterdir()) == [dest]


def test_full_disk_in_atomic_dir_keeps_the_old_folder(tmp_path, monkeypatch):
    dest = previous_output(tmp_path / "store")
    before = tree_state(dest)
    real_replace = os.replace

    def no_space(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(lggseg.io.os, "replace", no_space)
    with pytest.raises(OutputError, match="No space left on device"), atomic_dir(dest) as tmp:
        (tmp / "images.npy").write_bytes(b"x" * 100)
    monkeypatch.undo()
    # the old folder was moved aside before the failed rename: it must be back (or never moved)
    assert dest.is_dir(), "atomic_dir lost the previous output when the final rename failed"
    assert_untouched(dest, before)


KILLED_WRITER = """
import os, signal, sys
import lggseg.io as io
def die(fd):
    os.kill(os.getpid(), signal.SIGKILL)
io.os.fsync = die
io.write_bytes(sys.argv[1], b"x" * 10_000_000)
"""


def test_writer_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    dest = tmp_path / "model.safetensors"
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(dest)], capture_output=True, env=ENV)
    assert res.returncode == -signal.SIGKILL
    assert not dest.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".model.safetensors.") and n.endswith(".tmp") for n in leftovers), leftovers


# --------------------------------------------------------------------------- through lggseg predict: unwritable output, full disk, SIGKILL


def test_output_under_a_regular_file(capsys, raw, attr_model, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, err = run_predict(capsys, attr_model, raw, out)
    assert code == 2 and str(out) in err and f"{blocker} is a file, not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_full_disk_at_the_final_rename(capsys, raw, attr_model, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    before = tree_state(out)

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lggseg.io.os, "replace", no_space)
    code, err = run_predict(capsys, attr_model, case_dir(raw), out)
    monkeypatch.undo()
    assert code == 2 and str(out) in err and "No space left on device" in err
    assert_untouched(out, before)


def test_full_disk_while_writing_images(capsys, raw, attr_model, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    real_save = Image.Image.save
    calls = []

    def fill_up(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) > 7:  # a few files in, as a disk would fill
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", fill_up)
    code, err = run_predict(capsys, attr_model, raw, out)
    monkeypatch.undo()
    assert code == 2 and str(out) in err and "No space left on device" in err, err
    assert_untouched(out, before)


KILLED_PREDICT = """
import os, signal, sys
import lggseg.predict as P
calls = []
real = P._save_png
def save(path, array):
    calls.append(path)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, array)
P._save_png = save
sys.exit(P.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_predict_killed_mid_run_leaves_previous_output(raw, attr_model, tmp_path):
    out = previous_output(tmp_path / "out")
    before = tree_state(out)
    args = ["--model", str(attr_model), "--input", str(raw), "--output", str(out), "--batch-size", "2"]
    res = subprocess.run([sys.executable, "-c", KILLED_PREDICT, *args], capture_output=True, env=ENV)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert tree_state(out) == before
    # a killed process cannot clean up: only a hidden temporary folder may remain, never a complete-looking DIR
    strays = [p for p in out.parent.iterdir() if p.name.startswith(".out.")]
    assert all(p.name.endswith(".tmp") and not (p / "summary.csv").exists() for p in strays)


A, B = "a" * 40, "b" * 40


@pytest.mark.parametrize(("provenance", "expected"), [
    ({"git_commit": A, "project": {"commit": B, "uncommitted_changes": False, "workspace": True}},
     ("bbbbbbbbbb", "commit")),
    ({"git_commit": A, "project": {"commit": B, "uncommitted_changes": True, "workspace": True}},
     ("bbbbbbbbbb+uncommitted", "commit")),
    ({"git_commit": A, "project": {"commit": None, "uncommitted_changes": None, "workspace": True}},
     ("aaaaaaaaaa", "workspace commit")),  # origin unknown: the workspace's own commit, named as such
    ({"git_commit": A, "project": {"commit": A, "uncommitted_changes": None, "workspace": False}},
     ("aaaaaaaaaa", "commit")),  # not in a workspace: HEAD is the project
    ({"git_commit": A}, ("aaaaaaaaaa", "commit")),  # written before the project block existed
    ({"git_commit": None}, (None, "commit")),
    ({}, (None, "commit")),
])
def test_project_commit_names_the_code_that_ran(provenance, expected):
    assert project_commit(provenance) == expected
