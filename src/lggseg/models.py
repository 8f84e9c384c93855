"""Segmentation networks of Wan et al. 2023 (sections 3.1-3.3) and the Table 4 baselines.

The paper's model is DeepLabv3+ (segmentation_models_pytorch, as in section 4.1.3) with a timm
image encoder (``regnetz_040``: 48 x H/4 low-level and 528 x H/16 deep features, section 3.2.1),
an attribute encoder (section 3.2.2: an MLP from the one-hot genomic clusters + slice position to
a ``3 x H/16 x W/16`` map) concatenated with the deep feature before ASPP (section 3.2.3: 531
input channels, atrous rates 6/12/18), and smp's DeepLabv3+ decoder (section 3.3).

* :class:`AttributeDeepLabV3Plus` extends ``smp.DeepLabV3Plus``; with ``model.attributes: false``
  it is plain DeepLabv3+ and ignores the attributes passed to it.
* :class:`FusedStride16Encoder` lets encoders that timm cannot dilate (Swin Transformer v2 of
  Table 4) feed DeepLabv3+: their deep feature is stage 3 (H/16) concatenated with the upsampled
  stage 4 (H/32).
* :class:`UnetBaseline` is smp's U-Net (Table 4, first row); it accepts and ignores attributes.

Every model has ``forward(image (B,3,H,W), attributes (B,A) | None = None) -> logits (B,1,H,W)``.
:func:`build_model` makes one from a :class:`~lggseg.config.ModelConfig`, loading timm's ImageNet
weights (hub or a local ``model.weights_file``) when ``model.pretrained`` is set; failing to get
them is a :class:`~lggseg.errors.ModelError`, never a silent random init. :func:`save_model` and
:func:`load_model` store a trained network as ``model.safetensors`` + ``model.json`` and never
unpickle anything.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
from segmentation_models_pytorch.base.utils import is_torch_compiling
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from segmentation_models_pytorch.encoders import TimmUniversalEncoder
from torch import nn

from lggseg.config import ConfigError, ModelConfig, from_dict
from lggseg.errors import ModelError
from lggseg.io import OutputError, atomic_path, write_json

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

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "lggseg-model/1"
_ENCODER_DEPTH = 5  # smp feature list [x, /2, /4, /8, /16, /32]; DeepLabv3+ reads index 2 (/4) and the last


# --------------------------------------------------------------------------- building blocks


class AttributeEncoder(nn.Module):
    """Section 3.2.2: MLP from the attribute vector ``(B, A)`` to a ``C x h x w`` map.

    The paper reshapes the MLP output to ``3 x H/16 x W/16``, so the last layer has
    ``channels * grid[0] * grid[1]`` outputs with ``grid`` the deep-feature size of the configured
    image size. If an input of another size arrives (e.g. prediction at a different resolution),
    the reshaped map is resized bilinearly to the deep feature's size instead of failing: the
    learned spatial layout is kept, only resampled.
    """

    def __init__(self, n_attributes: int, hidden: int, channels: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if n_attributes < 1:
            raise ModelError(
                f"the attribute encoder needs at least one attribute, got n_attributes={n_attributes}"
            )
        self.n_attributes = n_attributes
        self.channels = channels
        self.grid = (int(grid[0]), int(grid[1]))
        self.mlp = nn.Sequential(
            nn.Linear(n_attributes, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels * self.grid[0] * self.grid[1]),
        )

    def forward(self, attributes: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        x = self.mlp(attributes.to(self.mlp[0].weight.dtype))
        x = x.view(x.shape[0], self.channels, *self.grid)
        if tuple(size) != self.grid:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


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


def _check_attributes(model: nn.Module, attributes: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
    n = model.attribute_encoder.n_attributes
    if attributes is None:
        raise ModelError(
            f"this model was built with the attribute encoder (model.attributes: true, {n} attributes) "
            "and needs forward(image, attributes); got no attributes"
        )
    if attributes.ndim != 2 or attributes.shape[1] != n or attributes.shape[0] != image.shape[0]:
        raise ModelError(
            f"attributes must have shape (batch={image.shape[0]}, {n}) for this model, got {tuple(attributes.shape)}"
        )
    return attributes


class AttributeDeepLabV3Plus(smp.DeepLabV3Plus):
    """DeepLabv3+ whose ASPP also sees the attribute encoder's map (sections 3.1-3.3).

    ``smp.DeepLabV3Plus.__init__`` creates its own encoder through ``get_encoder``, which hands
    ``output_stride`` to timm (Swin rejects it) and sizes ASPP for the image features alone. This
    subclass takes a ready encoder instead (so :func:`build_model` controls weights and the Swin
    adapter) and assembles the same smp parts: :class:`DeepLabV3PlusDecoder` with its ASPP input
    widened by ``attribute_channels``, and a 1x1 ``SegmentationHead`` upsampling x4 (x2 at output
    stride 8). ``decoder_aspp_separable`` keeps smp's DeepLabv3+ default (depthwise-separable
    atrous convolutions, as in the DeepLabv3+ paper); dropout 0.5 as smp.

    ``n_attributes=0`` gives plain DeepLabv3+; it accepts and ignores ``attributes``.
    """

    def __init__(
        self,
        encoder: TimmUniversalEncoder,
        *,
        n_attributes: int = 0,
        attribute_hidden: int = 128,
        attribute_channels: int = 3,
        image_size: int = 256,
        decoder_channels: int = 256,
        atrous_rates: Sequence[int] = (6, 12, 18),
        aspp_separable: bool = True,
        aspp_dropout: float = 0.5,
    ) -> None:
        # DeepLabV3Plus.__init__ would build a second encoder; only the base class is initialised
        SegmentationModel.__init__(self)
        stride = int(encoder.output_stride)
        if stride not in (8, 16):
            raise ModelError(f"encoder {encoder.name}: DeepLabv3+ needs output stride 8 or 16, got {stride}")
        self.encoder = encoder
        extra = attribute_channels if n_attributes > 0 else 0
        channels = [*encoder.out_channels[:-1], encoder.out_channels[-1] + extra]
        self.decoder = DeepLabV3PlusDecoder(
            encoder_channels=channels,
            encoder_depth=_ENCODER_DEPTH,
            out_channels=decoder_channels,
            atrous_rates=tuple(atrous_rates),
            output_stride=stride,
            aspp_separable=aspp_separable,
            aspp_dropout=aspp_dropout,
        )
        # the decoder returns H/4 features; the head restores H
        self.segmentation_head = SegmentationHead(decoder_channels, 1, kernel_size=1, upsampling=4)
        self.classification_head = None
        self.attribute_encoder = (
            AttributeEncoder(n_attributes, attribute_hidden, attribute_channels, (image_size // stride,) * 2)
            if n_attributes > 0
            else None
        )
        self.name = f"deeplabv3plus-{encoder.name}" + ("-attributes" if n_attributes > 0 else "")

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(image)
        features = self.encoder(image)
        if self.attribute_encoder is not None:
            attributes = _check_attributes(self, attributes, image)
            deep = features[-1]
            attr_map = self.attribute_encoder(attributes, deep.shape[-2:]).to(deep.dtype)
            features = [*features[:-1], torch.cat([deep, attr_map], dim=1)]
        return self.segmentation_head(self.decoder(features))


class UnetBaseline(smp.Unet):
    """smp's U-Net (Table 4, first row); takes ``attributes`` for a uniform interface and ignores them."""

    def forward(self, image: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(image)


# --------------------------------------------------------------------------- encoders and weights


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


# --------------------------------------------------------------------------- public API


def build_model(cfg: ModelConfig, n_attributes: int, image_size: int = 256) -> nn.Module:
    """The network described by ``cfg`` for ``image_size`` x ``image_size`` inputs.

    ``n_attributes`` is the attribute vector width (used when ``cfg.attributes``). With
    ``cfg.pretrained`` the encoder gets timm's ImageNet weights, from ``cfg.weights_file`` if set
    (a timm-format state dict), else from timm's hub; failure raises :class:`ModelError`.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model needs a lggseg.config.ModelConfig, got {type(cfg).__name__}")
    if image_size % cfg.output_stride:
        raise ModelError(
            f"common.image_size {image_size} is not divisible by model.output_stride {cfg.output_stride}"
        )
    if cfg.attributes and n_attributes < 1:
        raise ModelError(
            f"model.attributes is true but the data has {n_attributes} attributes (need at least 1)"
        )
    name = _timm_name(cfg.encoder)
    if cfg.arch == "unet":
        if image_size % 32:
            raise ModelError(f"U-Net needs common.image_size divisible by 32, got {image_size}")
        pretrained, weight_kwargs = _weights_kwargs(cfg, name, image_size)
        model: nn.Module = _guarded_build(
            lambda: UnetBaseline(
                encoder_name=f"tu-{name}",
                encoder_weights=True if pretrained else None,
                classes=1,
                **_timm_kwargs(name, image_size),
                **weight_kwargs,
            ),
            cfg,
            name,
            pretrained,
        )
    else:
        model = AttributeDeepLabV3Plus(
            _deeplab_encoder(cfg, name, image_size),
            n_attributes=n_attributes if cfg.attributes else 0,
            attribute_hidden=cfg.attribute_hidden,
            attribute_channels=cfg.attribute_channels,
            image_size=image_size,
            decoder_channels=cfg.decoder_channels,
            atrous_rates=cfg.atrous_rates,
        )
    # what load_model needs to rebuild exactly this network
    model.lggseg_build = {
        "model_config": dataclasses.asdict(cfg),
        "n_attributes": int(n_attributes),
        "image_size": int(image_size),
    }
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, out_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``out_dir`` (each atomically); returns ``out_dir``.

    ``meta`` is stored as given (run config, attribute names, scores, ...) plus what rebuilding
    needs: ``format``, ``arch``, ``encoder``, ``model_config``, ``n_attributes``, ``image_size``,
    ``n_parameters``. ``model`` must come from :func:`build_model`; an ``n_attributes`` or
    ``image_size`` in ``meta`` that contradicts the model, or attribute names of the wrong count,
    raise :class:`ModelError`.
    """
    out_dir = Path(out_dir)
    # torch.compile and DistributedDataParallel wrap the network; the file holds the bare one
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) or isinstance(
        model, nn.parallel.DistributedDataParallel
    ):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    build = getattr(model, "lggseg_build", None)
    if not isinstance(build, dict):
        raise ModelError("save_model needs a model made by lggseg.models.build_model")
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
        "model_config": cfg,
        "n_attributes": build["n_attributes"],
        "image_size": build["image_size"],
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
            save_file(state, str(tmp), metadata={"format": "pt", "lggseg": FORMAT})
        write_json(out_dir / META_FILE, record)
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
            f"{len(v)} {label}: {_summarise(v, 4)}"
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
