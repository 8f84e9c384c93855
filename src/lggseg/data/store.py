"""The manifest store of ``data/manifest/`` opened for reading: :func:`load_store` -> :class:`Store`
(``table``, memory-mapped ``images``/``masks``, ``attributes``, ``indices(split)``); nothing is decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lggseg.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Store:
    """A built manifest store: the table, memory-mapped arrays and the attribute matrix."""

    root: Path
    table: pd.DataFrame
    images: np.ndarray  # uint8 (N, H, W, 3), memmap
    masks: np.ndarray  # uint8 (N, H, W) in {0, 1}, memmap
    attribute_names: list[str]
    attributes: np.ndarray  # float32 (N, A)
    meta: dict

    def __len__(self) -> int:
        return len(self.table)

    def indices(self, split: str) -> np.ndarray:
        """Row indices (int64, ascending) of ``split`` (train, val or test)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        return np.flatnonzero(self.table["split"].to_numpy() == split).astype(np.int64)


def load_store(directory: str | Path) -> Store:
    """Open a store written by :func:`build_manifest` (arrays memory-mapped, nothing decoded)."""
    root = Path(directory)
    meta_path = root / "store.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{meta_path}: not found; run the manifest stage first") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: unreadable ({exc})") from None
    for key in ("n_slices", "height", "width", "attribute_names"):
        if key not in meta:
            raise DataError(f"{meta_path}: missing key {key!r}")
    n, h, w = meta["n_slices"], meta["height"], meta["width"]
    csv_path = root / "manifest.csv"
    try:
        table = pd.read_csv(
            csv_path, dtype={"case_id": str, "patient_id": str, "split": str, "image_path": str, "mask_path": str}
        )
    except FileNotFoundError:
        raise DataError(f"{csv_path}: not found") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{csv_path}: unreadable ({exc})") from None
    if len(table) != n or "row" not in table.columns or not np.array_equal(table["row"].to_numpy(), np.arange(n)):
        raise DataError(f"{csv_path}: expected {n} rows numbered 0..{n - 1} (store.json n_slices)")
    names = list(meta["attribute_names"])
    absent = [a for a in names if a not in table.columns]
    if absent:
        raise DataError(f"{csv_path}: attribute columns {absent[:3]} listed in store.json are missing")
    arrays = {}
    for name, shape in (("images", (n, h, w, 3)), ("masks", (n, h, w))):
        path = root / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(f"{path}: not found") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None
        if arr.shape != shape or arr.dtype != np.uint8:
            raise DataError(f"{path}: shape {arr.shape} dtype {arr.dtype}, expected {shape} uint8")
        arrays[name] = arr
    attributes = table[names].to_numpy(dtype=np.float32) if names else np.zeros((n, 0), np.float32)
    return Store(root, table, arrays["images"], arrays["masks"], names, attributes, meta)
