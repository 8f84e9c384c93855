"""params.yaml sections load into validated dataclasses; nonsense is rejected before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import assert_untouched, load_stage, previous_output
from lggseg.config import (
    ConfigError,
    LossConfig,
    deep_merge,
    load_section,
    read_params,
    resolve_variant,
    run_config_from_dict,
    validate_all,
)
from test_predict import tree_state

REPO = Path(__file__).resolve().parents[2]


def test_committed_params_validate():
    runs = validate_all(read_params(REPO / "params.yaml"))
    assert "regnet_attr_bce_dice_outlier" in runs
    assert runs["regnet_attr_bce_dice_outlier"].loss.terms == ("bce", "dice", "outlier")
    assert runs["regnet_bce"].model.attributes is False


def test_demo_overrides_validate():
    merged = deep_merge(read_params(REPO / "params.yaml"), read_params(REPO / "params.demo.yaml"))
    runs = validate_all(merged)
    assert all(r.common.image_size == 64 for r in runs.values())
    assert load_section("fetch", merged).kind == "demo"


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("loss", {"i": 21, "j": 7}, "smaller than loss.j"),
        ("loss", {"i": 7, "j": 7}, "smaller than loss.j"),
        ("loss", {"i": 6}, "odd"),
        ("loss", {"j": 20}, "odd"),
        ("loss", {"i": 0}, "positive odd"),
        ("loss", {"i": -3}, "positive odd"),
        ("loss", {"alpha": -1.0}, "non-negative"),
        ("loss", {"gamma": float("nan")}, "loss.gamma must be a number"),
        ("loss", {"terms": ["bce", "focal"]}, "unknown term"),
        ("loss", {"terms": ["bce"], "alpha": 0.0}, "constant"),
        ("loss", {"threshold_rounding": "round"}, "floor or ceil"),
        ("loss", {"terms": ["bce", "outlier"], "i": 7, "j": 9}, "must exceed the eq. 8 threshold"),
        ("manifest", {"split_fractions": [0.7, 0.2, 0.2]}, "sum to 1"),
        ("manifest", {"split_fractions": [0.8, 0.2]}, "3 positive"),
        ("manifest", {"split_unit": "case"}, "patient or slice"),
        ("common", {"image_size": 250}, "multiple of 16"),
        ("common", {"image_size": 0}, "multiple of 16"),
        ("common", {"device": "tpu"}, "auto, cpu or cuda"),
        ("train", {"epochs": 0}, "positive"),
        ("train", {"lr": 0}, "positive"),
        ("train", {"batch_size": 2.5}, "integer"),
        ("train", {"augment": {"channel_dropout_p": 1.5}}, "probability"),
        ("train", {"data_path": "gpu"}, "train.data_path must be one of"),
        ("train", {"checkpoint_every": 0}, "train.checkpoint_every must be a positive integer"),
        ("train", {"checkpoint_every": 1.5}, "integer"),
        ("train", {"fused_adam": "yes"}, "train.fused_adam must be true or false"),
        ("postprocess", {"min_area": -1}, ">= 0"),
        ("evaluate", {"threshold": 1.0}, "(0, 1)"),
        ("evaluate", {"split": "train"}, "evaluate.split must be val or test"),
        ("model", {"arch": "fpn"}, "model.arch"),
        ("model", {"atrous_rates": [6, 12]}, "three positive"),
        ("model", {"arch": "unet", "attributes": True}, "needs arch deeplabv3plus"),
        ("common", {"sed": 1}, "unknown key"),
    ],
)
def test_nonsense_is_rejected(section, values, message):
    params = read_params(REPO / "params.yaml")
    params[section] = deep_merge(params.get(section) or {}, values)
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_section(section, params)


@pytest.mark.parametrize(("i", "rounding", "expected"), [(7, "ceil", 33), (7, "floor", 40), (5, "ceil", 16), (5, "floor", 21)])
def test_outlier_threshold_eq8(i, rounding, expected):
    assert LossConfig(terms=("outlier",), i=i, j=21, threshold_rounding=rounding).threshold == expected


@pytest.mark.parametrize(
    ("fractions", "needle"),
    [((1.0, None), "gamma_warmup_fraction"), ((-0.1, None), "gamma_warmup_fraction"), ((None, 1), "gamma_ramp_fraction"),
     ((0.5, 0.5), "below 1"), ((0.7, 0.4), "below 1"), ((None, "half"), "gamma_ramp_fraction")],
)
def test_gamma_fractions_reject_nonsense(fractions, needle):
    with pytest.raises(ConfigError, match=needle):
        LossConfig(terms=("bce", "outlier"), gamma_warmup_fraction=fractions[0], gamma_ramp_fraction=fractions[1])


def test_gamma_fractions_appear_in_a_config_only_when_set():
    """Configs and fingerprints of runs without the fractions stay as written before they existed."""
    params = read_params(REPO / "params.yaml")
    run = resolve_variant(params, "regnet_attr_bce_dice_outlier")
    assert "gamma_warmup_fraction" not in run.to_dict()["loss"] and run_config_from_dict(run.to_dict()) == run
    params["loss"] = {**params["loss"], "gamma_warmup_fraction": 0.2, "gamma_ramp_fraction": 0.3}
    run = resolve_variant(params, "regnet_attr_bce_dice_outlier")
    assert (run.to_dict()["loss"]["gamma_warmup_fraction"], run.to_dict()["loss"]["gamma_ramp_fraction"]) == (0.2, 0.3)
    assert run_config_from_dict(run.to_dict()) == run


def test_variant_overrides_merge_and_roundtrip():
    params = read_params(REPO / "params.yaml")
    run = resolve_variant(params, "regnet_attr_bce_dice_isolated")
    assert run.loss.outlier_mode == "isolated_bce"
    assert run.loss.i == params["loss"]["i"]
    assert run_config_from_dict(run.to_dict()) == run


@pytest.mark.parametrize(("global_seeds", "own", "expected"), [
    ([23], None, (23,)),                 # no own list: the global one
    ([23], [23, 24, 25], (23, 24, 25)),  # the noise-floor variant's own list replaces it
    ([1, 2], [7], (7,)),
])
def test_a_variant_may_have_its_own_seeds(global_seeds, own, expected):
    params = read_params(REPO / "params.yaml")
    params["seeds"] = global_seeds
    if own is not None:
        params["variants"]["regnet_attr_bce_dice"]["seeds"] = own
    assert resolve_variant(params, "regnet_attr_bce_dice").seeds == expected
    assert resolve_variant(params, "regnet_bce").seeds == tuple(global_seeds)


@pytest.mark.parametrize("own", [23, [23, 23], [-1], "23"])
def test_a_variants_own_seeds_are_validated(own):
    params = read_params(REPO / "params.yaml")
    params["variants"]["regnet_attr_bce_dice"]["seeds"] = own
    with pytest.raises(ConfigError, match="seeds"):
        resolve_variant(params, "regnet_attr_bce_dice")


def test_unknown_variant_and_keys():
    params = read_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match="unknown variant"):
        resolve_variant(params, "nope")
    params["variants"]["bad"] = {"modle": {}}
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_variant(params, "bad")


def test_read_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_params(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_params(tmp_path / "bad.yaml")


# --------------------------------------------------------------------------- defaults = params.yaml (issue #12)


def test_dataclass_defaults_equal_params_yaml():
    """Each section's dataclass defaults are params.yaml's values, and params.yaml names every key."""
    import dataclasses

    from lggseg.config import SECTIONS, load_section, read_params

    def keys_match(data, cls, where):
        assert set(data) == {f.name for f in dataclasses.fields(cls)}, where
        for f in dataclasses.fields(cls):  # nested sections (train.augment)
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                keys_match(data[f.name], f.default_factory, f"{where}.{f.name}")

    params = read_params(Path(__file__).resolve().parents[2] / "params.yaml")
    for name, cls in SECTIONS.items():
        keys_match(params[name], cls, name)
        assert load_section(name, params) == cls(), name


def test_the_papers_seven_is_loss_i_and_the_rest_derives_from_it():
    from lggseg.config import EvaluateConfig, LossConfig, PostprocessConfig, load_section, read_params

    params = read_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert params["postprocess"]["min_area"] is None and params["evaluate"]["noise_side"] is None
    assert LossConfig().i == 7 and PostprocessConfig().min_area == 49 and EvaluateConfig().noise_side == 7
    nine = {**params, "loss": {**params["loss"], "i": 9, "j": 23}}
    assert load_section("postprocess", nine).min_area == 81 and load_section("evaluate", nine).noise_side == 9
    explicit = {**nine, "postprocess": {"min_area": 49}}  # an explicit value wins (params.laptop.yaml)
    assert load_section("postprocess", explicit).min_area == 49
    for text in ("plotting.py", "report.py", "evaluate.py"):  # no restated 7 or 49 in the code that uses them
        src = next((Path(__file__).resolve().parents[2] / "src" / "lggseg").rglob(text)).read_text()
        assert "SMALL_SIDE" not in src and "= 49" not in src, text


# --------------------------------------------------------------------------- through the stages: refused before any work


BAD_PARAMS = [
    ({"loss": {"i": 21, "j": 7}}, "loss.i must be smaller than loss.j"),
    ({"loss": {"i": 7, "j": 7}}, "loss.i must be smaller than loss.j"),
    ({"loss": {"i": 6}}, "loss.i must be a positive odd integer"),
    ({"loss": {"j": 20}}, "loss.j must be a positive odd integer"),
    ({"loss": {"i": -3}}, "loss.i must be a positive odd integer"),
    ({"loss": {"i": 0}}, "loss.i must be a positive odd integer"),
    ({"loss": {"alpha": -1.0}}, "loss.alpha must be a non-negative number"),
    ({"loss": {"gamma": -0.5}}, "loss.gamma must be a non-negative number"),
    ({"manifest": {"split_fractions": [0.7, 0.2, 0.2]}}, "manifest.split_fractions must sum to 1"),
    ({"manifest": {"split_fractions": [0.9, 0.1, 0.0]}}, "manifest.split_fractions must be 3 positive numbers"),
    ({"common": {"image_size": 200}}, "common.image_size must be a positive multiple of 16"),
    ({"common": {"image_size": 0}}, "common.image_size must be a positive multiple of 16"),
]


def _bad_params(tmp_path: Path, override: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(read_params(REPO / "params.yaml"), override), sort_keys=False))
    return path


@pytest.mark.parametrize(("override", "needle"), BAD_PARAMS)
def test_configure_stage_rejects_nonsense(capsys, tmp_path, override, needle):
    configs = previous_output(tmp_path / "configs")
    before = tree_state(configs)
    code = load_stage("configure").main(["--params", str(_bad_params(tmp_path, override)), "--out", str(configs)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.startswith("configure: ") and err.count("\n") == 1
    assert_untouched(configs, before)


@pytest.mark.parametrize(("override", "needle"), [p for p in BAD_PARAMS if set(p[0]) & {"manifest", "common"}])
def test_manifest_stage_rejects_nonsense_before_reading_data(capsys, tmp_path, manifest_stage, override, needle):
    store = previous_output(tmp_path / "manifest")
    before = tree_state(store)
    # the raw folder does not exist: the params error must come first, before any data is touched
    args = ["--params", str(_bad_params(tmp_path, override)), "--raw", str(tmp_path / "no_such_raw"),
            "--out", str(store), "--summary", str(tmp_path / "data.json")]
    code = manifest_stage.main(args)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "no_such_raw" not in err
    assert_untouched(store, before)
    assert not (tmp_path / "data.json").exists()


@pytest.mark.parametrize(("override", "needle"), [BAD_PARAMS[0], BAD_PARAMS[2], BAD_PARAMS[6], BAD_PARAMS[10]])
def test_train_stage_rejects_an_edited_config(capsys, tmp_path, override, needle):
    good = resolve_variant(read_params(REPO / "params.yaml"), "regnet_attr_bce_dice_outlier").to_dict()
    good["common"] = {**good["common"], **override.get("common", {})}
    good["loss"] = {**good["loss"], **override.get("loss", {})}
    cfg = tmp_path / "regnet_attr_bce_dice_outlier.yaml"
    cfg.write_text(yaml.safe_dump(good, sort_keys=False))
    models = tmp_path / "models"
    args = ["--variant", "regnet_attr_bce_dice_outlier", "--config", str(cfg), "--data", str(tmp_path / "none"), "--out", str(models)]
    code = load_stage("train").main(args)
    assert code == 2 and needle in capsys.readouterr().err
    assert not models.exists()

