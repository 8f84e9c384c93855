"""Image encoders for the networks: timm backbones through smp's ``TimmUniversalEncoder``, and their weights.

* :class:`FusedStride16Encoder` lets encoders that timm cannot dilate (Swin Transformer v2 of
  Table 4) feed DeepLabv3+: their deep feature is stage 3 (H/16) concatenated with the upsampled
  stage 4 (H/32).
* With ``model.pretrained`` an encoder gets timm's ImageNet weights (hub or a local
  ``model.weights_file``, checked by :func:`check_weights_file`); failing to get them is a
  :class:`~lggseg.errors.ModelError`, never a silent random init.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import TimmUniversalEncoder
from torch import nn

from lggseg.config import ModelConfig
from lggseg.errors import ModelError

TABLE4_ENCODERS = (
    "resnet101",
    "tf_efficientnet_b5",
    "xception65",
    "repvgg_b2",
    "tf_efficientnetv2_m",
    "swinv2_base_window8_256",
    "regnetz_040",
)
"""The DeepLabv3+ encoders compared in the paper's Table 4 (timm names)."""


_ENCODER_DEPTH = 5  # smp feature list [x, /2, /4, /8, /16, /32]; DeepLabv3+ reads index 2 (/4) and the last


class FusedStride16Encoder(TimmUniversalEncoder):
    """smp's timm encoder for backbones timm cannot dilate, with a stride-16 deep feature.

    DeepLabv3+ wants its deep feature at H/16, which CNNs get by dilating the last stage
    (``output_stride=16``). Windowed transformers (Swin v2) cannot be dilated and timm's Swin has
    no ``output_stride``; smp 0.6.0 passes ``output_stride`` to timm and fails for them. Dropping
    stage 4 would waste half the (pretrained) network, so the deep feature here is stage 3 (H/16)
    concatenated with stage 4 (H/32) upsampled bilinearly to H/16; ASPP's 1x1 and atrous
    convolutions learn the fusion. smp already converts Swin's NHWC features to NCHW and inserts
    an empty H/2 feature, so the low-level H/4 feature stays at index 2 as DeepLabv3+ expects.

    Swin is built for one input size (``img_size``); other sizes are rejected with a clear error.
    """

    def __init__(self, name: str, input_size: int, pretrained: bool = False, **kwargs: Any) -> None:
        super().__init__(name, pretrained=pretrained, depth=_ENCODER_DEPTH, output_stride=32, **kwargs)
        *head, c16, c32 = self._out_channels
        self._out_channels = [*head, c16 + c32]
        self.input_size = int(input_size)

    @property
    def output_stride(self) -> int:
        return 16

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ModelError(
                f"encoder {self.name} was built for {self.input_size}x{self.input_size} inputs "
                f"(common.image_size), got {tuple(x.shape[-2:])}"
            )
        *features, f16, f32 = super().forward(x)
        f32 = F.interpolate(f32, size=f16.shape[-2:], mode="bilinear", align_corners=False)
        return [*features, torch.cat([f16, f32], dim=1)]


def _timm_name(encoder: str) -> str:
    name = encoder.removeprefix("tu-")
    if not timm.is_model(name):
        raise ModelError(f"model.encoder {encoder!r} is not a timm model (see timm.list_models())")
    return name


def _timm_kwargs(name: str, image_size: int) -> dict[str, Any]:
    """Extra ``timm.create_model`` arguments: fixed-size transformers are built for ``image_size``."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        return {"img_size": image_size}
    return {}


def _dilatable(name: str, output_stride: int, kwargs: Mapping[str, Any]) -> bool:
    """Whether timm can build ``name`` at ``output_stride`` (checked on the meta device: no memory, no weights)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, features_only=True, output_stride=output_stride, **kwargs)
    except TypeError:  # the model's __init__ has no output_stride argument (Swin, ViT, ...)
        return False
    except Exception as exc:
        raise ModelError(f"could not build encoder {name!r}: {_short(exc)}") from exc
    return True


def _reference_state(name: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Size], tuple[str, ...]]:
    """Key -> shape of a full timm model (on the meta device) and its classifier prefixes."""
    with torch.device("meta"):
        ref = timm.create_model(name, **kwargs)
    classifier = ref.pretrained_cfg.get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    return {k: v.shape for k, v in ref.state_dict().items()}, tuple(f"{c}." for c in classifier)


