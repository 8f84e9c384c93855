"""safe_extract_zip: extracts what it should, refuses escaping members, and leaves nothing on error; the
fetch stage refuses unsafe zips with exit 2 and its previous data untouched."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest
import yaml

from helpers import MARKER, assert_untouched, load_stage
from lggseg.data.archive import safe_extract_zip
from lggseg.errors import FetchError
from test_predict import tree_state


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _make_zip(path, members):
    """members: list of (name, bytes) for files or (name, '->target') for symlinks."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members:
            if isinstance(content, str) and content.startswith("->"):
                zf.writestr(_symlink_info(name), content[2:])
            else:
                zf.writestr(name, content)
    return path


def _leftovers(parent, keep):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_extracts_everything(tmp_path):
    z = _make_zip(tmp_path / "a.zip", [("top.txt", b"1"), ("d/e/f.bin", b"\x00\x01"), ("d/", b"")])
    out = safe_extract_zip(z, tmp_path / "out")
    assert (out / "top.txt").read_bytes() == b"1"
    assert (out / "d/e/f.bin").read_bytes() == b"\x00\x01"


def test_member_prefix_takes_one_copy_and_strips_it(tmp_path):
    z = _make_zip(
        tmp_path / "k.zip",
        [("kaggle_3m/data.csv", b"a"), ("kaggle_3m/C/x.tif", b"b"), ("lgg-mri-segmentation/kaggle_3m/data.csv", b"dup")],
    )
    out = safe_extract_zip(z, tmp_path / "out", member_prefix="kaggle_3m")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["C/x.tif", "data.csv"]
    assert (out / "data.csv").read_bytes() == b"a"


def test_replaces_existing_destination_whole(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    safe_extract_zip(_make_zip(tmp_path / "a.zip", [("new.txt", b"n")]), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]


def test_inside_symlink_is_kept(tmp_path):
    z = _make_zip(tmp_path / "s.zip", [("real/f.txt", b"x"), ("link", "->real/f.txt")])
    out = safe_extract_zip(z, tmp_path / "out")
    assert (out / "link").is_symlink() and (out / "link").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ([("ok.txt", b"1"), ("/abs/evil.txt", b"x")], "absolute path"),
        ([("ok.txt", b"1"), ("../evil.txt", b"x")], "'..'"),
        ([("ok.txt", b"1"), ("a/../../evil.txt", b"x")], "'..'"),
        ([("ok.txt", b"1"), ("..\\evil.txt", b"x")], "'..'"),
        ([("ok.txt", b"1"), ("C:/evil.txt", b"x")], "absolute path"),
        ([("ok.txt", b"1"), ("link", "->/etc/passwd")], "escapes"),
        ([("ok.txt", b"1"), ("sub/link", "->../../outside")], "escapes"),
        ([("ok.txt", b"1"), ("here", "->."), ("here/link2", "->..")], "through a symlink"),
        ([("ok.txt", b"1"), ("dot", "->."), ("up", "->dot/../..")], "escapes"),
        ([("ok.txt", b"1"), ("d", "->."), ("e", "->d/.."), ("f", "->e/x")], "escapes"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "backslash-dotdot", "drive", "symlink-abs", "symlink-up", "through-link", "chain-lexical", "chain-os"],
)
def test_malicious_archives_are_refused_and_leave_nothing(tmp_path, members, needle):
    work = tmp_path / "work"
    work.mkdir()
    z = _make_zip(tmp_path / "evil.zip", members)
    with pytest.raises(FetchError, match="refusing") as err:
        safe_extract_zip(z, work / "out")
    assert needle in str(err.value) and "evil.zip" in str(err.value)
    assert _leftovers(work, keep=set()) == []  # neither the target nor a temporary folder
    assert _leftovers(tmp_path, keep={"work", "evil.zip"}) == []
    assert not (tmp_path / "outside").exists()


def test_failure_keeps_previous_destination(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    z = _make_zip(tmp_path / "evil.zip", [("a.txt", b"1"), ("../evil", b"x")])
    with pytest.raises(FetchError):
        safe_extract_zip(z, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip", "out"]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_bytes(b"this is not a zip"), "not a readable zip"),
        (lambda p: None, "not found"),
        (lambda p: _make_zip(p, [("other/x.txt", b"1")]), "no files under 'kaggle_3m'"),
    ],
    ids=["garbage", "missing", "empty-selection"],
)
def test_bad_archives(tmp_path, make, needle):
    z = tmp_path / "x.zip"
    make(z)
    with pytest.raises(FetchError, match=needle):
        safe_extract_zip(z, tmp_path / "out", member_prefix="kaggle_3m")
    assert not (tmp_path / "out").exists()


def test_corrupt_member_is_reported(tmp_path):
    z = _make_zip(tmp_path / "c.zip", [("data.bin", b"A" * 5000)])
    raw = bytearray(z.read_bytes())
    pos = raw.find(b"A" * 100)  # stored uncompressed: flip payload bytes so the CRC fails
    raw[pos : pos + 10] = b"B" * 10
    z.write_bytes(bytes(raw))
    with pytest.raises(FetchError, match="corrupt"):
        safe_extract_zip(z, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zip"]


# --------------------------------------------------------------------------- through the fetch stage


def _zip(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """``(name, bytes)`` files and ``(name, "->target")`` symlinks, plus a plausible data.csv."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("kaggle_3m/data.csv", "Patient,RNASeqCluster\nTCGA_AA_0001,1\n")
        for name, content in members:
            if isinstance(content, str):
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, content.removeprefix("->"))
            else:
                zf.writestr(name, content)
    return path


@pytest.mark.parametrize(("members", "needle"), [
    ([("kaggle_3m/../../escaped.txt", b"x")], "'..' in path"),
    ([("/tmp/lggseg_absolute_escape.txt", b"x")], "absolute path"),
    ([("kaggle_3m/link", "->../../../etc")], "target escapes the destination"),
    ([("kaggle_3m/link", "->/etc/passwd")], "target escapes the destination"),
    ([("kaggle_3m/dir", "->."), ("kaggle_3m/dir/../../x.txt", b"x")], "kaggle_3m/dir/../../x.txt"),
])
def test_fetch_stage_refuses_unsafe_zips(capsys, tmp_path, members, needle):
    archive = _zip(tmp_path / "lgg.zip", members)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": {"source": str(archive)}}))
    raw = tmp_path / "data" / "raw"
    (raw / "kaggle_3m").mkdir(parents=True)
    (raw / "kaggle_3m" / "data.csv").write_bytes(MARKER)
    (raw / "fingerprint.json").write_bytes(MARKER)
    before = tree_state(raw)
    code = load_stage("fetch").main(
        ["--params", str(tmp_path / "params.yaml"), "--out", str(raw), "--fingerprint", str(tmp_path / "fetch.json")]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(archive) in err and needle in err, err
    assert_untouched(raw, before)
    assert not (tmp_path / "fetch.json").exists()
    assert not Path("/tmp/lggseg_absolute_escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "lgg.zip", "params.yaml"]
