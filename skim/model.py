"""ImgAud-Skimming (design.md §3): an LSTM that previews cheap per-step features and indexes into the video.

Per video of ``N`` steps with per-step features ``z_M`` (``(N, D)``, one per indexing modality ``M``) and a
validity mask ``m`` (``(N,)``):

- keys ``k_M = ReLU(BN(W_M z_M))``: a 1x1 conv (applied as a ``Linear`` on the last axis, the same map)
  and a batch norm whose statistics count valid rows only (:class:`MaskedBatchNorm1d`);
- start ``x`` = mean of the valid rows; ``h = c = 0``;
- for ``t < T``: ``u_t = Psi(x)``; ``(h, c) = LSTMCell(u_t, (h, c))`` (weight-normed); queries
  ``q_M = MLP_M(h)``; scores ``s_M = q_M . k_M / sqrt(D)`` masked to ``-inf`` on padding and on the steps
  modality ``M`` already chose (one mask per modality, as paper and reference); ``alpha_M = softmax(s_M)``;
  modality attention ``beta = softmax(Linear(h))``; next input ``x = sum_M beta_M sum_j alpha_M[j] z[j]``
  (soft) or the same with ``alpha_M`` replaced by a one-hot at ``argmax alpha_M`` (hard, inference only);
  ``argmax alpha_M`` is masked out of ``M``'s later scores;
- prediction: a linear classifier on the mean of ``u_0 .. u_{T-1}``; loss: cross-entropy, plus an optional
  per-step head on ``h`` with its own weight.

The attention computed at the last step would feed nothing, so no selection is made there: a run of ``T``
steps makes ``T - 1`` selections (one step per indexing modality each), and every selection is consumed.
In training the last step's queries still run through their batch norms (``query_bn="every_step"``), so
the running statistics see all ``T`` queries as in the reference. A video with fewer valid steps than
selections stops early once every step has been chosen (the reference pads by repeating the last row
and crashes when a whole batch is short); its prediction averages the inputs it took.

Initialisation (``weight_init="reference"``): N(0, 0.02) Linear weights, zero LSTM biases, as the
reference. ``Psi`` and the classifier start from the fine-tuned students when trained with
``init="students"`` (:mod:`skim.train`), as in the reference; trained from scratch they keep PyTorch's
default initialisation (the reference has none of its own for them, and N(0, 0.02) stalls them). The
project's earlier choices stay available as config values:
``mask="shared"`` (every pick leaves both modalities), ``query_bn="skip_last"``, ``weight_init="torch"``.

Unlike the public reference implementation: every parameter taking part in the loss receives a gradient
(modality attention and per-step head included); the hard path takes each modality's features at that
modality's own argmax; there is no random masked start; the key batch norm ignores padding; and padding rows
are zeroed on entry, so their values (even NaN) never reach an output, a statistic or a gradient.

Variants (fields of :class:`SkimConfig`): single-modality indexing (one indexing feature), a shared query,
recognition features that differ from the indexing features (another feature set, possibly from a second
store: keys ``"rec:<name>"``), hard next input, stopping after ``k < T`` steps, confidence-based early
exit, and indexing features sub-sampled by ``k`` and linearly interpolated back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from indexing.errors import CheckpointError, ConfigError
from indexing.stores import FEATURES

NEXT_INPUTS = ("soft", "hard")  # next LSTM input at inference: attention-weighted mixture or argmax steps
EXIT_ON = ("running", "step_head")  # which probability the early exit thresholds
# Fields that change only how a trained model runs, never its parameters: evaluate/query may override them.
INFERENCE_FIELDS = ("next_input", "stop_after", "exit_threshold", "exit_on", "subsample")
MASKS = ("per_modality", "shared")  # each modality masks only its own picks (paper) / both masks all picks
QUERY_BN = ("every_step", "skip_last")  # query BN statistics from all T steps (paper) / the first T-1
WEIGHT_INITS = ("reference", "torch")  # N(0, 0.02) Linear/Conv, zero LSTM biases (paper) / PyTorch defaults
# Checkpoints written before these fields existed were trained with the project's earlier choices.
LEGACY_DEFAULTS = {"mask": "shared", "query_bn": "skip_last", "weight_init": "torch"}
RECOGNITION_PREFIX = "rec:"  # batch key prefix of features read from a separate recognition store
# Inference precision of the recurrent loop's matrix-vector products: bf16 only where the CPU has native bf16
# dot products (``auto``), fp32 everywhere else; training is always fp32 (see SkimModel.set_precision).
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX). Without them oneDNN emulates bf16
    and a bf16 matmul is far slower than fp32 (30x on an AVX2-only host, measured)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in another torch means "not known"
        return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``fp32`` or ``bf16`` for ``precision`` on ``device``: ``auto`` is bf16 on a CPU with native bf16.

    Raises:
        ConfigError: An unknown precision, or ``bf16`` asked for where the hardware would emulate it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; choose from {', '.join(PRECISIONS)}")
    on_cpu = torch.device(device).type == "cpu"
    if precision == "auto":
        return "bf16" if on_cpu and native_bf16() else "fp32"
    if precision == "bf16" and not (on_cpu and native_bf16()):
        raise ConfigError(
            f"precision=bf16 on {device}: only CPUs with native bf16 dot products (AVX512-BF16 or AMX) run "
            "the bf16 path (elsewhere it is emulated and slower than fp32); use --precision fp32 or auto"
        )
    return precision


@dataclass(frozen=True)
class SkimConfig:
    """Architecture and inference settings of one skimming model (written into checkpoints).

    Attributes:
        num_classes: Number of action classes.
        index_features: Store features the queries attend over, one query per feature (``K`` of them).
        recognition_features: Features the chosen steps are recognised with (fed to ``Psi``); empty means
            the indexing features. When they differ, the first input ``u_0`` comes from the mean of the
            indexing features through a separate ``Psi_start``, so recognition never runs on every step.
        recognition_store: Recognition features come from a second store (batch keys ``rec:<name>``).
        dim: Per-step feature dimension ``D``.
        hidden: LSTM hidden size.
        embed: Output size of ``Psi`` (the LSTM input and the classifier input).
        num_steps: ``T``, recurrent steps in training (and at inference unless ``stop_after``).
        shared_query: One query MLP for all indexing modalities instead of one each.
        step_head_weight: If > 0, a per-step classifier on ``h`` trained with this loss weight.
        next_input: ``soft`` or ``hard`` next input at inference (training is always soft).
        stop_after: At inference, stop after this many steps (``<= num_steps``); None runs ``num_steps``.
        exit_threshold: At inference, a video stops once the max class probability reaches this value.
        exit_on: ``running`` (the classifier on the mean of the inputs so far) or ``step_head``.
        subsample: Indexing features are kept every ``subsample`` steps and linearly interpolated back.
        bn_momentum: Momentum of the running statistics of the batch norms.
        mask: ``per_modality`` (paper and reference: a chosen step is masked out of its own modality's
            later scores only) or ``shared`` (one mask: every pick is removed from every modality).
        query_bn: ``every_step`` (paper: the query batch norms see the queries of all ``T`` steps, so
            training also runs the last step's queries, whose attention feeds nothing) or ``skip_last``.
        weight_init: ``reference`` (N(0, 0.02) Linear/Conv weights, N(1, 0.02) 2-D BatchNorm weights,
            zero LSTM biases) or ``torch`` (PyTorch's defaults).
        psi_hidden: Hidden size of ``Psi`` (None: ``hidden``); set from the students' fusion when ``Psi``
            starts from the students checkpoint.
    """

    num_classes: int
    index_features: tuple[str, ...] = ("image", "audio")
    recognition_features: tuple[str, ...] = ()
    recognition_store: bool = False
    dim: int = 512
    hidden: int = 1024
    embed: int = 512
    num_steps: int = 10
    shared_query: bool = False
    step_head_weight: float = 0.0
    next_input: str = "soft"
    stop_after: int | None = None
    exit_threshold: float | None = None
    exit_on: str = "running"
    subsample: int = 1
    bn_momentum: float = 0.1
    mask: str = "per_modality"
    query_bn: str = "every_step"
    weight_init: str = "reference"
    psi_hidden: int | None = None

    def __post_init__(self) -> None:
        # Checkpoints store tuples as lists; accept either.
        object.__setattr__(self, "index_features", tuple(self.index_features))
        object.__setattr__(self, "recognition_features", tuple(self.recognition_features))
        if self.num_classes < 2:
            raise ConfigError(
                f"num_classes={self.num_classes}: need at least 2 classes in the labels manifest"
            )
        for role, names in (("index", self.index_features), ("recognition", self.recognition_features)):
            known = FEATURES + (("teacher",) if role == "recognition" else ())  # teacher: a store feature set
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ConfigError(f"{role} features {unknown} unknown; choose from {', '.join(known)}")
            if len(set(names)) != len(names):
                raise ConfigError(f"{role} features {list(names)} repeat a name; list each feature once")
        if not self.index_features:
            raise ConfigError("index_features is empty; give at least one of " + ", ".join(FEATURES))
        if self.recognition_store and not self.recognition_features:
            raise ConfigError(
                "recognition_store=True needs recognition_features (which features to read there)"
            )
        if self.num_steps < 2:
            raise ConfigError(
                f"num_steps={self.num_steps}: need >= 2, since the first input is the mean and only later "
                "steps use (and train) the indexing; use stop_after=1 to evaluate a single step"
            )
        if min(self.dim, self.hidden, self.embed) < 1:
            raise ConfigError(f"dim/hidden/embed must be positive, got {self.dim}/{self.hidden}/{self.embed}")
        if self.step_head_weight < 0:
            raise ConfigError(
                f"step_head_weight={self.step_head_weight} is negative; use 0 to disable the head"
            )
        if self.next_input not in NEXT_INPUTS:
            raise ConfigError(f"next_input={self.next_input!r}; choose from {', '.join(NEXT_INPUTS)}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.num_steps:
            raise ConfigError(f"stop_after={self.stop_after} must be in [1, num_steps={self.num_steps}]")
        if self.exit_threshold is not None and not 0 < self.exit_threshold <= 1:
            raise ConfigError(f"exit_threshold={self.exit_threshold} must be a probability in (0, 1]")
        if self.exit_on not in EXIT_ON:
            raise ConfigError(f"exit_on={self.exit_on!r}; choose from {', '.join(EXIT_ON)}")
        if self.exit_on == "step_head" and self.exit_threshold is not None and self.step_head_weight == 0:
            raise ConfigError("exit_on='step_head' needs a trained per-step head: set step_head_weight > 0")
        if self.subsample < 1:
            raise ConfigError(f"subsample={self.subsample} must be >= 1 (1 keeps every step)")
        for name, value, choices in (
            ("mask", self.mask, MASKS),
            ("query_bn", self.query_bn, QUERY_BN),
            ("weight_init", self.weight_init, WEIGHT_INITS),
        ):
            if value not in choices:
                raise ConfigError(f"{name}={value!r}; choose from {', '.join(choices)}")
        if self.psi_hidden is not None and self.psi_hidden < 1:
            raise ConfigError(f"psi_hidden={self.psi_hidden} must be positive (or None for hidden)")
        if not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"bn_momentum={self.bn_momentum} must be in (0, 1]")

    @property
    def index_keys(self) -> tuple[str, ...]:
        """Batch keys of the indexing features."""
        return self.index_features

    @property
    def recognition_keys(self) -> tuple[str, ...]:
        """Batch keys of the recognition features (``rec:<name>`` when read from a second store)."""
        if not self.recognition_features:
            return self.index_features
        if self.recognition_store:
            return tuple(RECOGNITION_PREFIX + n for n in self.recognition_features)
        return self.recognition_features

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Every feature key a batch must carry, indexing first, without repeats."""
        return tuple(dict.fromkeys(self.index_keys + self.recognition_keys))

    @property
    def separate_recognition(self) -> bool:
        """Whether recognition uses other features than indexing (then ``u_0`` comes from ``Psi_start``)."""
        return self.recognition_keys != self.index_keys

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["index_features"] = list(self.index_features)
        d["recognition_features"] = list(self.recognition_features)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SkimConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(
                f"unknown SkimConfig fields {unknown}; this checkpoint is from another version"
            )
        return cls(**{**LEGACY_DEFAULTS, **d})

    def with_inference(self, **overrides: Any) -> SkimConfig:
        """A copy with inference-only fields changed (``None`` values keep the current setting)."""
        bad = sorted(set(overrides) - set(INFERENCE_FIELDS))
        if bad:
            raise ConfigError(
                f"{bad} change the model's parameters; only {', '.join(INFERENCE_FIELDS)} may vary"
            )
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# ---- registry (timm style: short named entry points over one configurable class) ------------------------

_MODELS: dict[str, Callable[..., SkimConfig]] = {}


def register_model(fn: Callable[..., SkimConfig]) -> Callable[..., SkimConfig]:
    """Decorator: make a config preset available under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def available_models() -> list[str]:
    """Names of the registered skimming models (the CLI's ``--model-name`` choices)."""
    return sorted(_MODELS)


def model_config(name: str, **overrides: Any) -> SkimConfig:
    """The config of registered model ``name`` with ``overrides``; ``ValueError`` for unknown names."""
    if name not in _MODELS:
        raise ConfigError(f"Unknown skimming model {name!r}; available: {', '.join(available_models())}")
    return _MODELS[name](**overrides)


def create_model(name: str, **overrides: Any) -> SkimModel:
    """Build registered model ``name`` (e.g. ``create_model("imgaud_skim", num_classes=10)``)."""
    return SkimModel(model_config(name, **overrides))


@register_model
def imgaud_skim(**overrides: Any) -> SkimConfig:
    """The paper's ImgAud-Skimming: image and audio queries, recognition on image + audio features."""
    return SkimConfig(**{"index_features": ("image", "audio"), **overrides})


@register_model
def fused_skim(**overrides: Any) -> SkimConfig:
    """Single-modality indexing: one query over the fused image-audio embedding ``z_IA``."""
    return SkimConfig(**{"index_features": ("fused",), **overrides})


@register_model
def visual_skim(**overrides: Any) -> SkimConfig:
    """Visual-only indexing (one image query) with audio-visual recognition of the chosen steps."""
    return SkimConfig(
        **{"index_features": ("image",), "recognition_features": ("image", "audio"), **overrides}
    )


# ---- layers ---------------------------------------------------------------------------------------------


class MaskedBatchNorm1d(nn.Module):
    """Batch norm over the last axis whose statistics count only rows where ``mask`` is true.

    Works on ``(B, N, C)`` with a ``(B, N)`` mask (keys) or ``(B, C)`` with a ``(B,)`` mask (queries).
    Masked rows neither enter the batch statistics nor the running statistics, and are never read, so
    their values (even NaN) cannot leak; their outputs are zero.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def normalize_rows(self, rows: Tensor) -> Tensor:
        """Normalise valid rows ``(M, C)``: batch statistics in training (updating the running ones), the
        running statistics in eval mode or when fewer than two rows make a batch."""
        batch_stats = self.training and rows.shape[0] > 1
        if batch_stats:
            self.num_batches_tracked += 1
        return F.batch_norm(
            rows,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            batch_stats,
            self.momentum,
            self.eps,
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Normalise ``x`` ``(..., C)`` with statistics over rows where ``mask`` (``x.shape[:-1]``) holds.

        Only the valid rows are gathered and normalised (one fused batch-norm kernel); masked rows come
        back as zeros.
        """
        out = x.new_zeros(x.shape)
        out[mask] = self.normalize_rows(x[mask])
        return out


class QueryMLP(nn.Module):
    """``q = Linear(BN-masked ReLU(Linear(h)))``: Linear hidden -> hidden, BN, ReLU, Linear hidden -> dim."""

    def __init__(self, hidden: int, dim: int, *, momentum: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.bn = MaskedBatchNorm1d(hidden, momentum=momentum)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: Tensor, active: Tensor) -> Tensor:
        """``h`` ``(B, hidden)``, ``active`` ``(B,)`` (rows in the statistics) -> query ``(B, dim)``."""
        return self.fc2(F.relu(self.bn(self.fc1(h), active)))


def reference_init(model: nn.Module) -> None:
    """The public reference implementation's initialisation, in place.

    N(0, 0.02) for every Linear and Conv weight (the key projection is the reference's 1x1 Conv1d), N(1, 0.02)
    weights and zero biases for 2-D batch norms, zero LSTM biases; everything else (Linear biases, the 1-D
    batch norms of keys and queries) keeps PyTorch's default, as in the reference. The LSTM weights are
    weight-normed and keep their default direction and norm.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LSTMCell):
            nn.init.zeros_(m.bias_ih)
            nn.init.zeros_(m.bias_hh)


def fusion_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """``Psi``: Linear in -> hidden, ReLU, Linear hidden -> out (design.md §2, trained here from scratch)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def interpolate_subsampled(z: Tensor, lengths: Tensor, factor: int) -> Tensor:
    """Keep rows ``0, k, 2k, ...`` of each video and linearly interpolate the rows in between.

    Rows past the last kept row of a video hold its value (computing them would cost one more step).

    Args:
        z: Features ``(B, N, D)`` with padding already zeroed.
        lengths: Per-video row count ``(B,)`` (rows at or past it are padding).
        factor: Sub-sampling factor ``k >= 1``.

    Returns:
        ``(B, N, D)`` features; padding rows are garbage-free but meaningless.
    """
    if factor == 1:
        return z
    b, n, d = z.shape
    j = torch.arange(n, device=z.device)  # (N,)
    lo = (j // factor) * factor  # (N,) kept row at or before j
    hi = lo + factor  # (N,) next kept row
    hi_ok = hi[None, :] < lengths[:, None]  # (B, N) whether the next kept row exists in this video
    frac = torch.where(hi_ok, ((j - lo).to(z.dtype) / factor)[None, :], 0.0)  # (B, N)
    hi_idx = torch.where(hi_ok, hi[None, :], lo[None, :])  # (B, N)
    z_lo = z[:, lo]  # (B, N, D)
    z_hi = torch.gather(z, 1, hi_idx[..., None].expand(b, n, d))  # (B, N, D)
    return z_lo + (z_hi - z_lo) * frac[..., None]


# ---- the model ------------------------------------------------------------------------------------------


@dataclass
class SkimOutput:
    """What one forward pass returns (``S = T - 1`` selections, ``K`` indexing modalities).

    Attributes:
        logits: Class scores ``(B, C)`` from the classifier on the mean of the taken inputs.
        step_logits: Per-step head scores ``(B, T, C)``, or None without a head.
        active: ``(B, T)`` whether each recurrent step was taken (early exit and exhausted videos stop).
        steps_used: Recurrent steps taken per video ``(B,)``.
        chosen: Chosen step index per selection and modality ``(B, S, K)``; -1 where no selection was made.
        chosen_weight: ``beta_M * alpha_M[j]`` of each chosen step ``(B, S, K)``; 0 where none.
        attention: Soft mixture weights ``sum_M beta_M alpha_M`` per selection over steps ``(B, S, N)``.
        pooled: Mean of the taken inputs ``(B, embed)`` (the classifier input).
        inputs: The inputs ``u_t`` ``(B, T, embed)``, zero where a step was not taken; the prediction after
            ``k`` steps is ``classifier(inputs[:, :k].sum(1) / active[:, :k].sum(1))``.
    """

    logits: Tensor
    step_logits: Tensor | None
    active: Tensor
    steps_used: Tensor
    chosen: Tensor
    chosen_weight: Tensor
    attention: Tensor
    pooled: Tensor
    inputs: Tensor


class SkimModel(nn.Module):
    """ImgAud-Skimming over stored per-step features; see the module docstring for the equations."""

    def __init__(self, config: SkimConfig) -> None:
        super().__init__()
        cfg = self.config = config
        n_index, n_rec = len(cfg.index_keys), len(cfg.recognition_keys)
        self.num_features = cfg.embed
        # 1x1 Conv1d over time == Linear on the feature axis.
        self.key_proj = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim) for _ in range(n_index))
        self.key_bn = nn.ModuleList(
            MaskedBatchNorm1d(cfg.dim, momentum=cfg.bn_momentum) for _ in range(n_index)
        )
        self.psi = fusion_mlp(n_rec * cfg.dim, cfg.psi_hidden or cfg.hidden, cfg.embed)
        self.psi_start = (
            fusion_mlp(n_index * cfg.dim, cfg.hidden, cfg.embed) if cfg.separate_recognition else None
        )
        lstm = nn.LSTMCell(cfg.embed, cfg.hidden)
        lstm = weight_norm(lstm, name="weight_ih")
        self.lstm = weight_norm(lstm, name="weight_hh")
        n_queries = 1 if cfg.shared_query else n_index
        self.query = nn.ModuleList(
            QueryMLP(cfg.hidden, cfg.dim, momentum=cfg.bn_momentum) for _ in range(n_queries)
        )
        self.modality = nn.Linear(cfg.hidden, n_index) if n_index > 1 else None
        self.classifier = nn.Linear(cfg.embed, cfg.num_classes)
        self.step_head = nn.Linear(cfg.hidden, cfg.num_classes) if cfg.step_head_weight > 0 else None
        self.precision = "fp32"  # of the recurrent loop at inference; see set_precision (never saved)
        if cfg.weight_init == "reference":
            reference_init(self)
            # Psi and the classifier come from the students in the reference, never from this draw; trained
            # from scratch (--init scratch) they keep PyTorch's default (N(0, 0.02) left them too small to
            # learn in 10 epochs on a planted store: accuracy 0.25-0.44 against 1.0). Reset after the full
            # draw, so every other weight is what the reference's initialisation gives.
            for part in (self.psi, self.psi_start, self.classifier):
                for m in part.modules() if part is not None else ():
                    if isinstance(m, nn.Linear):
                        m.reset_parameters()

    def set_precision(self, precision: str) -> str:
        """Choose the inference precision (``auto``, ``fp32`` or ``bf16``); returns the one in use.

        ``bf16`` (``auto`` on a CPU with native bf16) runs the key projection and the per-step
        matrix-vector products of the LSTM, ``Psi`` and the queries with bf16 weights and inputs, fp32
        accumulation and fp32 everything else (batch norms, scores, softmax, cell state). At batch 1 those
        products read every weight once per step (about 44 MB of fp32 per step for the paper's sizes, more
        than this CPU's L3), so the loop is bound by memory bandwidth; bf16 halves the bytes. Top labels and
        accuracy matched fp32 on the demo and bench models, but near-tied picks differ (24% of the trained
        demo model's videos; 11% with fp32 keys), so it is opt-in. Training and autograd always run fp32.

        Raises:
            ConfigError: As :func:`resolve_precision`.
        """
        device = next(self.parameters()).device
        self.precision = resolve_precision(precision, device)
        return self.precision

    def forward_features(self, features: Mapping[str, Tensor], mask: Tensor) -> Tensor:
        """The skimming pass up to the classifier input: the mean of the taken inputs ``(B, embed)``."""
        return self(features, mask).pooled

    def forward_head(self, pooled: Tensor, *, pre_logits: bool = False) -> Tensor:
        """Classifier on pooled inputs ``(B, embed)`` -> ``(B, C)`` (``pooled`` itself if ``pre_logits``)."""
        return pooled if pre_logits else self.classifier(pooled)

    def forward(self, features: Mapping[str, Tensor], mask: Tensor) -> SkimOutput:
        """Skim a padded batch.

        Args:
            features: ``config.batch_keys`` -> ``(B, N, D)`` float tensors; padding rows may hold anything.
            mask: ``(B, N)`` bool, true on valid steps.

        Returns:
            A :class:`SkimOutput`.

        Raises:
            KeyError: A feature the config needs is missing from ``features``.
        """
        # The weight-normed LSTM weights are computed once per forward, not once per step.
        with parametrize.cached():
            return self._skim(features, mask)

    def _skim(self, features: Mapping[str, Tensor], mask: Tensor) -> SkimOutput:
        cfg = self.config
        missing = [k for k in cfg.batch_keys if k not in features]
        if missing:
            raise KeyError(f"batch lacks features {missing}; this model needs {list(cfg.batch_keys)}")
        mask = mask.bool()
        b, n = mask.shape
        device = mask.device
        # Padding must reach no sum, statistic or gradient. Keys read valid rows only, and every other use is
        # a product with weights that are zero on padding, which adds exact zeros when the padding is finite:
        # a finite float32 batch (collate's, padding zero) is used as it is, saving a (B, N, D) copy per
        # feature. Anything else (NaN/inf padding, other dtypes, sub-sampling) is zeroed on a copy first.
        clean = {k: _zero_padding(features[k], mask, copy_always=cfg.subsample > 1) for k in cfg.batch_keys}
        # Rows past the last valid one are padding; interpolation never reads beyond it.
        last = torch.where(mask, torch.arange(n, device=device)[None, :] + 1, 0).amax(1) if n else mask.sum(1)
        if cfg.subsample > 1:
            for k in cfg.index_keys:
                clean[k] = torch.where(
                    mask[..., None], interpolate_subsampled(clean[k], last, cfg.subsample), 0.0
                )
        index = [clean[k] for k in cfg.index_keys]  # K x (B, N, D)
        rec = [clean[k] for k in cfg.recognition_keys]  # R x (B, N, D)
        # Keys of valid steps only: padding is never projected, normalised or counted in the statistics.
        rows = mask.reshape(-1).nonzero().squeeze(1)  # (M,) flat indices of valid steps
        # bf16 products only at inference without autograd, on the CPU (see set_precision).
        lowp = self.precision == "bf16" and not self.training and not torch.is_grad_enabled()
        lowp = lowp and device.type == "cpu"
        keys = []
        # dL/dk = sum_t g_t q_t^T is summed once in backward, not accumulated step by step (see _KeyBank).
        key_grads: list[list[tuple[Tensor, Tensor]]] = [[] for _ in index]
        for i, (z, proj, bn) in enumerate(zip(index, self.key_proj, self.key_bn, strict=True)):
            if lowp:  # running statistics (eval): the projection in bf16, the rest fp32
                k = F.relu(bn.normalize_rows(self._bf16_weights()["keys"][i](z.reshape(b * n, -1)[rows])))
                bank = k if rows.shape[0] == b * n else k.new_zeros(b * n, cfg.dim).index_copy_(0, rows, k)
                keys.append(bank.view(b, n, cfg.dim))
                continue
            # (B, N, D): ReLU(BN(W z + b)) on valid rows, zero on padding (_KeyBank: what backward keeps)
            keys.append(
                _KeyBank.apply(
                    z.reshape(b * n, -1),
                    rows,
                    proj.weight,
                    proj.bias,
                    bn.weight,
                    bn.bias,
                    bn,
                    torch.is_grad_enabled(),
                    (b, n),
                    key_grads[i],
                )  # (B, N, D)
            )

        counts = mask.sum(1)  # (B,)
        mean_w = mask.float() / counts.clamp_min(1)[:, None]  # (B, N): mean over valid rows
        if self.psi_start is not None:
            u = self.psi_start(torch.cat([_mix(mean_w, z) for z in index], 1))  # (B, embed)
        else:
            u = self._psi(torch.cat([_mix(mean_w, z) for z in rec], 1), lowp)  # (B, embed)

        hard = not self.training and cfg.next_input == "hard"
        total = cfg.stop_after if (not self.training and cfg.stop_after) else cfg.num_steps
        early_exit = not self.training and cfg.exit_threshold is not None
        n_index = len(index)
        h = torch.zeros(b, cfg.hidden, device=device)  # (B, hidden)
        c = torch.zeros_like(h)
        shared_mask = cfg.mask == "shared"
        # (B, N) per mask: valid and not chosen yet; one per indexing modality (paper) or one shared.
        available = [mask.clone() for _ in range(1 if shared_mask else n_index)]
        bn_last = self.training and cfg.query_bn == "every_step"
        active = counts > 0  # (B,) still skimming
        u_sum = torch.zeros(b, cfg.embed, device=device)  # (B, embed)
        taken = torch.zeros(b, device=device)  # (B,)
        actives, inputs, step_logits, chosen, chosen_w, attention = [], [], [], [], [], []
        for t in range(total):
            actives.append(active)
            inputs.append(torch.where(active[:, None], u, 0.0))
            u_sum = u_sum + inputs[-1]
            taken = taken + active.float()
            last_step = t == total - 1
            if last_step and self.step_head is None:
                # h_{T-1} feeds nothing but, with query_bn="every_step", the queries' BN statistics.
                if bn_last:
                    with torch.no_grad():
                        self._update_query_stats(self.lstm(u, (h, c))[0], active, available)
                break
            h, c = self._lstm_step(u, h, c, lowp)
            if self.step_head is not None:
                step_logits.append(self.step_head(h))  # (B, C)
            if early_exit:
                if cfg.exit_on == "step_head":
                    conf = step_logits[-1].softmax(1).amax(1)  # (B,)
                else:
                    conf = self.classifier(u_sum / taken.clamp_min(1)[:, None]).softmax(1).amax(1)
                active = active & (conf < cfg.exit_threshold)
            if last_step:
                if bn_last:
                    with torch.no_grad():
                        self._update_query_stats(h, active, available)
                break
            # A video with no step left to choose stops here (per-modality masks run out together).
            active = active & _any_left(available)
            queries = self._queries(h, active, lowp)  # K x (B, D)
            alphas = []
            for i, (q, k, buf) in enumerate(zip(queries, keys, key_grads, strict=True)):
                s = _Scores.apply(k, q, buf) / math.sqrt(cfg.dim)  # (B, N)
                s = s.masked_fill(~available[0 if shared_mask else i], float("-inf"))
                # Rows with nothing available (inactive) get all-zero weights instead of a NaN softmax.
                s = torch.where(active[:, None], s, 0.0)
                alphas.append(torch.where(active[:, None], s.softmax(1), 0.0))  # (B, N)
            if self.modality is not None:
                beta = self.modality(h).softmax(1)  # (B, K)
            else:
                beta = torch.ones(b, 1, device=device)
            picks = torch.stack([a.argmax(1) for a in alphas], 1)  # (B, K)
            soft_w = sum(beta[:, i, None] * a for i, a in enumerate(alphas))  # (B, N)
            if hard:
                onehots = [F.one_hot(picks[:, i], n).float() for i in range(n_index)]  # K x (B, N)
                mix_w = sum(beta[:, i, None] * o for i, o in enumerate(onehots)) * active[:, None]
            else:
                mix_w = soft_w
            x = torch.cat([_mix(mix_w, z) for z in rec], 1)  # (B, R * D)
            u = self._psi(x, lowp)  # (B, embed)
            pick_w = torch.stack(
                [beta[:, i] * a.gather(1, picks[:, i : i + 1])[:, 0] for i, a in enumerate(alphas)], 1
            )
            chosen.append(torch.where(active[:, None], picks, -1))
            chosen_w.append(torch.where(active[:, None], pick_w, 0.0))
            attention.append(soft_w)
            if shared_mask:  # every pick leaves both modalities
                picked = torch.zeros_like(mask).scatter_(1, picks, True) & active[:, None]  # (B, N)
                available[0] = available[0] & ~picked
            else:  # each pick leaves only its own modality
                for i in range(n_index):
                    picked = torch.zeros_like(mask).scatter_(1, picks[:, i : i + 1], True) & active[:, None]
                    available[i] = available[i] & ~picked

        pooled = u_sum / taken.clamp_min(1)[:, None]  # (B, embed)
        return SkimOutput(
            logits=self.classifier(pooled),
            step_logits=torch.stack(step_logits, 1) if step_logits else None,
            active=torch.stack(actives, 1),
            steps_used=taken.long(),
            chosen=_stack(chosen, (b, 0, n_index), torch.long, device),  # (B, S, K)
            chosen_weight=_stack(chosen_w, (b, 0, n_index), torch.float32, device),  # (B, S, K)
            attention=_stack(attention, (b, 0, n), torch.float32, device),  # (B, S, N)
            pooled=pooled,
            inputs=torch.stack(inputs, 1),
        )

    def _queries(self, h: Tensor, active: Tensor, lowp: bool) -> list[Tensor]:
        """Each indexing modality's query ``K x (B, D)`` from ``h`` ``(B, hidden)``."""
        cfg = self.config
        n_index = len(cfg.index_keys)
        if not lowp:
            return [self.query[0 if cfg.shared_query else i](h, active) for i in range(n_index)]
        w = self._bf16_weights()
        # Every query's first layer in one product: one pass over the weights per step.
        hidden = w["q1"](h).split(cfg.hidden, 1)  # n_queries x (B, hidden)
        out = []
        for query, z, fc2 in zip(self.query, hidden, w["q2"], strict=True):
            out.append(fc2(F.relu(query.bn(z, active))))  # (B, D)
        return out * n_index if cfg.shared_query else out

    def _psi(self, x: Tensor, lowp: bool) -> Tensor:
        """``Psi`` ``(B, R * D) -> (B, embed)``."""
        if not lowp:
            return self.psi(x)
        fc1, fc2 = self._bf16_weights()["psi"]
        return fc2(F.relu(fc1(x)))

    def _bf16_weights(self) -> dict[str, Any]:
        """bf16 copies of the per-step weights (fp32 biases), rebuilt when any parameter changes (version,
        storage or device); kept in ``__dict__``, so never saved or moved."""
        params = tuple(self.parameters())
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        cached = self.__dict__.get("_bf16_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            lstm = self.lstm
            weights = {
                # (4 hidden, embed + hidden): both gate products in one
                "lstm": _Bf16Linear(
                    torch.cat([lstm.weight_ih, lstm.weight_hh], 1), lstm.bias_ih + lstm.bias_hh
                ),
                "psi": [_Bf16Linear(m.weight, m.bias) for m in (self.psi[0], self.psi[2])],
                "q1": _Bf16Linear(  # (n_queries * hidden, hidden): every query's first layer in one
                    torch.cat([q.fc1.weight for q in self.query], 0),
                    torch.cat([q.fc1.bias for q in self.query], 0),
                ),
                "q2": [_Bf16Linear(q.fc2.weight, q.fc2.bias) for q in self.query],
                "keys": [_Bf16Linear(p.weight, p.bias, rows=None) for p in self.key_proj],
            }
        self.__dict__["_bf16_cache"] = (key, weights)
        return weights

    def _lstm_step(self, u: Tensor, h: Tensor, c: Tensor, lowp: bool = False) -> tuple[Tensor, Tensor]:
        """One LSTM step ``(B, embed), (B, hidden) x 2 -> (B, hidden) x 2``. Without autograd (evaluation,
        queries) the weight-normed weights are reused across forwards until a parameter changes (its
        version, storage or device): recomputing them was ~15% of a one-video query (measured). With
        ``lowp`` the gates come from one bf16 product over ``[u, h]``; the cell update stays fp32."""
        if lowp:
            w = self._bf16_weights()
            gates = w["lstm"](torch.cat([u, h], 1))  # (B, 4 hidden): i, f, g, o
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if torch.is_grad_enabled():
            return self.lstm(u, (h, c))
        lstm = self.lstm
        params = (
            lstm.parametrizations.weight_ih.original0,
            lstm.parametrizations.weight_ih.original1,
            lstm.parametrizations.weight_hh.original0,
            lstm.parametrizations.weight_hh.original1,
        )
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        cached = self.__dict__.get("_eval_lstm_weights")
        if cached is None or cached[0] != key:
            cached = (key, lstm.weight_ih.detach(), lstm.weight_hh.detach())
            self.__dict__["_eval_lstm_weights"] = cached  # not a buffer: never saved, never moved
        return torch.lstm_cell(u, (h, c), cached[1], cached[2], lstm.bias_ih, lstm.bias_hh)

    def _update_query_stats(self, h: Tensor, active: Tensor, available: list[Tensor]) -> None:
        """Feed the last step's queries to their batch norms (statistics only; the attention is unused)."""
        active = active & _any_left(available)
        for i in range(len(self.config.index_keys)):
            query = self.query[0 if self.config.shared_query else i]
            rows = query.fc1(h)[active]  # (M, hidden)
            query.bn.normalize_rows(rows)

    def loss(self, out: SkimOutput, labels: Tensor) -> Tensor:
        """Cross-entropy of the prediction plus ``step_head_weight`` x the per-step head's mean cross-entropy.

        Args:
            out: The forward output.
            labels: Class indices ``(B,)``.

        Returns:
            A scalar loss.
        """
        loss = F.cross_entropy(out.logits, labels)
        if out.step_logits is not None:
            b, t, c = out.step_logits.shape
            per = F.cross_entropy(
                out.step_logits.reshape(b * t, c), labels.repeat_interleave(t), reduction="none"
            )
            act = out.active[:, :t].reshape(-1).float()  # steps that were taken
            loss = loss + self.config.step_head_weight * (per * act).sum() / act.sum().clamp_min(1)
        return loss

    def gflops(self, n_steps: int, steps_used: int) -> float:
        """Analytic GFLOPs (2 x multiply-adds) of the skimming network itself for one video.

        Counts the key projections over all ``n_steps`` steps and, per taken recurrent step, the LSTM, the
        queries, the scores and mixtures over ``n_steps`` and ``Psi``; feature extraction is not included.
        """
        cfg = self.config
        k, r = len(cfg.index_keys), len(cfg.recognition_keys)
        keys = k * n_steps * cfg.dim * cfg.dim
        per_step = (
            4 * cfg.hidden * (cfg.embed + cfg.hidden)  # LSTM
            + len(self.query) * (cfg.hidden * cfg.hidden + cfg.hidden * cfg.dim)  # queries
            + k * n_steps * cfg.dim  # scores
            + r * n_steps * cfg.dim  # mixture
            + r * cfg.dim * (cfg.psi_hidden or cfg.hidden)
            + (cfg.psi_hidden or cfg.hidden) * cfg.embed  # Psi
            + cfg.hidden * k  # modality attention
        )
        return 2 * (keys + steps_used * per_step + cfg.embed * cfg.num_classes) / 1e9


def _zero_padding(z: Tensor, mask: Tensor, *, copy_always: bool = False) -> Tensor:
    """``z`` ``(B, N, D)`` as float32 with padding rows either zero or finite (see :meth:`SkimModel._skim`).

    A float32 ``z`` whose values are all finite and moderate is returned as it is (no copy); otherwise padding
    is zeroed on a float32 copy. One L1 norm decides (no temporary): below 1e30 no value is NaN, inf or large
    enough for a product with a weight to overflow.
    """
    if z.dtype == torch.float32 and not copy_always and float(torch.linalg.vector_norm(z, 1)) < 1e30:
        return z
    out = z.float()
    if out.data_ptr() == z.data_ptr():  # float32 already: never write into the caller's tensor
        return torch.where(mask[..., None], out, 0.0)
    return out.masked_fill_(~mask[..., None], 0.0)


KEY_BLOCK_ROWS = 8192  # rows per block of the key path's temporaries (16 MB of 512-d float32)
KEY_BLOCK_VIDEOS = 16  # videos per block of the deferred key gradient (16 MB at 500 steps of 512-d)


class _KeyBank(torch.autograd.Function):
    """Keys ``ReLU(BN(W z + b))`` of the valid rows ``rows`` of ``z`` ``(B*N, D)``, in a ``(B, N, D)`` bank
    that is zero on padding; ``bn`` is a :class:`MaskedBatchNorm1d` (statistics over the valid rows only).

    Plain autograd kept the gathered rows, the projection, the normalised keys and the bank alive until
    backward: 4 key-sized tensors per indexing feature (about 1 GB per feature at batch 256 of 500 steps).
    This keeps the projection ``y = W z + b`` (the batch norm's backward needs it; recomputing it instead cost
    13% of a training step, measured) beside the bank (the scores need it anyway) and ``z`` (alive for the
    mixtures); every other temporary is block-sized (:data:`KEY_BLOCK_ROWS` rows or
    :data:`KEY_BLOCK_VIDEOS` videos): the gathered rows, the normalised keys before they are scattered, the
    summed key gradient of the bank, the valid rows' key gradient and the projection's gradient never exist
    whole, so backward holds no more than forward. Measured, one training step at batch 256 of 500 steps
    (two 512-d features, 80% valid rows): peak RSS 3,293 -> 2,423 MB; a training epoch on the bench store
    3,588 -> 2,866 MB, same loss, same speed (epoch 20.4 -> 20.7 s, 29.7 -> 30.0 videos per CPU-s).

    The scores' key gradients are deferred: each :class:`_Scores` call ``s_t = K q_t`` records
    ``(q_t, dL/ds_t)`` in ``buf`` instead of returning a ``(B, N, D)`` key gradient, and backward adds
    ``dL/dK = sum_t g_t q_t^T`` here, one batched matmul per block of videos (autograd runs this node only
    after every score that reads the bank). Batch norm's backward is computed in place on that gradient:
    the same formulas as autograd's kernels, so the same values up to float rounding and summation order
    (tested against plain autograd).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, rows: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor,
                bn_bias: Tensor, bn: MaskedBatchNorm1d, grad_mode: bool, shape: tuple[int, int],
                buf: list[tuple[Tensor, Tensor]]) -> Tensor:  # fmt: skip
        b, n = shape
        dim = weight.shape[0]
        batch_stats = bn.training and rows.shape[0] > 1
        bank = z.new_zeros(b, n, dim)  # (B, N, D)
        flat = bank.view(b * n, dim)
        ctx.set_materialize_grads(False)
        ctx.bn, ctx.batch_stats, ctx.buf, ctx.shape = bn, batch_stats, buf, shape
        if not batch_stats and not grad_mode:
            # Inference: rows are independent under the running statistics; nothing is kept.
            for block in rows.split(KEY_BLOCK_ROWS):
                y = torch.addmm(bias, z.index_select(0, block), weight.t())  # (m, D), as F.linear
                k = torch.native_batch_norm(
                    y, bn_weight, bn_bias, bn.running_mean, bn.running_var, False, bn.momentum, bn.eps
                )[0]
                flat.index_copy_(0, block, k.relu_())
            return bank
        blocks = list(zip(rows.split(KEY_BLOCK_ROWS), range(0, rows.shape[0], KEY_BLOCK_ROWS), strict=True))
        # Block temporaries go to reused buffers: under a 1 MiB mmap threshold a fresh block-sized tensor was
        # a fresh mapping, and its page faults made a training step ~20% slower (measured; the threshold is
        # now 32 MiB, see skim.train.limit_heap_growth, and the buffers still save the allocations).
        rb = min(KEY_BLOCK_ROWS, max(1, rows.shape[0]))
        z_work, k_work = z.new_empty(rb, z.shape[1]), z.new_empty(rb, dim)  # (rb, D_in), (rb, D)
        y = z.new_empty(rows.shape[0], dim)  # (M, D): the projection of the valid rows, kept for backward
        for block, a in blocks:
            zb = torch.index_select(z, 0, block, out=z_work[: len(block)])
            torch.addmm(bias, zb, weight.t(), out=y[a : a + len(block)])
        if batch_stats:
            bn.num_batches_tracked += 1
            # mean, then the biased variance (as batch norm normalises) from centred squares in row blocks:
            # torch.var_mean over the rows took 10x longer on this CPU (measured)
            m = rows.shape[0]
            mean = y.sum(0) / m  # (D,)
            var = y.new_zeros(dim)  # (D,)
            for _, a in blocks:
                yb = y[a : a + KEY_BLOCK_ROWS]
                var += torch.sub(yb, mean, out=k_work[: len(yb)]).square_().sum(0)
            var /= m
            with torch.no_grad():  # running statistics as F.batch_norm: unbiased variance
                bn.running_mean.mul_(1 - bn.momentum).add_(mean, alpha=bn.momentum)
                bn.running_var.mul_(1 - bn.momentum).add_(var, alpha=bn.momentum * m / (m - 1))
        else:
            # copies: saved for backward, which a later update of the running statistics must not reach
            mean, var = bn.running_mean.clone(), bn.running_var.clone()
        invstd = torch.rsqrt(var + bn.eps)  # (D,)
        scale = invstd * bn_weight  # (D,): k = ReLU(y * scale + shift), as batch norm's inference kernel
        shift = bn_bias - mean * scale
        for block, a in blocks:
            kb = torch.addcmul(shift, y[a : a + len(block)], scale, out=k_work[: len(block)])
            flat.index_copy_(0, block, kb.relu_())
        ctx.save_for_backward(z, rows, weight, bn_weight, y, mean, invstd, bank)
        return bank

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        z, rows, weight, bn_weight, y, mean, invstd, bank = ctx.saved_tensors
        buf, ctx.buf = ctx.buf, None
        b, n = ctx.shape
        dim = weight.shape[0]
        flat = bank.view(b * n, dim)
        need = ctx.needs_input_grad
        if not buf and grad is None:
            return (None,) * 10
        q = torch.stack([q for q, _ in buf], 1) if buf else None  # (B, T, D)
        gs = torch.stack([g for _, g in buf], 2) if buf else None  # (B, N, T)
        buf.clear()
        edges = [*range(0, b, KEY_BLOCK_VIDEOS), b]  # video blocks
        firsts = torch.searchsorted(rows, torch.tensor(edges, device=rows.device) * n).tolist()  # their rows
        blocks = [
            (v0, v1, r0, r1) for v0, v1, r0, r1 in zip(edges, edges[1:], firsts, firsts[1:], strict=False)
        ]
        blocks = [blk for blk in blocks if blk[2] < blk[3]]
        # reused block buffers, as in forward: the video blocks' rows at most
        rb = max([r1 - r0 for _, _, r0, r1 in blocks], default=1)
        dk_work = y.new_empty(min(b, KEY_BLOCK_VIDEOS), n, dim) if gs is not None else None
        g_work, k_work, z_work = y.new_empty(rb, dim), y.new_empty(rb, dim), z.new_empty(rb, z.shape[1])
        m_work = torch.empty(rb, dim, dtype=torch.bool, device=y.device)

        def key_grad(v0: int, v1: int, r0: int, r1: int) -> Tensor:
            """dL/dk of valid rows ``r0:r1`` (videos ``v0:v1``) through the ReLU (zero where the key is 0),
            in ``g_work``."""
            if gs is not None:
                dk = torch.bmm(gs[v0:v1], q[v0:v1], out=dk_work[: v1 - v0]).view(-1, dim)  # (vb*N, D)
                if grad is not None:
                    dk += grad[v0:v1].reshape(-1, dim)
            else:
                dk = grad[v0:v1].reshape(-1, dim)
            g = torch.index_select(dk, 0, rows[r0:r1] - v0 * n, out=g_work[: r1 - r0])  # (r1 - r0, D)
            keys = torch.index_select(flat, 0, rows[r0:r1], out=k_work[: r1 - r0])
            return g.masked_fill_(torch.le(keys, 0, out=m_work[: r1 - r0]), 0.0)

        # Batch norm's backward: dL/dy = scale g + c2 y + c3 per column (training), or scale g. Its column
        # sums come first, then each block's dL/dy; a block's key gradient is computed again rather than kept
        # (that would be an (M, D) tensor; the recomputation is one small bmm per block).
        m = rows.shape[0]
        sum_g = y.new_zeros(dim)  # (D,)
        dot = y.new_zeros(dim)  # (D,): sum of g (y - mean)
        for v0, v1, r0, r1 in blocks:
            g = key_grad(v0, v1, r0, r1)
            sum_g += g.sum(0)
            dot += torch.sub(y[r0:r1], mean, out=k_work[: r1 - r0]).mul_(g).sum(0)
        g_bn_w = dot * invstd if need[4] else None
        g_bn_b = sum_g if need[5] else None
        scale = invstd * bn_weight  # (D,)
        if ctx.batch_stats:
            c2 = -scale * invstd * invstd * dot / m
            c3 = -scale * sum_g / m - c2 * mean
        g_w = weight.new_zeros(weight.shape) if need[2] else None
        g_b = y.new_zeros(dim) if need[3] else None
        g_z = torch.zeros_like(z) if need[0] else None
        for v0, v1, r0, r1 in blocks if need[0] or need[2] or need[3] else ():
            gy = key_grad(v0, v1, r0, r1).mul_(scale)  # (r1 - r0, D)
            if ctx.batch_stats:
                gy.addcmul_(y[r0:r1], c2).add_(c3)
            if g_w is not None:
                g_w.addmm_(gy.t(), torch.index_select(z, 0, rows[r0:r1], out=z_work[: r1 - r0]))
            if g_b is not None:
                g_b += gy.sum(0)
            if g_z is not None:
                g_z.index_copy_(0, rows[r0:r1], gy @ weight)
        return g_z, None, g_w, g_b, g_bn_w, g_bn_b, None, None, None, None


class _Scores(torch.autograd.Function):
    """``s = K q`` per video (``(B, N, D)``, ``(B, D)`` -> ``(B, N)``); the key gradient goes to ``buf``."""

    @staticmethod
    def forward(ctx: Any, keys: Tensor, q: Tensor, buf: list[tuple[Tensor, Tensor]]) -> Tensor:
        ctx.save_for_backward(keys, q)
        ctx.buf = buf
        return torch.bmm(keys, q[:, :, None])[:, :, 0]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor | None, None]:
        keys, q = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            ctx.buf.append((q.detach(), g))
        grad_q = torch.bmm(g[:, None, :], keys)[:, 0] if ctx.needs_input_grad[1] else None  # (B, D)
        return None, grad_q, None


def _any_left(available: list[Tensor]) -> Tensor:
    """``(B,)`` whether every mask still has a step to choose."""
    left = available[0].any(1)
    for a in available[1:]:
        left = left & a.any(1)
    return left


def _stack(items: list[Tensor], empty: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Stack per-selection tensors on axis 1, or an empty tensor of shape ``empty`` when there are none."""
    return torch.stack(items, 1) if items else torch.zeros(empty, dtype=dtype, device=device)


class _Bf16Linear:
    """``x W^T + b`` with ``x`` and ``W`` rounded to bf16, fp32 accumulation and an fp32 bias; returns fp32.

    The weight is pre-packed once into oneDNN's blocked layout where torch has the op: a plain bf16 matmul
    re-reads it in the row-major layout and reached a third of the packed speed at batch 1 (0.6 vs 0.2 ms
    for the 4096 x 1536 LSTM weight, measured on this project's AVX512-BF16 host).
    """

    def __init__(self, weight: Tensor, bias: Tensor, *, rows: int | None = 1) -> None:
        self.weight = weight.detach().to(torch.bfloat16).contiguous()  # (out, in)
        self.bias = bias.detach().float()  # (out,)
        self.packed = None
        if self.weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
                self(torch.zeros(2, self.weight.shape[1]))  # the op exists but may refuse this build/CPU
            except (RuntimeError, AttributeError, NotImplementedError):
                self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        xb = x.to(torch.bfloat16)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(xb, self.packed, None, "none", [], "")
        else:
            y = F.linear(xb, self.weight)
        return y.float() + self.bias


def _mix(weights: Tensor, z: Tensor) -> Tensor:
    """Weighted sum over steps: ``weights`` ``(B, N)``, ``z`` ``(B, N, D)`` -> ``(B, D)``."""
    return torch.bmm(weights[:, None, :], z)[:, 0]
