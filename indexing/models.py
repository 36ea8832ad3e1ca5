"""ImgAud2Vid networks, registered by name: image and audio students, fusion Ψ, classifier, teacher.

Each registered entry point is a short function over one configurable class (like timm); its name
starts with its role (``image_``, ``audio_``, ``fusion_``, ``classifier_``, ``teacher_``). Presets
(:data:`PRESETS`) name one model per role: ``paper`` is the configuration of Gao et al. (CVPR 2020),
``tiny`` the same interfaces at a fraction of the width for tests and demos. Every preset's students and
teacher output 512-d vectors, so feature stores and the skimming model do not depend on the preset.

Every registered model follows timm's contract: ``forward_features`` (the unpooled trunk output),
``forward_head(x, pre_logits=False)`` (pooling and head; ``pre_logits=True`` stops before the class
logits) with ``forward(x) == forward_head(forward_features(x))``, and ``num_features``, the width of
``forward_head(..., pre_logits=True)``. The students, Ψ and the teacher are embedding models: their output
*is* their pre-logits feature (the teacher's class logits come from :meth:`Teacher.logits`), so
``pre_logits`` changes nothing there; the classifier's pre-logits feature is its input.

Shapes: frames ``(B, 3, 112, 112)`` ImageNet-normalised, log-mel ``(B, 1, 101, 40)``, teacher clips
``(B, 3, 16, 112, 112)`` Kinetics-normalised (see :mod:`indexing.frontend`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indexing import checkpoint as ckpt_io
from indexing.errors import CheckpointError, ConfigError
from indexing.frontend import frames_to_tensor, log_mel
from indexing.grid import EMBED_DIM

log = logging.getLogger(__name__)

ROLES = ("image", "audio", "fusion", "classifier", "teacher")
RESNET18_WIDTHS = (64, 128, 256, 512)  # torchvision resnet18 / r2plus1d_18 stage widths

_MODELS: dict[str, Callable[..., nn.Module]] = {}

PRESETS: dict[str, dict[str, str]] = {
    "paper": {
        "image": "image_resnet18",
        "audio": "audio_resnet18",
        "fusion": "fusion_mlp",
        "teacher": "teacher_r2plus1d_18",
    },
    "tiny": {
        "image": "image_resnet18_tiny",
        "audio": "audio_resnet18_tiny",
        "fusion": "fusion_mlp_tiny",
        "teacher": "teacher_r2plus1d_18_tiny",
    },
}


# ---- registry ------------------------------------------------------------------------------------


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point under its function name; the name's prefix is its role."""
    role = fn.__name__.split("_", 1)[0]
    if role not in ROLES:
        raise ConfigError(f"model {fn.__name__!r} must start with a role prefix: {', '.join(ROLES)}")
    _MODELS[fn.__name__] = fn
    return fn


def available_models(role: str | None = None) -> list[str]:
    """Registered model names, all or those of one role (``image``, ``audio``, ...), sorted."""
    if role is not None and role not in ROLES:
        raise ConfigError(f"Unknown role {role!r}; available: {', '.join(ROLES)}")
    return sorted(n for n in _MODELS if role is None or n.startswith(f"{role}_"))


