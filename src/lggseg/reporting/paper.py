"""The paper's numbers: Wan et al. (2023) Tables 2-4 (DSC, IoU per row) and how a variant is matched to a row.

Variants are mapped to paper rows by their settings (loss terms for Table 2, ``model.attributes`` for
Table 3, ``model.arch``/``model.encoder`` for Table 4), never by variant name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lggseg.config import RunConfig

PAPER = "Wan et al. 2023"


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table (DSC and IoU in percent) and the rule that says which runs it describes."""

    label: str
    dsc: float
    iou: float | None
    matches: Callable[[RunConfig], bool]


def _terms_are(*terms: str) -> Callable[[RunConfig], bool]:
    return lambda rc: set(rc.loss.terms) == set(terms)


def _encoder_family(rc: RunConfig) -> str:
    """timm name without smp's ``tu-`` prefix or a pretrained tag (``tf_efficientnet_b5.ns_jft_in1k``)."""
    name = rc.model.encoder.lower()
    name = name.removeprefix("tu-")
    return name.split(".", 1)[0]


def _deeplab_encoder(pattern: str) -> Callable[[RunConfig], bool]:
    rx = re.compile(pattern)
    return lambda rc: rc.model.arch == "deeplabv3plus" and bool(rx.fullmatch(_encoder_family(rc)))


PAPER_TABLES: dict[str, tuple[PaperRow, ...]] = {
    "table2": (
        PaperRow("BCE", 93.21, 90.70, _terms_are("bce")),
        PaperRow("BCE + Dice", 93.86, 91.27, _terms_are("bce", "dice")),
        PaperRow("BCE + Dice + Outlier", 94.36, 91.83, _terms_are("bce", "dice", "outlier")),
    ),
    "table3": (
        PaperRow("No attribute encoder", 92.80, 90.22, lambda rc: not rc.model.attributes),
        PaperRow("Attribute encoder", 93.21, 91.02, lambda rc: rc.model.attributes),
    ),
    "table4": (
        PaperRow("U-Net (Buda et al.)", 82.00, None, lambda rc: rc.model.arch == "unet"),
        PaperRow("resnet101", 90.43, 87.80, _deeplab_encoder(r"resnet101")),
        PaperRow("tf_efficientnet_b5", 91.0, 88.13, _deeplab_encoder(r"(tf_)?efficientnet_b5")),
        PaperRow("xception65", 91.65, 89.10, _deeplab_encoder(r"xception65\w*")),
        PaperRow("repvgg_b2", 91.87, 89.36, _deeplab_encoder(r"repvgg_b2")),
        PaperRow("tf_efficientnetv2_m", 91.93, 89.29, _deeplab_encoder(r"(tf_)?efficientnetv2_m")),
        PaperRow("Swin Transformer v2 (swin_base)", 91.98, 89.19, _deeplab_encoder(r"swin(v2)?_base\w*")),
        PaperRow("regnetz_040", 92.80, 90.22, _deeplab_encoder(r"regnetz_040\w*")),
    ),
}


TABLE_TITLES = {
    "table2": "Table 2 - loss-function ablation (DeepLabv3+ / regnetz_040 with the attribute encoder)",
    "table3": "Table 3 - attribute encoder ablation (DeepLabv3+ / regnetz_040, BCE)",
    "table4": "Table 4 - encoder comparison (DeepLabv3+, BCE, no attributes)",
}


TABLE_NOTES = {
    "table2": "Paper rows are matched on `loss.terms`; a variant's outlier mode is in its label.",
    "table3": (
        "The paper's Table 3 'Yes' row (93.21 / 91.02) is the same configuration as Table 2's BCE row, "
        "which reports IoU 90.70; both paper values are kept as printed."
    ),
    "table4": (
        "The paper's U-Net row is quoted from Buda et al. (2019), whose 82% is a mean per-patient (3-D) Dice "
        "of their own U-Net; compare it with the patient-3D column. Our U-Net is the variant named in the row."
    ),
}
