"""LARS with the semantics of the official SimCLR optimizer.

Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888) as used by
SimCLR (Chen et al. 2020, arXiv:2002.05709, Sec. B.1; google-research/simclr lars_optimizer.py,
"classic momentum" branch, no Nesterov). For every parameter tensor w with gradient g:

    u     = g + wd * w                                   (L2 weight decay folded into the gradient)
    trust = eta * ||w|| / ||u||   if ||w|| > 0 and ||u|| > 0, else 1
    v     = momentum * v + lr * trust * u                (the velocity carries the LR-scaled step)
    w     = w - v

Groups with ``lars_exclude=True`` (biases and BatchNorm affine parameters, see
:func:`lars_param_groups`) take no weight decay and no adaptation: ``v = momentum * v + lr * g``.

Because the velocity accumulates ``lr * trust * u``, a change of learning rate acts through the
velocity rather than rescaling the whole stored momentum, as in the official implementation.

:class:`LARS` is the fast version (one numba kernel per tensor, spread over threads, on the CPU;
``torch._foreach_*`` ops elsewhere; no host synchronisation); :class:`LARSReference` is the
readable per-parameter version kept as the test oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from train import lars_numba

__all__ = ["LARS", "LARSReference", "lars_param_groups"]


def lars_param_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]] | Iterable[Tensor],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Split parameters into an adapted group and an excluded group, by shape.

    Tensors with ``p.ndim <= 1`` (every bias and every BatchNorm/LayerNorm weight and bias, however
    the module is named, e.g. torchvision's ``layer1.0.downsample.1``) go to the group with
    ``weight_decay=0.0, lars_exclude=True``; all other tensors (conv and linear weights) go to the
    group with ``weight_decay=weight_decay, lars_exclude=False``. Parameters with
    ``requires_grad=False`` are left out; empty groups are dropped.

    Accepts a module, an iterable of ``(name, parameter)`` pairs or an iterable of parameters.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if isinstance(model_or_named_params, nn.Module):
        params: Iterable[Any] = model_or_named_params.parameters()
    else:
        params = model_or_named_params
    adapted: list[Tensor] = []
    excluded: list[Tensor] = []
    seen: set[int] = set()
    for item in params:
        p = item[1] if isinstance(item, tuple) else item
        if not isinstance(p, Tensor):
            raise TypeError(
                f"expected a Tensor or a (name, Tensor) pair, got {type(item).__name__}")
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (excluded if p.ndim <= 1 else adapted).append(p)
    groups = [
        {"params": adapted, "weight_decay": float(weight_decay), "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def _check_hyper(lr: Any, momentum: float, weight_decay: float, eta: float) -> None:
    if not isinstance(lr, Tensor) and lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if eta <= 0:
        raise ValueError(f"eta (trust coefficient) must be > 0, got {eta}")


class _LARSBase(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
        lars_exclude: bool = False,
    ) -> None:
        _check_hyper(lr, momentum, weight_decay, eta)
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=lars_exclude
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyper(group["lr"], group["momentum"], group["weight_decay"], group["eta"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lars_exclude", False)

    def _active(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Parameters of ``group`` that have a gradient, their gradients and momentum buffers."""
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
        return params, grads, bufs