def available_presets() -> list[str]:
    """Preset names (``paper``, ``tiny``)."""
    return list(PRESETS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; it remembers ``model_name`` and ``model_args`` for checkpoints.

    Raises:
        ConfigError: Unknown name (the message lists the registered ones).
    """
    if name not in _MODELS:
        raise ConfigError(f"Unknown model {name!r}; available: {', '.join(available_models())}")
    model = _MODELS[name](**kwargs)
    model.model_name = name
    model.model_args = dict(kwargs)
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name", "args"}`` of a model made by :func:`create_model`."""
    return {"name": model.model_name, "args": dict(model.model_args)}


# ---- trunks --------------------------------------------------------------------------------------


def _init_like_torchvision(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet_trunk(widths: Sequence[int], in_channels: int, stem_stride: int) -> nn.Sequential:
    """ResNet-18 trunk (conv1 .. layer4, no pooling or fc) with torchvision's module names.

    With :data:`RESNET18_WIDTHS` it is torchvision's ``resnet18`` itself, so torchvision state dicts
    (e.g. ImageNet weights) load into it; other widths build the same topology from torchvision blocks.
    """
    from torchvision.models import resnet18
    from torchvision.models.resnet import BasicBlock

    if len(widths) != 4:
        raise ConfigError(f"widths must list 4 stage widths, got {tuple(widths)}")
    if tuple(widths) == RESNET18_WIDTHS:
        tv = resnet18(weights=None)
        parts = OrderedDict((n, getattr(tv, n)) for n in ("conv1", "bn1", "relu", "maxpool"))
        parts.update((f"layer{i}", getattr(tv, f"layer{i}")) for i in range(1, 5))
    else:
        parts = OrderedDict(
            conv1=nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
            bn1=nn.BatchNorm2d(widths[0]),
            relu=nn.ReLU(inplace=True),
            maxpool=nn.MaxPool2d(3, 2, 1),
        )
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            parts[f"layer{i + 1}"] = nn.Sequential(
                BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)
            )
            inplanes = planes
        _init_like_torchvision(nn.Sequential(parts))
    if in_channels != 3 or stem_stride != 2:
        # The audio student's stem: a new first conv (1 channel, 7x7, stride 1), as in the paper.
        parts["conv1"] = nn.Conv2d(in_channels, widths[0], 7, stem_stride, 3, bias=False)
        _init_like_torchvision(parts["conv1"])
    return nn.Sequential(parts)


def _stride2(n: int) -> int:
    return (n + 2 - 3) // 2 + 1  # a 3x3 conv / max-pool with stride 2 and padding 1


# ---- students ------------------------------------------------------------------------------------


class ImageStudent(nn.Module):
    """Image student: ResNet-18 trunk on one RGB frame, global average pool → ``num_features``.

    Args:
        widths: Stage widths; :data:`RESNET18_WIDTHS` is torchvision's resnet18.
        num_features: Output size; a linear projection is added when it differs from ``widths[-1]``.
    """

    def __init__(self, widths: Sequence[int] = RESNET18_WIDTHS, num_features: int = EMBED_DIM):
        super().__init__()
        self.trunk = _resnet_trunk(widths, in_channels=3, stem_stride=2)
        self.proj = nn.Identity() if widths[-1] == num_features else nn.Linear(widths[-1], num_features)
        self.num_features = num_features

    def forward_features(self, frames: Tensor) -> Tensor:
        """``(B, 3, H, W)`` → feature map ``(B, C, H/32, W/32)``."""
        return self.trunk(frames)

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """Feature map ``(B, C, h, w)`` → average pool and projection ``(B, num_features)`` = z_I.

        An embedding model: ``pre_logits`` changes nothing (z_I is the pre-logits feature).
        """
        return self.proj(x.mean(dim=(2, 3)))  # (B, num_features)

    def forward(self, frames: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised frames → ``(B, num_features)`` = z_I."""
        return self.forward_head(self.forward_features(frames))


class AudioStudent(nn.Module):
    """Audio student: ResNet-18 trunk with a 1-channel 7x7 stride-1 stem on a log-mel spectrogram.

    The trunk leaves a ``(C, T', 3)`` map (time, frequency) for 40 mel bands; a 1x1 conv over the 3
    frequency bins collapses frequency, then a max-pool over time gives ``num_features``.

    Args:
        widths: Stage widths.
        num_features: Output size; a linear projection is added when it differs from ``widths[-1]``.
        n_mels: Mel bands of the input (sets the frequency width left after the trunk).
    """

    def __init__(
        self, widths: Sequence[int] = RESNET18_WIDTHS, num_features: int = EMBED_DIM, n_mels: int = 40
    ):
        super().__init__()
        self.trunk = _resnet_trunk(widths, in_channels=1, stem_stride=1)
        freq_bins = n_mels
        for _ in range(4):  # max-pool, layer2, layer3, layer4 each halve frequency
            freq_bins = _stride2(freq_bins)
        self.freq_bins = freq_bins
        self.freq_collapse = nn.Conv2d(freq_bins, 1, kernel_size=1)
        self.proj = nn.Identity() if widths[-1] == num_features else nn.Linear(widths[-1], num_features)
        self.num_features = num_features

    def forward_features(self, mel: Tensor) -> Tensor:
        """``(B, 1, T, F)`` log-mel → ``(B, C, T')`` after collapsing frequency."""
        x = self.trunk(mel)  # (B, C, T', F')
        if x.shape[3] != self.freq_bins:
            raise ValueError(f"audio student built for {self.freq_bins} frequency bins, got {x.shape[3]}")
        x = self.freq_collapse(x.permute(0, 3, 1, 2))  # (B, 1, C, T'): frequency bins act as channels
        return x[:, 0]  # (B, C, T')

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """``(B, C, T')`` → max-pool over time and projection ``(B, num_features)`` = z_A.

        An embedding model: ``pre_logits`` changes nothing (z_A is the pre-logits feature).
        """
        return self.proj(x.amax(dim=2))  # (B, num_features)

    def forward(self, mel: Tensor) -> Tensor:
        """``(B, 1, 101, 40)`` log-mel → ``(B, num_features)`` = z_A."""
        return self.forward_head(self.forward_features(mel))


class Fusion(nn.Module):
    """Ψ: ``concat(z_I, z_A)`` → Linear → ReLU → Linear = z_IA, the image-audio clip embedding."""

    def __init__(
        self, in_features: int = 2 * EMBED_DIM, hidden: int = 2 * EMBED_DIM, num_features: int = EMBED_DIM
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_features)
        self.num_features = num_features

    def forward_features(self, z_i: Tensor, z_a: Tensor) -> Tensor:
        """``(B, D_I)``, ``(B, D_A)`` → hidden activation ``(B, hidden)``."""
        return F.relu(self.fc1(torch.cat([z_i, z_a], dim=1)))

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """Hidden ``(B, hidden)`` → z_IA ``(B, num_features)``; an embedding model, so ``pre_logits`` changes
        nothing."""
        return self.fc2(x)

    def forward(self, z_i: Tensor, z_a: Tensor) -> Tensor:
        """``(B, D_I)``, ``(B, D_A)`` → ``(B, num_features)``."""
        return self.forward_head(self.forward_features(z_i, z_a))


class Classifier(nn.Module):
    """Linear classifier on z_IA: ``(B, in_features)`` → ``(B, num_classes)`` logits."""

    def __init__(self, in_features: int = EMBED_DIM, num_classes: int = 400):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes} must be >= 1")
        self.fc = nn.Linear(in_features, num_classes)
        self.num_classes = num_classes
        self.num_features = in_features

    def forward_features(self, z: Tensor) -> Tensor:
        """The embedding itself ``(B, in_features)``: a linear head has no trunk."""
        return z

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """``(B, in_features)`` → logits ``(B, num_classes)``, or ``x`` itself if ``pre_logits``."""
        return x if pre_logits else self.fc(x)

    def forward(self, z: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(z))


# ---- teacher -------------------------------------------------------------------------------------


class _SmallR2Plus1d(nn.Module):
    """torchvision's R(2+1)D-18 topology at other widths (same module names: stem, layer1..4, fc)."""

    def __init__(self, widths: Sequence[int], stem_width: int, num_classes: int, num_features: int):
        super().__init__()
        from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D

        self.stem = nn.Sequential(
            nn.Conv3d(3, stem_width, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv3d(stem_width, widths[0], (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(widths[0]),
            nn.ReLU(inplace=True),
        )
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv3d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm3d(planes)
                )
            block = nn.Sequential(
                BasicBlock(inplanes, planes, Conv2Plus1D, stride, down),
                BasicBlock(planes, planes, Conv2Plus1D),
            )
            setattr(self, f"layer{i + 1}", block)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(num_features, num_classes)
        _init_like_torchvision(self)


class Teacher(nn.Module):
    """Frozen clip teacher: R(2+1)D-18 → 512-d pooled clip descriptor; its fc gives class logits.

    Always in eval mode with ``requires_grad=False`` (``train()`` is a no-op), so BatchNorm statistics
    never drift during distillation.

    Args:
        widths: Stage widths; :data:`RESNET18_WIDTHS` is torchvision's ``r2plus1d_18`` itself, so its
            state dicts (e.g. Kinetics-400 weights) load into :attr:`net`.
        stem_width: Channels between the stem's spatial and temporal convs (45 in torchvision).
        num_classes: Classes of the fc head (400 for Kinetics), used only for the optional KL term.
        num_features: Descriptor size; a projection is added when it differs from ``widths[-1]``.
    """

    def __init__(
        self,
        widths: Sequence[int] = RESNET18_WIDTHS,
        stem_width: int = 45,
        num_classes: int = 400,
        num_features: int = EMBED_DIM,
    ):
        super().__init__()
        from torchvision.models.video import r2plus1d_18

        if tuple(widths) == RESNET18_WIDTHS and stem_width == 45 and num_features == widths[-1]:
            self.net = r2plus1d_18(weights=None, num_classes=num_classes)
        else:
            self.net = _SmallR2Plus1d(widths, stem_width, num_classes, num_features)
        self.proj = nn.Identity() if widths[-1] == num_features else nn.Linear(widths[-1], num_features)
        self.num_features = num_features
        self.num_classes = num_classes
        # Channels-last 3-D convolutions: 1.2-1.7x faster for R(2+1)D-18 and 1.4-3x for the tiny teacher on
        # this project's CPU (oneDNN), same values to 1e-6. load_state_dict copies into these weights and
        # .to(device) keeps their layout; weights_sha256 hashes values, not layout.
        self.net.to(memory_format=torch.channels_last_3d)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Frozen: stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    def forward_features(self, clip: Tensor) -> Tensor:
        """``(B, 3, T, H, W)`` → feature map ``(B, C, T/8, H/16, W/16)``."""
        n = self.net
        clip = clip.contiguous(memory_format=torch.channels_last_3d)  # a no-op for clips_to_tensor's
        return n.layer4(n.layer3(n.layer2(n.layer1(n.stem(clip)))))

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """Feature map → pooled, projected clip descriptor ``(B, num_features)``.

        The descriptor is what distillation matches, so the teacher is used as an embedding model and
        ``pre_logits`` changes nothing; its class logits are :meth:`logits` of the descriptor.
        """
        return self.proj(self.net.avgpool(x).flatten(1))  # (B, num_features)

    def forward(self, clip: Tensor) -> Tensor:
        """``(B, 3, 16, 112, 112)`` Kinetics-normalised clip → ``(B, num_features)`` descriptor."""
        return self.forward_head(self.forward_features(clip))

    def logits(self, descriptor: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` of the teacher's fc on a descriptor (teacher's or z_IA)."""
        return self.net.fc(descriptor)


# ---- registered entry points ---------------------------------------------------------------------


TINY_WIDTHS = (16, 32, 64, 128)
TINY_TEACHER_WIDTHS = (4, 8, 16, 32)


@register_model
def image_resnet18(**kwargs: Any) -> ImageStudent:
    """Paper image student: torchvision ResNet-18 trunk, 112x112 RGB → 512."""
    return ImageStudent(**kwargs)


@register_model
def image_resnet18_tiny(**kwargs: Any) -> ImageStudent:
    """Tiny image student: ResNet-18 topology at widths 16-128, projected to 512."""
    return ImageStudent(**{"widths": TINY_WIDTHS, **kwargs})


@register_model
def audio_resnet18(**kwargs: Any) -> AudioStudent:
    """Paper audio student: ResNet-18 trunk, 1-ch 7x7 stride-1 stem, freq 1x1 conv, time max-pool → 512."""
    return AudioStudent(**kwargs)


@register_model
def audio_resnet18_tiny(**kwargs: Any) -> AudioStudent:
    """Tiny audio student: widths 16-128, projected to 512."""
    return AudioStudent(**{"widths": TINY_WIDTHS, **kwargs})


@register_model
def fusion_mlp(**kwargs: Any) -> Fusion:
    """Paper Ψ: 1024 → 1024 → ReLU → 512."""
    return Fusion(**kwargs)


@register_model
def fusion_mlp_tiny(**kwargs: Any) -> Fusion:
    """Tiny Ψ: 1024 → 128 → ReLU → 512."""
    return Fusion(**{"hidden": 128, **kwargs})


@register_model
def classifier_linear(**kwargs: Any) -> Classifier:
    """Linear 512 → C classifier on z_IA."""
    return Classifier(**kwargs)


@register_model
def teacher_r2plus1d_18(**kwargs: Any) -> Teacher:
    """Paper teacher: torchvision r2plus1d_18, 512-d descriptor, 400-way Kinetics fc."""
    return Teacher(**kwargs)


@register_model
def teacher_r2plus1d_18_tiny(**kwargs: Any) -> Teacher:
    """Tiny teacher: R(2+1)D-18 topology at widths 4-32, projected to 512, 10-way fc."""
    return Teacher(**{"widths": TINY_TEACHER_WIDTHS, "stem_width": 4, "num_classes": 10, **kwargs})


# ---- students bundle -----------------------------------------------------------------------------


class Students(nn.Module):
    """The ImgAud2Vid students: image, audio, fusion Ψ and an optional classifier.

    Args:
        image: Image student (``(B, 3, 112, 112)`` → ``(B, 512)``).
        audio: Audio student (``(B, 1, 101, 40)`` → ``(B, 512)``).
        fusion: Ψ (``(B, 512), (B, 512)`` → ``(B, 512)``).
        classifier: Optional ``(B, 512)`` → ``(B, C)`` head, added by fine-tuning.
    """

    def __init__(
        self, image: nn.Module, audio: nn.Module, fusion: nn.Module, classifier: nn.Module | None = None
    ):
        super().__init__()
        self.image = image
        self.audio = audio
        self.fusion = fusion
        self.classifier = classifier
        self.num_features = fusion.num_features

    def forward(self, frames: Tensor, mel: Tensor) -> dict[str, Tensor | None]:
        """Embeddings (and logits when a classifier is attached).

        Args:
            frames: ``(B, 3, H, W)`` normalised frames (:func:`indexing.frontend.frames_to_tensor`).
            mel: ``(B, 1, 101, 40)`` log-mel (:func:`indexing.frontend.log_mel`).

        Returns:
            ``z_i``, ``z_a``, ``z_ia``: ``(B, 512)`` each; ``logits``: ``(B, C)`` or None.
        """
        z_i = self.image(frames)  # (B, 512)
        z_a = self.audio(mel)  # (B, 512)
        z_ia = self.fusion(z_i, z_a)  # (B, 512)
        logits = self.classifier(z_ia) if self.classifier is not None else None
        return {"z_i": z_i, "z_a": z_a, "z_ia": z_ia, "logits": logits}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def embed(self, frames: Tensor | np.ndarray, audio: Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Step features for extraction, in eval mode without gradients.

        Args:
            frames: ``(B, H, W, 3)`` uint8 RGB frames (one per step).
            audio: ``(B, 16000)`` float32 mono 16 kHz waves (zeros where the video has no audio).

        Returns:
            ``image``, ``audio``, ``fused``: ``(B, 512)`` float32 numpy arrays (the store's feature names).
        """
        was_training = self.training
        self.eval()
        dev = self.device
        x = frames_to_tensor(torch.as_tensor(frames).to(dev))  # (B, 3, H, W)
        mel = log_mel(torch.as_tensor(audio).to(dev))  # (B, 1, 101, 40)
        out = self(x, mel)
        self.train(was_training)
        return {
            "image": out["z_i"].float().cpu().numpy(),
            "audio": out["z_a"].float().cpu().numpy(),
            "fused": out["z_ia"].float().cpu().numpy(),
        }

    def specs(self) -> dict[str, dict[str, Any]]:
        """``{role: {"name", "args"}}`` of every part, as checkpoints record them."""
        parts = {"image": self.image, "audio": self.audio, "fusion": self.fusion}
        if self.classifier is not None:
            parts["classifier"] = self.classifier
        return {role: model_spec(m) for role, m in parts.items()}

    def attach_classifier(self, num_classes: int, *, seed: int = 0) -> None:
        """Replace the classifier with a fresh seeded ``classifier_linear`` of ``num_classes`` outputs."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = create_model("classifier_linear", in_features=self.num_features, num_classes=num_classes)
        self.classifier = head.to(self.device)


def build_students(
    preset: str = "paper",
    *,
    seed: int = 0,
    num_classes: int | None = None,
    init_resnet18: str | Path | None = None,
) -> Students:
    """Fresh students of a preset, seeded without touching the global RNG.

    Args:
        preset: One of :data:`PRESETS`.
        seed: Initialisation seed.
        num_classes: Attach a classifier with this many classes.
        init_resnet18: Optional torchvision ``resnet18`` state dict file (e.g. ImageNet weights) to
            initialise both trunks from, as the paper does (the audio stem stays random).

    Raises:
        ConfigError: Unknown preset.
        CheckpointError: An init file that does not fit.
    """
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; available: {', '.join(available_presets())}")
    names = PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        students = Students(
            create_model(names["image"]), create_model(names["audio"]), create_model(names["fusion"])
        )
    if init_resnet18 is not None:
        state = ckpt_io.read_file(init_resnet18)
        if not isinstance(state, dict) or "conv1.weight" not in state:
            raise CheckpointError(
                f"{init_resnet18}: expected a torchvision resnet18 state dict, "
                f"found {ckpt_io.describe(state)}"
            )
        trunk_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        ckpt_io.load_state_checked(students.image.trunk, trunk_state, where=f"{init_resnet18} (image trunk)")
        audio_state = dict(
            trunk_state, **{"conv1.weight": students.audio.trunk.conv1.weight.detach().clone()}
        )
        ckpt_io.load_state_checked(students.audio.trunk, audio_state, where=f"{init_resnet18} (audio trunk)")
    if num_classes is not None:
        students.attach_classifier(num_classes, seed=seed)
    return students


def students_from_checkpoint(ckpt: dict[str, Any], *, where: str = "checkpoint") -> Students:
    """Rebuild :class:`Students` from a loaded ``students`` checkpoint dict (see :mod:`indexing.checkpoint`).

    Raises:
        CheckpointError: Unknown model names, missing roles, or weights that do not fit.
    """
    specs = ckpt["models"]
    for role in ("image", "audio", "fusion"):
        if role not in specs:
            raise CheckpointError(
                f"{where}: students checkpoint lacks the {role!r} model; found {', '.join(specs)}"
            )
    parts = {}
    for role, spec in specs.items():
        if spec["name"] not in _MODELS:
            raise CheckpointError(
                f"{where}: the {role} model {spec['name']!r} is not registered in this l2l (available: "
                f"{', '.join(available_models())}); upgrade l2l or import the module that registers it"
            )
        model = create_model(spec["name"], **spec["args"])
        sub = ckpt_io.split_state_dict(ckpt["state_dict"], role)
        ckpt_io.load_state_checked(model, sub, where=f"{where} ({role}: {spec['name']})")
        parts[role] = model
    return Students(parts["image"], parts["audio"], parts["fusion"], parts.get("classifier"))


def load_students(spec: str | Path, *, device: str | torch.device = "cpu") -> tuple[Students, dict[str, Any]]:
    """Students for extraction or training, from a checkpoint or explicitly random weights.

    Args:
        spec: A students checkpoint path, or ``random:SEED`` / ``random:SEED:PRESET`` (paper preset by
            default) for seeded random weights -- for pipeline tests only; a warning is logged.
        device: Where to put the model (it is returned in eval mode).

    Returns:
        ``(students, meta)``; meta has ``kind``, ``path``, ``random``, ``preset`` (random only),
        ``models`` (role → name/args), ``sha256`` (of the weights), ``classes``, ``epoch``, ``config``,
        ``teacher_sha256`` (of the teacher it was distilled from, when recorded).

    Raises:
        ConfigError: Bad ``random:`` spec.
        CheckpointError: No such file, wrong checkpoint kind, unsafe file or weights that do not fit.
    """
    spec = str(spec)
    if spec.startswith("random:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1].lstrip("-").isdigit():
            raise ConfigError(
                f"bad students spec {spec!r}; use random:SEED or random:SEED:PRESET (e.g. random:0:tiny)"
            )
        preset = parts[2] if len(parts) == 3 else "paper"
        students = build_students(preset, seed=int(parts[1]))
        # info, not warning: every worker process loads them, and `l2l extract` says it once itself
        log.info("using RANDOM student weights (%s): features are meaningless, for pipeline tests only", spec)
        meta = {
            "kind": "students",
            "path": None,
            "random": True,
            "seed": int(parts[1]),
            "preset": preset,
            "classes": None,
            "epoch": 0,
            "config": {},
            "teacher_sha256": None,
        }
    else:
        ckpt = ckpt_io.load_checkpoint(spec, kind="students")
        students = students_from_checkpoint(ckpt, where=spec)
        meta = {
            "kind": "students",
            "path": spec,
            "random": False,
            "classes": ckpt["extra"].get("classes"),
            "teacher_sha256": ckpt["extra"].get("teacher_sha256"),
            "epoch": ckpt["epoch"],
            "config": ckpt["config"],
        }
    meta["models"] = students.specs()
    meta["sha256"] = ckpt_io.weights_sha256(students.state_dict())
    return students.to(device).eval(), meta


def build_teacher(preset: str = "paper", *, seed: int = 0) -> Teacher:
    """A randomly initialised (seeded) teacher of a preset; use :func:`load_teacher` for real weights."""
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; available: {', '.join(available_presets())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(PRESETS[preset]["teacher"])


def load_teacher(
    weights: str | Path | None = None,
    *,
    preset: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Teacher, dict[str, Any]]:
    """The frozen teacher, from a torchvision-style r2plus1d_18 state dict file or a seeded preset.

    Args:
        weights: A file holding a torchvision ``r2plus1d_18`` state dict (keys ``stem.0.weight`` ...
            ``fc.bias``; a ``{"state_dict": ...}`` wrapper is accepted), e.g. Kinetics-400 weights.
            The fc size is taken from the file.
        preset: Without ``weights``: a seeded random teacher of this preset (``tiny`` for tests/demo).
        seed: Seed of the preset teacher.
        device: Where to put the teacher.

    Returns:
        ``(teacher, meta)``; meta has ``name``, ``args``, ``sha256`` (of the weights), ``path``, ``random``.

    Raises:
        ConfigError: Neither or both sources given.
        CheckpointError: A file of the wrong kind (e.g. a students checkpoint) or with wrong shapes, or an
            unsafe pickled file.
    """
    if (weights is None) == (preset is None):
        raise ConfigError(
            "give exactly one teacher source: weights (a state dict file) or a preset (e.g. tiny)"
        )
    if weights is not None:
        state = ckpt_io.read_file(weights)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "format" not in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or "fc.weight" not in state or "stem.0.weight" not in state:
            raise CheckpointError(
                f"{weights}: expected a torchvision r2plus1d_18 state dict "
                "(keys stem.0.weight ... fc.weight), "
                f"found {ckpt_io.describe(state)}"
            )
        num_classes = int(state["fc.weight"].shape[0])
        teacher = create_model("teacher_r2plus1d_18", num_classes=num_classes)
        ckpt_io.load_state_checked(teacher.net, state, where=f"{weights} (teacher_r2plus1d_18)")
        meta = {"path": str(weights), "random": False}
    else:
        teacher = build_teacher(preset, seed=seed)
        log.info("using a seeded random %s teacher (seed %d)", preset, seed)
        meta = {"path": None, "random": True, "preset": preset, "seed": seed}
    meta.update(model_spec(teacher), sha256=ckpt_io.weights_sha256(teacher.state_dict()))
    return teacher.to(device), meta
