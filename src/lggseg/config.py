"""Typed, validated views of ``params.yaml``.

Every section of ``params.yaml`` loads into a frozen dataclass whose ``__post_init__``
rejects nonsense (``ConfigError``) before any work starts: an even outlier window, i >= j,
negative loss weights, split fractions that do not sum to 1, an image size not divisible
by 16, and so on. Stage scripts never read raw dictionaries.

Training variants (paper Tables 2-4) are data: ``variants.<name>`` holds overrides of the
``model``, ``loss`` and ``train`` sections. :func:`resolve_variant` merges them into a
:class:`RunConfig`, which the ``configure`` stage writes to ``configs/<name>.yaml``. Each
``train@<name>`` stage depends on that file only, so ``dvc exp run -S loss.gamma=0.5``
re-trains exactly the variants whose resolved configuration changes (the ones whose
loss uses the outlier term) and leaves the rest cached.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

CLUSTER_COLUMNS = (
    "RNASeqCluster",
    "MethylationCluster",
    "miRNACluster",
    "CNCluster",
    "RPPACluster",
    "OncosignCluster",
    "COCCluster",
)
"""The seven genomic cluster columns of the dataset's ``data.csv`` (paper Table 1, section 3.2.2)."""

KAGGLE_DATASET = "mateuszbuda/lgg-mri-segmentation"
LOSS_TERMS = ("bce", "dice", "outlier")
ARCHS = ("deeplabv3plus", "unet")
LR_SCHEDULES = ("constant", "cosine")
DATA_PATHS = ("auto", "loader", "resident")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """A parameter makes no sense; raised before any work starts."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(float(x))


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class CommonConfig:
    """Settings shared by every stage."""

    seed: int = 23
    image_size: int = 256
    attribute_columns: tuple[str, ...] = CLUSTER_COLUMNS
    use_position: bool = True
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _require(_is_int(self.seed) and self.seed >= 0, f"common.seed must be a non-negative integer, got {self.seed!r}")
        _require(
            _is_int(self.image_size) and self.image_size >= 32 and self.image_size % 16 == 0,
            f"common.image_size must be a positive multiple of 16 (>= 32), got {self.image_size!r}",
        )
        _require(len(set(self.attribute_columns)) == len(self.attribute_columns), "common.attribute_columns has duplicates")
        _require(self.device in ("auto", "cpu", "cuda"), f"common.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class FetchConfig:
    """Where the raw data comes from: ``kaggle``, ``demo``, or a local ``kaggle_3m/`` dir or zip."""

    source: str = "kaggle"
    kaggle_dataset: str = KAGGLE_DATASET
    demo_cases: int = 16
    demo_seed: int = 23

    def __post_init__(self) -> None:
        _require(isinstance(self.source, str) and self.source.strip() != "", "fetch.source must be 'kaggle', 'demo' or a path")
        _require("/" in self.kaggle_dataset, f"fetch.kaggle_dataset must be 'owner/name', got {self.kaggle_dataset!r}")
        _require(_is_int(self.demo_cases) and self.demo_cases >= 3, "fetch.demo_cases must be an integer >= 3 (one per split)")
        _require(_is_int(self.demo_seed) and self.demo_seed >= 0, "fetch.demo_seed must be a non-negative integer")

    @property
    def kind(self) -> str:
        """``kaggle``, ``demo`` or ``local``."""
        return self.source if self.source in ("kaggle", "demo") else "local"


@dataclass(frozen=True)
class ManifestConfig:
    """Per-slice manifest and the train/val/test split (paper section 4.1.3: 70/15/15, seed 23)."""

    split_unit: str = "patient"  # patient | slice (slice only to measure leakage)
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 23

    def __post_init__(self) -> None:
        _require(self.split_unit in ("patient", "slice"), f"manifest.split_unit must be patient or slice, got {self.split_unit!r}")
        fr = self.split_fractions
        _require(len(fr) == 3 and all(_is_num(f) and f > 0 for f in fr), f"manifest.split_fractions must be 3 positive numbers, got {fr!r}")
        _require(abs(sum(fr) - 1.0) < 1e-6, f"manifest.split_fractions must sum to 1, got {sum(fr):.4f}")
        _require(_is_int(self.split_seed) and self.split_seed >= 0, "manifest.split_seed must be a non-negative integer")


@dataclass(frozen=True)
class ModelConfig:
    """Segmentation network (paper section 3.1-3.3)."""

    arch: str = "deeplabv3plus"  # deeplabv3plus | unet
    encoder: str = "regnetz_040"  # a timm model name (used through smp's ``tu-`` prefix)
    attributes: bool = True  # attribute encoder of section 3.2.2
    attribute_hidden: int = 128
    attribute_channels: int = 3
    output_stride: int = 16
    atrous_rates: tuple[int, int, int] = (6, 12, 18)
    decoder_channels: int = 256
    pretrained: bool = False
    weights_file: str | None = None

    def __post_init__(self) -> None:
        _require(self.arch in ARCHS, f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        _require(isinstance(self.encoder, str) and self.encoder != "", "model.encoder must be a timm model name")
        _require(_is_int(self.attribute_hidden) and self.attribute_hidden > 0, "model.attribute_hidden must be a positive integer")
        _require(_is_int(self.attribute_channels) and self.attribute_channels > 0, "model.attribute_channels must be positive")
        _require(self.output_stride in (8, 16), f"model.output_stride must be 8 or 16, got {self.output_stride!r}")
        _require(
            len(self.atrous_rates) == 3 and all(_is_int(r) and r > 0 for r in self.atrous_rates),
            f"model.atrous_rates must be three positive integers, got {self.atrous_rates!r}",
        )
        _require(_is_int(self.decoder_channels) and self.decoder_channels > 0, "model.decoder_channels must be positive")
        _require(not (self.attributes and self.arch != "deeplabv3plus"), "model.attributes needs arch deeplabv3plus")


@dataclass(frozen=True)
class LossConfig:
    """Compound loss of eq. 13: alpha*BCE + beta*Dice + gamma*Outlier (see ``lggseg.losses``)."""

    terms: tuple[str, ...] = ("bce",)
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    i: int = 7
    j: int = 21
    smooth: float = 1.0
    threshold_rounding: str = "ceil"  # eq. 8: ceil -> 33 for i=7 (as printed; Fig. 5 corner case), floor -> 40 (the text's "round-down")
    counts: str = "soft"  # soft probabilities | hard Round(X) (no gradient through the density)
    outlier_mode: str = "paper"  # paper (eqs. 4-12 literally) | isolated_bce (our variant)
    reduction: str = "mean"  # mean | sum over pixels
    gamma_warmup_epochs: int = 0  # epochs with gamma = 0
    gamma_ramp_epochs: int = 0  # then a linear ramp up to gamma over this many epochs

    def __post_init__(self) -> None:
        _require(len(self.terms) > 0, "loss.terms must name at least one of bce, dice, outlier")
        for t in self.terms:
            _require(t in LOSS_TERMS, f"loss.terms: unknown term {t!r} (choose from {LOSS_TERMS})")
        _require(len(set(self.terms)) == len(self.terms), "loss.terms has duplicates")
        for name in ("alpha", "beta", "gamma", "smooth"):
            v = getattr(self, name)
            _require(_is_num(v) and v >= 0, f"loss.{name} must be a non-negative number, got {v!r}")
        _require(
            any(self.weight(t) > 0 for t in self.terms), "loss: every weight of the used terms is 0, so the loss is constant"
        )
        _require(_is_int(self.i) and self.i > 0 and self.i % 2 == 1, f"loss.i must be a positive odd integer, got {self.i!r}")
        _require(_is_int(self.j) and self.j > 0 and self.j % 2 == 1, f"loss.j must be a positive odd integer, got {self.j!r}")
        _require(self.i < self.j, f"loss.i must be smaller than loss.j, got i={self.i}, j={self.j}")
        _require(self.threshold_rounding in ("floor", "ceil"), "loss.threshold_rounding must be floor or ceil")
        _require(self.counts in ("soft", "hard"), "loss.counts must be soft or hard")
        _require(self.outlier_mode in ("paper", "isolated_bce"), "loss.outlier_mode must be paper or isolated_bce")
        _require(self.reduction in ("mean", "sum"), "loss.reduction must be mean or sum")
        if "outlier" in self.terms and self.outlier_mode == "paper":
            # Otherwise every white pixel, even deep inside a large object, passes the mask of eq. 9.
            ring = self.j * self.j - self.i * self.i
            _require(
                ring > self.threshold,
                f"loss: the outlier ring j^2 - i^2 = {ring} (i={self.i}, j={self.j}) must exceed the eq. 8 "
                f"threshold {self.threshold}; choose a larger j",
            )
        for name in ("gamma_warmup_epochs", "gamma_ramp_epochs"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 0, f"loss.{name} must be a non-negative integer, got {v!r}")

    def weight(self, term: str) -> float:
        return {"bce": self.alpha, "dice": self.beta, "outlier": self.gamma}[term]

    def gamma_at(self, epoch: int) -> float:
        """Outlier weight at 0-based ``epoch``: 0 during warm-up, then a linear ramp to ``gamma``."""
        if epoch < self.gamma_warmup_epochs:
            return 0.0
        if self.gamma_ramp_epochs == 0:
            return float(self.gamma)
        done = epoch - self.gamma_warmup_epochs + 1
        return float(self.gamma) * min(1.0, done / self.gamma_ramp_epochs)

    @property
    def threshold(self) -> int:
        """Eq. 8: i^2 - round(i/2)^2, rounding chosen by ``threshold_rounding``."""
        half = math.floor(self.i / 2) if self.threshold_rounding == "floor" else math.ceil(self.i / 2)
        return self.i * self.i - half * half


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (paper section 4.1.3: random channel dropout, brightness/contrast/saturation)."""

    channel_dropout_p: float = 0.2
    color_jitter_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    extra: bool = False  # flips and small affine transforms; not in the paper
    # Not in the paper: with this probability a slice is shown as if pre-contrast, post-contrast or both
    # had not been acquired, encoded the way the Kaggle data encodes a missing sequence (a copy of FLAIR;
    # 8 of the 94 cases in our copy). See lggseg.dataset.MISSING_SEQUENCE_PATTERNS.
    missing_sequence_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("channel_dropout_p", "color_jitter_p", "missing_sequence_p"):
            v = getattr(self, name)
            _require(_is_num(v) and 0 <= v <= 1, f"train.augment.{name} must be a probability, got {v!r}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            _require(_is_num(v) and 0 <= v < 1, f"train.augment.{name} must be in [0, 1), got {v!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (paper section 4.1.3: Adam, lr 1e-3, seed 23)."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_workers: int = 2
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX)
    channels_last: bool = True  # on CUDA; on CPU together with bf16 only (see lggseg.train.step_setup)
    compile: bool = False  # torch.compile on CUDA
    cpu_threads: int = 0  # 0: leave torch's default
    log_every: int = 20  # steps between host syncs for logging
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Not in the paper (constant lr 1e-3): a cosine decay to 0 over the planned steps, after a linear
    # warm-up of ``warmup_epochs`` (may be fractional). See lggseg.train.lr_factor.
    lr_schedule: str = "constant"  # constant | cosine
    warmup_epochs: float = 0.0
    # Wall-clock budget of training (validation included), checked at epoch boundaries: the run stops
    # before an epoch that would not fit. With a budget, the number of epochs is planned after the
    # first one (min(epochs, budget / first epoch's time)) and the cosine schedule spans that plan.
    max_minutes: float | None = None
    # Share of the tumour-free train slices drawn (afresh) each epoch; every tumour slice is always in.
    empty_slice_fraction: float = 1.0
    # Where batches come from (lggseg.resident): ``loader`` = DataLoader workers + albumentations on the CPU;
    # ``resident`` = the split on the training device, augmented there; ``auto`` = resident on CUDA when the
    # split fits comfortably in free device memory, else the loader. The two draw different random streams.
    data_path: str = "auto"  # auto | loader | resident
    # The resumable checkpoint is written every N epochs (not after the run's last: the model is written then).
    checkpoint_every: int = 1
    # torch's fused Adam (one kernel over all parameters) instead of the default multi-tensor one: the
    # same update, rounded differently. On CPU at 64 px the update took 0.20 s with the default and 0.06 s
    # fused for tf_efficientnetv2_m, 0.40 s and 0.09 s for repvgg_b2 (results/demo-2026-11-30/choices.json).
    fused_adam: bool = False
    # Before each validation, recompute every BatchNorm layer's running mean and variance as the exact
    # average over this many train slices (un-augmented, batches of 16), instead of the momentum average
    # of the training steps ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"). For
    # short runs: after one 28-step demo epoch, repvgg_b2 predicted nothing in eval mode (test tumour-slice
    # Dice 0.0) while its training Dice was 0.62; recomputed over 160 slices, 0.70. 0: off (the paper's way).
    bn_recalibration_slices: int = 0

    def __post_init__(self) -> None:
        _require(_is_int(self.epochs) and self.epochs > 0, f"train.epochs must be a positive integer, got {self.epochs!r}")
        _require(_is_int(self.batch_size) and self.batch_size > 0, f"train.batch_size must be positive, got {self.batch_size!r}")
        _require(_is_num(self.lr) and self.lr > 0, f"train.lr must be positive, got {self.lr!r}")
        _require(_is_num(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(_is_int(self.num_workers) and self.num_workers >= 0, "train.num_workers must be >= 0")
        _require(_is_int(self.cpu_threads) and self.cpu_threads >= 0, "train.cpu_threads must be >= 0")
        _require(_is_int(self.log_every) and self.log_every > 0, "train.log_every must be positive")
        _require(self.lr_schedule in LR_SCHEDULES, f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        _require(_is_num(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
                 f"train.warmup_epochs must be in [0, train.epochs), got {self.warmup_epochs!r}")
        _require(_is_num(self.empty_slice_fraction) and 0 < self.empty_slice_fraction <= 1,
                 f"train.empty_slice_fraction must be in (0, 1], got {self.empty_slice_fraction!r}")
        _require(self.max_minutes is None or (_is_num(self.max_minutes) and self.max_minutes > 0),
                 f"train.max_minutes must be null or a positive number of minutes, got {self.max_minutes!r}")
        _require(self.data_path in DATA_PATHS, f"train.data_path must be one of {DATA_PATHS}, got {self.data_path!r}")
        _require(_is_int(self.checkpoint_every) and self.checkpoint_every > 0,
                 f"train.checkpoint_every must be a positive integer, got {self.checkpoint_every!r}")
        _require(isinstance(self.fused_adam, bool), f"train.fused_adam must be true or false, got {self.fused_adam!r}")
        _require(_is_int(self.bn_recalibration_slices) and self.bn_recalibration_slices >= 0,
                 f"train.bn_recalibration_slices must be a non-negative integer, got {self.bn_recalibration_slices!r}")


@dataclass(frozen=True)
class PostprocessConfig:
    """Inference-time removal of predicted components smaller than ``min_area`` pixels (0 disables)."""

    min_area: int = 49
    connectivity: int = 8
    largest_3d: bool = False  # keep only each case's largest 3D region (not in the paper)

    def __post_init__(self) -> None:
        _require(_is_int(self.min_area) and self.min_area >= 0, f"postprocess.min_area must be >= 0, got {self.min_area!r}")
        _require(self.connectivity in (4, 8), "postprocess.connectivity must be 4 or 8")
        _require(isinstance(self.largest_3d, bool), "postprocess.largest_3d must be true or false")


@dataclass(frozen=True)
class EvaluateConfig:
    """Test-split evaluation (paper section 4.1.2 and the conventions of issue #4)."""

    threshold: float = 0.5
    batch_size: int = 32
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 23
    noise_side: int = 7  # components smaller than noise_side^2 pixels that touch no truth count as noise
    connectivity: int = 8
    tta: bool = False  # average the identity, h-flip and v-flip probabilities (lggseg predict --tta)

    def __post_init__(self) -> None:
        _require(_is_num(self.threshold) and 0 < self.threshold < 1, "evaluate.threshold must be in (0, 1)")
        _require(_is_int(self.batch_size) and self.batch_size > 0, "evaluate.batch_size must be positive")
        _require(_is_int(self.bootstrap_samples) and self.bootstrap_samples >= 100, "evaluate.bootstrap_samples must be >= 100")
        _require(_is_int(self.bootstrap_seed) and self.bootstrap_seed >= 0, "evaluate.bootstrap_seed must be >= 0")
        _require(_is_int(self.noise_side) and self.noise_side > 0, "evaluate.noise_side must be positive")
        _require(self.connectivity in (4, 8), "evaluate.connectivity must be 4 or 8")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training variant needs; what ``configs/<variant>.yaml`` holds."""

    variant: str
    common: CommonConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    seeds: tuple[int, ...] = (23,)
    tables: tuple[str, ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        _require(bool(_VARIANT_NAME.match(self.variant)), f"variant name {self.variant!r}: use letters, digits, _ . -")
        _require(len(self.seeds) > 0 and all(_is_int(s) and s >= 0 for s in self.seeds), "seeds must be non-negative integers")
        _require(len(set(self.seeds)) == len(self.seeds), "seeds has duplicates")
        if self.model.arch == "unet":
            _require(self.common.image_size % 32 == 0, "U-Net needs common.image_size divisible by 32")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------- loading

SECTIONS: dict[str, type] = {
    "common": CommonConfig,
    "fetch": FetchConfig,
    "manifest": ManifestConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "postprocess": PostprocessConfig,
    "evaluate": EvaluateConfig,
}


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys and wrong types are errors."""
    where = where or cls.__name__
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) for v in value)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _coerce(rest[0], value, where)
    if tp is float:
        if not _is_num(value):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if not _is_int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file into a plain dict (clear error if missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(name: str, params: Mapping[str, Any] | str | Path = "params.yaml") -> Any:
    """The validated dataclass for section ``name`` of ``params`` (a dict or a params file)."""
    if not isinstance(params, Mapping):
        params = read_params(params)
    if name not in SECTIONS:
        raise ConfigError(f"unknown params section {name!r}; known: {sorted(SECTIONS)}")
    return from_dict(SECTIONS[name], params.get(name), name)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``override`` wins, lists are replaced whole."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_VARIANT_KEYS = {"model", "loss", "train", "tables", "label"}


def variant_names(params: Mapping[str, Any]) -> list[str]:
    variants = params.get("variants") or {}
    if not isinstance(variants, Mapping) or not variants:
        raise ConfigError("params: 'variants' must be a non-empty mapping of variant name -> overrides")
    return list(variants)


def resolve_variant(params: Mapping[str, Any], name: str) -> RunConfig:
    """Merge ``variants.<name>`` over the global ``model``/``loss``/``train`` sections and validate."""
    variants = params.get("variants") or {}
    if name not in variants:
        raise ConfigError(f"unknown variant {name!r}; known: {sorted(variants)}")
    over = variants[name] or {}
    if not isinstance(over, Mapping):
        raise ConfigError(f"variants.{name} must be a mapping")
    unknown = sorted(set(over) - _VARIANT_KEYS)
    if unknown:
        raise ConfigError(f"variants.{name}: unknown key(s) {unknown}; allowed: {sorted(_VARIANT_KEYS)}")
    sec = {k: deep_merge(params.get(k) or {}, over.get(k) or {}) for k in ("model", "loss", "train")}
    seeds = params.get("seeds", [23])
    if not isinstance(seeds, (list, tuple)):
        raise ConfigError(f"seeds must be a list of integers, got {seeds!r}")
    tables = over.get("tables", [])
    if not isinstance(tables, (list, tuple)):
        raise ConfigError(f"variants.{name}.tables must be a list")
    return RunConfig(
        variant=name,
        common=load_section("common", params),
        model=from_dict(ModelConfig, sec["model"], f"variants.{name}.model"),
        loss=from_dict(LossConfig, sec["loss"], f"variants.{name}.loss"),
        train=from_dict(TrainConfig, sec["train"], f"variants.{name}.train"),
        seeds=_coerce(tuple[int, ...], seeds, "seeds"),
        tables=tuple(str(t) for t in tables),
        label=str(over.get("label", name)),
    )


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_dict` (reads ``configs/<variant>.yaml`` and model dirs)."""
    return from_dict(RunConfig, data, "run config")


def load_run_config(path: str | Path) -> RunConfig:
    return run_config_from_dict(read_params(path))


def validate_all(params: Mapping[str, Any]) -> dict[str, RunConfig]:
    """Validate every section and every variant; returns the resolved variants."""
    for name in SECTIONS:
        if name in params:
            load_section(name, params)
    return {name: resolve_variant(params, name) for name in variant_names(params)}
