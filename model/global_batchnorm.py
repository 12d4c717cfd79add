"""Global BatchNorm: batch statistics over every process's samples (SimCLR, Sec. 4: "Global BN").

On CUDA, torch.nn.SyncBatchNorm does this with fused kernels. It refuses CPU modules, so
for CPU processes (gloo) `GlobalBatchNorm` all-reduces the per-channel sums with a
differentiable collective; gradients flow back through the shared statistics exactly as
in SyncBatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum of every process's copy is again that sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # Two reductions (mean, then squared deviations) rather than E[x^2] - E[x]^2, which
        # cancels badly when |mean| >> std.
        local = torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() / c)])  # [C+1]
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:c] / count  # [C]
        centred = xf - mean.view(shape)
        # [C], biased as BN normalises
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm for its cross-process form: SyncBatchNorm on CUDA, GlobalBatchNorm on
    CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, GlobalBatchNorm)):
        ref = next(iter(module.parameters()), None)
        ref = ref if ref is not None else module.running_mean
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=ref.device, dtype=ref.dtype)
        out.load_state_dict(module.state_dict())
        for name, p in module.named_parameters(recurse=False):  # a frozen shift stays frozen
            getattr(out, name).requires_grad_(p.requires_grad)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_to_global_bn(child, device))
    return out
