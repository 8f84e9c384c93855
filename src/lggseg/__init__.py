"""lggseg: a reproducible DVC pipeline for Wan et al. 2023 (Front. Med. 10:1172767) on the LGG MRI dataset."""

__version__ = "0.1.0"