def _summarise(keys: Sequence[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights_file(path: str | Path, encoder: str, image_size: int = 256) -> Path:
    """Validate a local timm-format state dict for ``encoder`` (``model.weights_file``).

    The file is what ``timm.create_model(encoder).state_dict()`` holds (or timm's hub
    ``model.safetensors``): safetensors, or a torch file read with ``weights_only=True``. The
    classifier may be absent. Missing, unexpected or mis-shaped tensors raise :class:`ModelError`.
    """
    path = Path(path)
    name = _timm_name(encoder)
    if not path.is_file():
        raise ModelError(f"model.weights_file {path}: no such file (encoder {name})")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # safetensors, pickle-refusal and zip errors all mean "unreadable"
        raise ModelError(
            f"model.weights_file {path}: cannot read a state dict ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.weights_file {path}: does not hold a flat name -> tensor state dict")
    expected, classifier = _reference_state(name, _timm_kwargs(name, image_size))

    def optional(key: str) -> bool:
        return key.startswith(classifier)

    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}"
        for k in state
        if k in expected and state[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_summarise(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_summarise(wrong, 3)}")
    if problems:
        raise ModelError(
            f"model.weights_file {path} is not a timm state dict of {name!r}: " + "; ".join(problems)
        )
    return path


def _weights_kwargs(cfg: ModelConfig, name: str, image_size: int) -> tuple[bool, dict[str, Any]]:
    """(pretrained, extra timm kwargs) for ``cfg``; a local file goes through timm's ``file`` override."""
    if not cfg.pretrained:
        if cfg.weights_file:
            raise ModelError(
                f"model.weights_file is set ({cfg.weights_file}) but model.pretrained is false; "
                "set pretrained: true to load it, or weights_file: null"
            )
        return False, {}
    if cfg.weights_file:
        path = check_weights_file(cfg.weights_file, name, image_size)
        # 'file' outranks the hub in timm's source resolution; timm reads it with weights_only=True
        return True, {"pretrained_cfg_overlay": {"file": str(path)}}
    return True, {}


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _guarded_build(build: Callable[[], nn.Module], cfg: ModelConfig, name: str, pretrained: bool) -> Any:
    """Run ``build`` and turn any failure into a ModelError that says what to do."""
    try:
        return build()
    except ModelError:
        raise
    except Exception as exc:
        if pretrained and cfg.weights_file:
            msg = f"model.weights_file {cfg.weights_file}: could not load it into encoder {name!r} ({_short(exc)})"
        elif pretrained:
            msg = (
                f"could not get timm's ImageNet weights for encoder {name!r} ({_short(exc)}). "
                "On an offline machine set model.weights_file to a local timm state dict "
                "(.safetensors or .pth), or set model.pretrained: false for random initialisation"
            )
        else:
            msg = f"could not build encoder {name!r}: {_short(exc)}"
        raise ModelError(msg) from exc


def feature_strides(encoder: nn.Module) -> list[int]:
    """Stride of each feature of an smp timm encoder, aligned with ``encoder.out_channels``."""
    reductions = list(encoder.model.feature_info.reduction())
    if getattr(encoder, "_is_transformer_style", False):
        reductions = [2, *reductions]  # smp's empty H/2 placeholder
    strides = [1, *reductions]  # smp puts the input first
    if isinstance(encoder, FusedStride16Encoder):
        strides = [*strides[:-2], 16]
    return strides


def _deeplab_encoder(cfg: ModelConfig, name: str, image_size: int) -> TimmUniversalEncoder:
    kwargs = _timm_kwargs(name, image_size)
    pretrained, weight_kwargs = _weights_kwargs(cfg, name, image_size)
    if _dilatable(name, cfg.output_stride, kwargs):

        def build() -> TimmUniversalEncoder:
            return TimmUniversalEncoder(
                name,
                pretrained=pretrained,
                depth=_ENCODER_DEPTH,
                output_stride=cfg.output_stride,
                **kwargs,
                **weight_kwargs,
            )

    elif cfg.output_stride == 16:
        if image_size % 32:
            raise ModelError(
                f"encoder {name!r} (not dilatable) needs common.image_size divisible by 32, got {image_size}"
            )

        def build() -> TimmUniversalEncoder:
            return FusedStride16Encoder(name, image_size, pretrained=pretrained, **kwargs, **weight_kwargs)

    else:
        raise ModelError(
            f"encoder {name!r} cannot be dilated, so it supports model.output_stride 16 only, not {cfg.output_stride}"
        )
    encoder = _guarded_build(build, cfg, name, pretrained)
    strides = feature_strides(encoder)
    if len(strides) <= 2 or strides[2] != 4 or strides[-1] != cfg.output_stride:
        raise ModelError(
            f"encoder {name!r} gives features at strides {strides[1:]}; DeepLabv3+ needs H/4 (third) and "
            f"H/{cfg.output_stride} (last)"
        )
    return encoder
