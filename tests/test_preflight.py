"""``lggseg preflight``: a line per variant (OK with step time and peak memory, or FAIL with the error),
exit 0 only when all pass, a broken variant does not stop the others, bad arguments stop at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lggseg.cli import main as cli_main
from lggseg.config import read_params
from lggseg.preflight import main

REPO = Path(__file__).resolve().parents[1]
SMALL = {"encoder": "test_efficientnet", "pretrained": True, "decoder_channels": 32, "attribute_hidden": 16}


def _params(tmp_path: Path, variants: dict) -> Path:
    """params.yaml with tiny encoders (``pretrained: true`` on purpose: preflight must switch it off)."""
    params = read_params(REPO / "params.yaml")
    params["common"]["device"] = "cpu"
    params["model"].update(SMALL)
    params["train"].update({"cpu_threads": 1})
    params["variants"] = variants
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))  # keep the variants in their order
    return path


TINY = {
    "attr_outlier": {"loss": {"terms": ["bce", "dice", "outlier"]}},
    "plain_isolated": {"model": {"attributes": False}, "loss": {"terms": ["bce", "outlier"], "outlier_mode": "isolated_bce"}},
}


def test_all_variants_pass(tmp_path, capsys):
    path = _params(tmp_path, TINY)
    assert main(["--params", str(path), "--image-size", "64", "--batch-size", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "random init (model.pretrained forced off)" in out[0] and "peak RSS" in out[0] and "64 px" in out[0]
    assert len(out) == 3
    for line, name in zip(out[1:], TINY, strict=True):
        assert re.fullmatch(rf"OK   {name} +step \d+\.\d{{3}} s  peak -?\d+ MiB", line), line


def test_a_broken_variant_fails_alone_with_exit_2(tmp_path, capsys):
    variants = {"broken": {"model": {"encoder": "no_such_encoder_xyz"}}, **TINY}
    path = _params(tmp_path, variants)
    code = cli_main(["preflight", "--params", str(path), "--image-size", "64", "--batch-size", "2", "--steps", "1",
                     "--variants", "broken,attr_outlier"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.out.splitlines()[1:]
    assert lines[0].startswith("FAIL broken") and "no_such_encoder_xyz" in lines[0]
    assert lines[1].startswith("OK   attr_outlier")  # still run after the failure
    assert "1 of 2 variant(s) failed: broken" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "nope"], "unknown variant 'nope'"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--image-size", "50"], "multiple of 16"),
    ],
)
def test_bad_arguments_stop_before_any_model(tmp_path, capsys, argv, message):
    path = _params(tmp_path, TINY)
    assert main(["--params", str(path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1


def test_unet_at_a_size_not_divisible_by_32_fails_alone(tmp_path, capsys):
    path = _params(tmp_path, {"unet": {"model": {"arch": "unet", "encoder": "test_efficientnet", "attributes": False}},
                              **TINY})
    assert main(["--params", str(path), "--image-size", "48", "--batch-size", "2", "--steps", "1"]) == 2
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].startswith("FAIL unet") and "divisible by 32" in lines[0]
    assert all(line.startswith("OK") for line in lines[1:]) and len(lines) == 3


@pytest.mark.slow
def test_every_variant_of_params_yaml_runs_on_cpu_at_64px(capsys):
    code = main(["--params", str(REPO / "params.yaml"), "--device", "cpu", "--image-size", "64", "--batch-size", "2",
                 "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sum(line.startswith("OK ") for line in out.splitlines()) == 12