class LARSReference(_LARSBase):
    """Per-parameter LARS written for reading, not speed: the oracle for :class:`LARS`'s tests.

    Same constructor, parameter groups and state layout (``momentum_buffer`` per parameter) as
    :class:`LARS`; see the module docstring for the update.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            for w, g, v in zip(*self._active(group), strict=True):
                if group["lars_exclude"]:
                    u = g.clone()
                    trust = torch.ones((), dtype=w.dtype, device=w.device)
                else:
                    u = g + group["weight_decay"] * w
                    w_norm, u_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(u)
                    ok = (w_norm > 0) & (u_norm > 0)
                    trust = torch.where(ok, group["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
                v.copy_(m * v + lr * trust * u)
                w.sub_(v)
        return loss


class LARS(_LARSBase):
    """LARS (SimCLR semantics) with multi-tensor ops and no host synchronisation.

    Args:
        params: parameters or parameter groups; build groups with :func:`lars_param_groups` so
            biases and BatchNorm parameters get ``lars_exclude=True``.
        lr: learning rate (a float, or a 0-d tensor on the parameters' device).
        momentum: classic momentum; SimCLR uses 0.9.
        weight_decay: L2 coefficient added to the gradient of adapted groups; SimCLR uses 1e-6.
        eta: trust coefficient; SimCLR uses 0.001.
        lars_exclude: default of the per-group flag that turns off weight decay and adaptation.

    The tensors' device picks how adapted groups are stepped. On the CPU, float32 and float64
    tensors whose ``w``, ``g`` and ``v`` share one dense layout take one compiled kernel each
    (:mod:`train.lars_numba`), which reads ``w`` and ``g`` once for the norms and then updates
    ``v`` and ``w`` in one pass, with the tensors spread over ``torch.get_num_threads()`` threads.
    Everything else (CUDA, other dtypes and layouts) takes ``torch._foreach_*`` ops that build
    ``u = g + wd * w`` as a temporary: on CUDA a few multi-tensor kernels beat one launch per
    tensor, and the caching allocator makes the temporary cheap. Both match
    :class:`LARSReference` to float rounding.

    Per-tensor trust ratios stay on the device as 0-d tensors: ``torch.where`` handles zero norms
    and the scaled step enters through ``torch._foreach_addcmul_``, so nothing waits on the host.
    """

    # tests turn this off to run the foreach path, the one GPUs take, on CPU tensors
    _numba_on_cpu = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
        lars_exclude: bool = False,
    ) -> None:
        super().__init__(params, lr, momentum, weight_decay, eta, lars_exclude)
        self._workers = lars_numba.Workers()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_workers"):  # a copy or unpickled optimizer: the pool is not saved
            self._workers = lars_numba.Workers()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = self._active(group)
            for idx in _by_device_and_dtype(params, grads):
                w = [params[i] for i in idx]
                g = [grads[i] for i in idx]
                v = [bufs[i] for i in idx]
                if group["lars_exclude"]:
                    _excluded_step(w, g, v, group["lr"], group["momentum"])
                    continue
                if self._numba_on_cpu and w[0].device.type == "cpu":
                    left = lars_numba.adapted_step(w, g, v, group, self._workers)
                    if not left:
                        continue
                    w, g, v = [w[i] for i in left], [g[i] for i in left], [v[i] for i in left]
                _foreach_step(w, g, v, group)
        return loss


def _by_device_and_dtype(params: list[Tensor], grads: list[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped so each foreach call sees one device and one dtype."""
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        buckets.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    return list(buckets.values())


def _excluded_step(w: list[Tensor], g: list[Tensor], v: list[Tensor], lr: Any, m: float) -> None:
    # v = m v + lr g ; w -= v
    torch._foreach_mul_(v, m)
    if isinstance(lr, Tensor):
        lr_t = lr.to(device=w[0].device, dtype=w[0].dtype)
        torch._foreach_addcmul_(v, g, [lr_t] * len(v))
    else:
        torch._foreach_add_(v, g, alpha=lr)
    torch._foreach_sub_(w, v)


def _foreach_step(w: list[Tensor], g: list[Tensor], v: list[Tensor], group: dict[str, Any]) -> None:
    wd = group["weight_decay"]
    u = torch._foreach_add(g, w, alpha=wd) if wd != 0 else g  # never modifies p.grad
    acc = torch.promote_types(w[0].dtype, torch.float32)  # bf16/fp16 norms are combined in fp32
    w_norm = torch.stack(torch._foreach_norm(w)).to(acc)  # [n]
    u_norm = torch.stack(torch._foreach_norm(u)).to(acc)  # [n]
    # trust = 1 where either norm is zero, chosen on the device (no branch on values)
    ok = (w_norm > 0) & (u_norm > 0)
    trust = torch.where(ok, group["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
    lr = group["lr"]
    if isinstance(lr, Tensor):
        lr = lr.to(device=trust.device, dtype=trust.dtype)
    scale = (lr * trust).to(w[0].dtype)  # [n]
    torch._foreach_mul_(v, group["momentum"])
    torch._foreach_addcmul_(v, u, list(scale.unbind(0)))
    torch._foreach_sub_(w, v)
