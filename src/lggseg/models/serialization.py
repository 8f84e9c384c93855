"""A trained network on disk: ``model.safetensors`` + ``model.json`` (+ ``MODEL_CARD.md``), the one place of that schema.

:func:`save_model` writes the first two (each atomically) and the model card made from the metadata
(:mod:`lggseg.models.card`), with what rebuilding needs (``format``, ``arch``,
``encoder``, ``model_config``, ``n_attributes``, ``image_size``, ``n_parameters``; the middle three
are the :class:`~lggseg.models.record.BuildRecord` the network carries) beside the caller's meta;
:func:`load_model` rebuilds the network through :func:`lggseg.models.registry.build_model` and
loads the weights; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lggseg.config import ConfigError, ModelConfig, from_dict
from lggseg.errors import ModelError
from lggseg.io import OutputError, atomic_path, write_json
from lggseg.models.card import write_card
from lggseg.models.encoders import summarise_keys
from lggseg.models.record import RecordedNetwork
from lggseg.models.registry import build_model

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "lggseg-model/1"


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (what ``model.json``'s ``n_parameters`` holds)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, out_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``model.json`` + ``MODEL_CARD.md`` into ``out_dir`` (each atomically); returns ``out_dir``.

    ``meta`` is stored as given (run config, attribute names, scores, ...) plus what rebuilding
    needs: ``format``, ``arch``, ``encoder``, the network's own build record (``model_config``,
    ``n_attributes``, ``image_size``: :meth:`~lggseg.models.record.BuildRecord.to_json`) and
    ``n_parameters``. ``model`` must be an lggseg network (from :func:`build_model`), possibly
    wrapped by ``torch.compile`` or DDP; an ``n_attributes`` or ``image_size`` in ``meta`` that
    contradicts the model, or attribute names of the wrong count, raise :class:`ModelError`.
    """
    out_dir = Path(out_dir)
    # torch.compile and DistributedDataParallel wrap the network; the file holds the bare one
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) or isinstance(
        model, nn.parallel.DistributedDataParallel
    ):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    if not isinstance(model, RecordedNetwork):
        raise ModelError("save_model needs a model made by lggseg.models.build_model")
    build = model.build_record.to_json()
    cfg = build["model_config"]
    for key in ("n_attributes", "image_size"):
        if meta.get(key) is not None and meta[key] != build[key]:
            raise ModelError(
                f"save_model: meta {key}={meta[key]!r} but the model was built with {key}={build[key]}"
            )
    names = meta.get("attribute_names")
    if cfg["attributes"] and names is not None and len(names) != build["n_attributes"]:
        raise ModelError(
            f"save_model: {len(names)} attribute names for a model with {build['n_attributes']} attributes"
        )
    record = {
        **dict(meta),
        "format": FORMAT,
        "arch": cfg["arch"],
        "encoder": cfg["encoder"],
        **build,
        "n_parameters": count_parameters(model),
    }
    try:
        text = json.dumps(record, allow_nan=False)  # fail before anything is written
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"save_model: {out_dir / META_FILE}: meta is not JSON-serialisable ({exc})"
        ) from None
    del text
    # clone: safetensors refuses tensors sharing storage, and the file must not alias live weights
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    try:
        with atomic_path(out_dir / WEIGHTS_FILE, suffix=".safetensors") as tmp:
            # One metadata key: safetensors writes the metadata map in a random key order (its issue
            # #584), so two keys made the bytes of identical weights differ and DVC saw a new model.
            # The format lives in model.json.
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json(out_dir / META_FILE, record)
        # Without test metrics yet: the evaluate stage writes the card again once they exist.
        write_card(out_dir, record)
    except OutputError as exc:
        raise ModelError(str(exc)) from exc
    return out_dir


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """The ``model.json`` of ``model_dir`` (ModelError if missing or malformed)."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ModelError(f"{path}: model metadata not found (train the model first)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable model metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object")
    missing = [k for k in ("model_config", "n_attributes", "image_size") if k not in meta]
    if missing:
        raise ModelError(f"{path}: lacks {missing}; not written by lggseg.models.save_model")
    return meta


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of ``model_dir`` from ``model.json`` and load ``model.safetensors`` strictly.

    Returns ``(model in eval mode on device, meta)``; ``meta`` is ``model.json`` plus ``model_dir``.
    Pretrained downloads are switched off (the stored weights replace them). Never unpickles.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    meta_path = model_dir / META_FILE
    try:
        cfg = from_dict(ModelConfig, meta["model_config"], f"{meta_path}: model_config")
        cfg = dataclasses.replace(cfg, pretrained=False, weights_file=None)
        model = build_model(cfg, int(meta["n_attributes"]), int(meta["image_size"]))
    except (ConfigError, ModelError, TypeError, ValueError) as exc:
        raise ModelError(f"{meta_path}: cannot rebuild the model ({exc})") from None
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{weights}: model weights not found")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: unreadable or corrupt weights ({exc})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(v)} {label}: {summarise_keys(v, 4)}"
            for label, v in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("with the wrong shape", wrong),
            )
            if v
        ]
        raise ModelError(f"{weights} does not match the model described by {meta_path}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    meta["model_dir"] = str(model_dir)
    return model, meta
