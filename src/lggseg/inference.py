"""Probabilities from a trained model: the one inference step that evaluation, ``lggseg predict``, the
benchmark and preflight share (paper section 4.1.2), and where a variant's models are found.

A normalised batch goes through the model (bf16 autocast on CUDA, as in training), the sigmoid
probabilities are upsampled bilinearly to the native 256 x 256 and, with ``tta``, averaged over the
identity, horizontal-flip and vertical-flip views (:func:`infer_probabilities`). The evaluate stage
feeds it batches of a manifest store (:func:`predict_probabilities`); ``lggseg predict`` feeds it
slices read from files (:func:`preprocess`), so both score a slice identically.

Layer: above :mod:`lggseg.models` and :mod:`lggseg.data`, below :mod:`lggseg.evaluation` and
:mod:`lggseg.predict` (it breaks the old evaluate <-> predict import cycle).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lggseg.data.dataset import SliceDataset, normalize_image, resize_pair
from lggseg.errors import DataError, ModelError
from lggseg.models import META_FILE

if TYPE_CHECKING:
    from lggseg.data.store import Store


def infer_probabilities(
    model: torch.nn.Module,
    image: torch.Tensor,
    attributes: torch.Tensor | None = None,
    *,
    out_size: Sequence[int] | None = None,
    tta: bool = False,
) -> torch.Tensor:
    """Sigmoid probabilities of a normalised batch.

    With ``tta`` the probabilities of the identity, horizontal-flip and vertical-flip views (each
    flipped back) are averaged. bf16 autocast on CUDA, as in training. The model must be in eval
    mode; this runs under ``torch.inference_mode``.

    Args:
        model: a network of :func:`lggseg.models.build_model`.
        image: ``(B, 3, h, w)``, normalised as :func:`lggseg.data.dataset.normalize_image`.
        attributes: ``(B, A)`` for models with the attribute encoder, ``None`` for the others.
        out_size: ``(H, W)`` to upsample to bilinearly (the native slice size); ``None`` keeps ``(h, w)``.
        tta: average the three views.

    Returns:
        float32 ``(B, H, W)`` in [0, 1], on ``image``'s device.
    """
    views: list[tuple[int, ...]] = [(), (-1,), (-2,)] if tta else [()]
    cuda = image.device.type == "cuda"
    with torch.inference_mode():
        total = None
        for dims in views:
            x = image.flip(dims) if dims else image
            with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x, attributes)
            prob = torch.sigmoid(logits.float())
            if dims:
                prob = prob.flip(dims)
            total = prob if total is None else total + prob
        prob = total / len(views) if len(views) > 1 else total
        if out_size is not None and tuple(prob.shape[-2:]) != tuple(out_size):
            prob = F.interpolate(prob, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)
    return prob[:, 0]


def preprocess(image: np.ndarray, image_size: int) -> np.ndarray:
    """One slice as model input, exactly as ``SliceDataset`` in evaluation mode.

    Args:
        image: uint8 ``(H, W, 3)``.
        image_size: side ``s`` of the model input.

    Returns:
        float32 ``(3, s, s)``, normalised with the ImageNet mean/std.
    """
    # resize_pair also resizes a mask; the red channel stands in for it (its output is discarded).
    resized, _ = resize_pair(image, image[..., 0], image_size)
    return normalize_image(resized)


_SEED_DIR = re.compile(r"^seed_(\d+)$")


def find_model_dirs(models_dir: str | Path) -> dict[int, Path]:
    """``{seed: dir}`` for the ``seed_<s>/`` sub-directories of ``models_dir``, sorted by seed."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ModelError(f"{models_dir}: model directory not found (run the train stage first)")
    found = {int(m.group(1)): p for p in models_dir.iterdir() if p.is_dir() and (m := _SEED_DIR.match(p.name))}
    if not found:
        raise ModelError(f"{models_dir}: no seed_<s>/ model sub-directories")
    return dict(sorted(found.items()))


