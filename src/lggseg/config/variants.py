"""Training variants: ``variants.<name>`` merged into a :class:`RunConfig`, and the ``configure`` stage's rule.

Training variants (paper Tables 2-4) are data: ``variants.<name>`` holds overrides of the ``model``,
``loss`` and ``train`` sections, and optionally its own ``seeds`` list, which replaces the global one.
:func:`resolve_variant` merges them into a :class:`RunConfig`, which
:func:`write_configs` (the ``configure`` stage) writes to ``configs/<name>.yaml``. Each ``train@<name>``
stage depends on that file only, so ``dvc exp run -S loss.gamma=0.5`` re-trains exactly the variants
whose resolved configuration changes: :func:`canonical` writes the loss settings of the terms a variant
does not use at fixed values (:data:`LOSS_TERM_FIELDS` says which fields each term of
:mod:`lggseg.losses` reads), so only the variants with the outlier term change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lggseg.config.loading import coerce, deep_merge, from_dict, load_section, read_params
from lggseg.config.sections import SECTIONS, LossConfig, ModelConfig, RunConfig, TrainConfig
from lggseg.errors import ConfigError
from lggseg.io import write_text

_VARIANT_KEYS = {"model", "loss", "train", "tables", "label", "seeds"}


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
    # A variant's own ``seeds`` replaces the global list: one variant retrained with several seeds measures
    # the seed-to-seed noise floor (issue 21) without retraining every other variant.
    seeds = over.get("seeds", params.get("seeds", [23]))
    if not isinstance(seeds, (list, tuple)):
        where = f"variants.{name}.seeds" if "seeds" in over else "seeds"
        raise ConfigError(f"{where} must be a list of integers, got {seeds!r}")
    tables = over.get("tables", [])
    if not isinstance(tables, (list, tuple)):
        raise ConfigError(f"variants.{name}.tables must be a list")
    return RunConfig(
        variant=name,
        common=load_section("common", params),
        model=from_dict(ModelConfig, sec["model"], f"variants.{name}.model"),
        loss=from_dict(LossConfig, sec["loss"], f"variants.{name}.loss"),
        train=from_dict(TrainConfig, sec["train"], f"variants.{name}.train"),
        seeds=coerce(tuple[int, ...], seeds, "seeds"),
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


# --------------------------------------------------------------------------- the configure stage

LOSS_TERM_FIELDS: dict[str, tuple[str, ...]] = {
    "bce": ("alpha",),
    "dice": ("beta",),
    "outlier": ("gamma", "i", "j", "threshold_rounding", "counts", "outlier_mode", "reduction",
                "gamma_warmup_epochs", "gamma_ramp_epochs", "gamma_warmup_fraction", "gamma_ramp_fraction"),
}
"""The :class:`LossConfig` fields read only by one term of :class:`lggseg.losses.CompoundLoss`; ``smooth``
serves both dice and outlier. A field added to a term of the losses is added here, or a change of it
would not re-train the variants that use the term."""

UNUSED_LOSS = LossConfig(gamma_warmup_epochs=0, gamma_ramp_epochs=0)
"""The values :func:`canonical` writes for the loss fields of terms a variant does not use. Fixed (not
the params' values, which an experiment changes) so that such a change leaves those variants' configs,
and their trained models, alone; equal to the configs written so far."""


def unused_loss_fields(run: RunConfig) -> list[str]:
    """The :class:`LossConfig` fields that no term of ``run``'s loss reads."""
    unused = [f for term, names in LOSS_TERM_FIELDS.items() if term not in run.loss.terms for f in names]
    if "dice" not in run.loss.terms and "outlier" not in run.loss.terms:
        unused.append("smooth")
    return unused


def canonical(run: RunConfig) -> RunConfig:
    """``run`` with the loss settings of unused terms reset to :data:`UNUSED_LOSS`'s."""
    unused = unused_loss_fields(run)
    loss = dataclasses.replace(run.loss, **{f: getattr(UNUSED_LOSS, f) for f in unused})
    return dataclasses.replace(run, loss=loss)


def write_configs(params_path: Path, out: Path) -> dict[str, str]:
    """``{variant: "written" | "unchanged" | "removed"}`` after syncing ``out`` with params.yaml.

    Every section and variant is validated before any write; an unchanged file keeps its mtime; the
    files of dropped variants are removed.
    """
    runs = validate_all(read_params(params_path))
    status = {}
    for name, run in runs.items():
        dest = out / f"{name}.yaml"
        text = yaml.safe_dump(canonical(run).to_dict(), sort_keys=False)
        if dest.is_file() and dest.read_text() == text:
            status[name] = "unchanged"
        else:
            write_text(dest, text)
            status[name] = "written"
    for stale in sorted(out.glob("*.yaml")):
        if stale.stem not in runs:
            stale.unlink()
            status[stale.stem] = "removed"
    return status
