"""More than one training process: ``torchrun`` + DistributedDataParallel for distillation and fine-tuning.

Launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``), the same
command trains on every process with no other change: :func:`context` joins the process group (gloo on
CPU, nccl on GPU), every global batch of ``batch_size`` clips (the one a single process would train on) is
cut into one contiguous part per process (:class:`RankBatches`), the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients, and BatchNorm layers
compute their statistics over the whole global batch (:func:`sync_batchnorm`: torch's ``SyncBatchNorm`` on
GPU; on CPU, where torch has none, :class:`CpuSyncBatchNorm` all-reduces the sums). Each process's loss is
weighted by its share of the batch (:func:`global_loss`), so the update, the loss curve and the weights
equal one process's to float tolerance. Rank 0 alone writes checkpoints and curves.

Without ``torchrun`` (or with one process) nothing here changes anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from indexing.errors import ConfigError


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world`` processes, and its torch device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0


def context(device: str) -> Context:
    """This process's place in a ``torchrun`` launch (joining the process group once), or one process.

    Args:
        device: The configured device; under ``torchrun`` on GPU each process takes ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: ``WORLD_SIZE`` is set but not a positive integer.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun"
        ) from None
    if world <= 1:
        return Context(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


class RankBatches:
    """The batches of one process: each global batch of ``batch_size`` consecutive dataset positions (the
    batches one process would see, in the dataset's own order) cut into ``world`` contiguous parts.

    Raises:
        ConfigError: A global batch (e.g. the last one) has fewer items than there are processes.
    """

    def __init__(self, n: int, batch_size: int, ctx: Context):
        self.n, self.batch_size, self.ctx = n, batch_size, ctx
        last = n % batch_size or batch_size
        if min(last, batch_size) < ctx.world:
            raise ConfigError(
                f"a batch of {min(last, batch_size)} clips cannot be shared by {ctx.world} processes; "
                "use a larger --batch-size or more clips per video"
            )

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.batch_size):
            positions = np.arange(start, min(start + self.batch_size, self.n))  # (B,)
            yield np.array_split(positions, self.ctx.world)[self.ctx.rank].tolist()

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def rank_loader(loader: torch.utils.data.DataLoader, ctx: Context) -> torch.utils.data.DataLoader:
    """``loader`` (batches in its dataset's order, no sampler shuffling) serving this process's parts."""
    if not ctx.distributed:
        return loader
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_sampler=_Resized(loader, ctx),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
    )


class _Resized:
    """A batch sampler recomputed from the dataset's current length on every epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, ctx: Context):
        self.dataset, self.batch_size, self.ctx = loader.dataset, loader.batch_size, ctx

    def __iter__(self) -> Iterator[list[int]]:
        return iter(RankBatches(len(self.dataset), self.batch_size, self.ctx))

    def __len__(self) -> int:
        return len(RankBatches(len(self.dataset), self.batch_size, self.ctx))


def global_loss(local: Tensor, n_local: int, ctx: Context) -> tuple[Tensor, int]:
    """The loss to return for one part of a global batch, and the global batch size.

    Its value is the global batch's mean loss (the same on every process, what one process would log);
    its gradient is ``world * n_local / n_global`` times the local mean's, so DistributedDataParallel's
    average over processes is the gradient of the global mean, even when the parts differ in size.
    """
    if not ctx.distributed:
        return local, n_local
    sums = torch.tensor(
        [float(local.detach()) * n_local, float(n_local)], dtype=torch.float64, device=local.device
    )
    dist.all_reduce(sums)
    n_global = int(sums[1])
    weighted = local * (ctx.world * n_local / n_global)
    return weighted + (float(sums[0]) / n_global - weighted).detach(), n_global


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` with BatchNorm statistics over the global batch, in DistributedDataParallel (one process:
    ``model`` itself). Parameters are the same objects, so an optimiser built before keeps working."""
    if not ctx.distributed:
        return model
    sync_batchnorm(model, ctx)
    ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_batchnorm(model: nn.Module, ctx: Context) -> None:
    """Make every BatchNorm layer of ``model`` normalise with the statistics of the global batch (in place:
    the layers keep their parameters and buffers)."""
    for module in model.modules():
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            if module.momentum is None:
                raise ConfigError(
                    "BatchNorm with cumulative averages (momentum=None) is not supported in DDP"
                )
            module.__class__ = _SYNCED[type(module)]


class _SyncStats(torch.autograd.Function):
    """Batch normalisation over the inputs of all processes (sums all-reduced in forward and backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, ...]:
        dims = [0] + list(range(2, x.ndim))
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])  # (2C + 1,)
        dist.all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n  # (C,)
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # (C,) biased, for normalising
        shape = [1, c] + [1] * (x.ndim - 2)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight, n)
        unbiased = var * n / (n - 1).clamp_min(1)  # (C,) for the running estimate, as torch's layer
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor) -> tuple[Tensor | None, ...]:
        xhat, invstd, weight, n = ctx.saved_tensors
        dims = [0] + list(range(2, dy.ndim))
        c = dy.shape[1]
        shape = [1, c] + [1] * (dy.ndim - 2)
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])  # (2C,) this process's loss only
        grad_bias, grad_weight = local[:c].clone(), local[c:].clone()  # DDP averages these as any gradient
        dist.all_reduce(local)  # every process's loss reaches this input through the shared statistics
        scale = invstd * (weight if weight is not None else 1.0)
        dx = (dy - (local[:c] / n).view(shape) - xhat * (local[c:] / n).view(shape)) * scale.view(shape)
        if weight is None:
            return dx, None, None, None
        return dx, grad_weight, grad_bias, None


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every process's part of the batch (CPU and GPU alike);
    in eval mode, or outside a process group, it is the plain layer."""

    def forward(self, x: Tensor) -> Tensor:
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        y, mean, var = _SyncStats.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
                self.running_var.mul_(1 - self.momentum).add_(var, alpha=self.momentum)
        return y


class _Sync1d(CpuSyncBatchNorm, nn.BatchNorm1d):
    pass


class _Sync2d(CpuSyncBatchNorm, nn.BatchNorm2d):
    pass


class _Sync3d(CpuSyncBatchNorm, nn.BatchNorm3d):
    pass


_SYNCED = {nn.BatchNorm1d: _Sync1d, nn.BatchNorm2d: _Sync2d, nn.BatchNorm3d: _Sync3d}


def all_mean(values: Sequence[float], ctx: Context) -> list[float]:
    """Element-wise mean of ``values`` over processes (one process: unchanged)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return (t / ctx.world).tolist()