def attribute_order(store_names: list[str], model_names: list[str], where: str) -> np.ndarray:
    """Column indices that put the store's attribute vector into the model's order.

    Returns:
        int64 ``(len(model_names),)``: ``store_attributes[:, result]`` is in the model's order.
        A model name the store lacks raises :class:`~lggseg.errors.DataError` naming ``where``.
    """
    missing = [n for n in model_names if n not in store_names]
    if missing:
        raise DataError(f"{where}: the model needs attribute(s) {missing} that the manifest store lacks")
    return np.array([store_names.index(n) for n in model_names], dtype=np.int64)


def predict_probabilities(
    model: torch.nn.Module,
    store: Store,
    indices: np.ndarray,
    *,
    image_size: int,
    attribute_index: np.ndarray | None,
    batch_size: int,
    device: torch.device,
    desc: str = "predict",
    tta: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Probabilities of the store's slices ``indices``, batch by batch, at the store's native resolution.

    Inputs are resized to ``image_size`` exactly as in training (:class:`lggseg.data.dataset.SliceDataset`
    in evaluation mode). The forward pass, sigmoid and bilinear upsampling are
    :func:`infer_probabilities` (bf16 autocast on CUDA); the model is put in eval mode.

    Args:
        model: a network of :func:`lggseg.models.build_model`, on ``device``.
        store: a manifest store (:func:`lggseg.data.store.load_store`); masks ``(N, H, W)``.
        indices: int ``(n,)`` store rows, in the order they are yielded.
        attribute_index: from :func:`attribute_order` (store columns in the model's order), or
            ``None`` for a model without attributes.

    Yields:
        ``(rows, prob)``: numpy int64 ``(B,)`` store rows and float32 ``(B, H, W)`` probabilities.
    """
    native = tuple(int(s) for s in store.masks.shape[1:3])
    loader = DataLoader(
        SliceDataset(store, indices, image_size, augment=None),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        pin_memory=device.type == "cuda",
    )
    perm = None if attribute_index is None else torch.from_numpy(attribute_index)
    model.eval()
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        image = batch["image"].to(device, non_blocking=True)
        attrs = None if perm is None else batch["attributes"][:, perm].to(device, non_blocking=True)
        # The same step as `lggseg predict`, so both score a slice identically.
        prob = infer_probabilities(model, image, attrs, out_size=native, tta=tta)
        yield batch["row"].numpy(), prob.cpu().numpy()


def resolve_model_dir(model_dir: str | Path, seed: int | None = None) -> Path:
    """The directory holding ``model.json``: ``model_dir`` itself or its ``seed_<s>/`` (one, or ``seed``)."""
    model_dir = Path(model_dir)
    if (model_dir / META_FILE).is_file():
        if seed is not None:
            raise ModelError(f"{model_dir}: --seed {seed} given but this is a single model directory (it has {META_FILE})")
        return model_dir
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model directory not found")
    try:
        seeds = find_model_dirs(model_dir)
    except ModelError:
        raise ModelError(
            f"{model_dir}: not a model directory (no {META_FILE}, no seed_<s>/ sub-directories); "
            "give models/<variant> or models/<variant>/seed_<s> as written by training"
        ) from None
    if seed is None:
        if len(seeds) > 1:
            raise ModelError(f"{model_dir}: holds the models of seeds {sorted(seeds)}; choose one with --seed")
        return next(iter(seeds.values()))
    if seed not in seeds:
        raise ModelError(f"{model_dir}: no model for seed {seed} (seeds: {sorted(seeds)})")
    return seeds[seed]


def uses_attributes(meta: Mapping[str, Any]) -> bool:
    """Whether the model has the attribute encoder (its ``model_config.attributes``)."""
    cfg = meta.get("model_config") or {}
    return bool(cfg.get("attributes")) and int(meta.get("n_attributes") or 0) > 0
