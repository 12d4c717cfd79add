"""Model FLOPs of a SimCLR training step, and the peak FLOP/s of known GPUs, for logging model
FLOPs utilisation (MFU) = achieved FLOP/s / peak FLOP/s (Chowdhery et al., 2022, PaLM, App. B).

What is counted: the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` attributes to
convolutions and matrix products (conv, mm, addmm, bmm, attention), at 2 FLOPs per multiply-add,
in forward and backward. Not counted: BatchNorm, activations, pooling, additions, the optimizer
step and the NT-Xent loss (O(N^2 D) per batch, small next to the encoder at SimCLR's batch sizes).

Backward is what the mode records for the ops autograd actually runs: for each convolution or
linear layer one weight-gradient product and, where the layer's input requires grad, one
input-gradient product, each costing as much as the forward product. So backward is about 2x
forward, a little less because the first convolution's input (the image) needs no gradient.

Counting runs on the meta device with the model's parameter shapes: no memory is touched, and the
model itself (on any device, compiled or wrapped) is not modified.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_FLOPS", "StepFlops", "count_flops", "model_flops_utilisation", "peak_flops",
           "peak_flops_for_name", "training_flops_per_image"]

# Dense (no structured sparsity) peak FLOP/s from the vendors' datasheets, per GPU, by the
# precision the convolutions and matrix products run in. "float32" is the non-tensor-core rate;
# "tf32" is what float32 convolutions get under torch's default torch.backends.cudnn.allow_tf32.
# Matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "tf32": 378e12, "float32": 51e12}),
    ("H100 NVL", {"bfloat16": 835e12, "float16": 835e12, "tf32": 418e12, "float32": 60e12}),
    ("H200 NVL", {"bfloat16": 835e12, "float16": 835e12, "tf32": 418e12, "float32": 60e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "tf32": 495e12, "float32": 67e12}),  # SXM
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "tf32": 495e12, "float32": 67e12}),  # SXM
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
)


class StepFlops(NamedTuple):
    """FLOPs for ONE image of ONE view (counted convolution/matmul FLOPs, see the module doc)."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (``_orig_mod``) and DDP/Accelerate (``module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def count_flops(model: nn.Module, image_size: int, *, backward: bool = True,
                in_channels: int = 3) -> StepFlops:
    """Counted forward (and backward) FLOPs of one [in_channels, S, S] image through `model`.

    The pass runs on meta tensors shaped like the model's parameters and buffers, in the model's
    current train/eval mode, with a batch of 2 (BatchNorm in training mode needs more than one
    value per channel) divided by 2: convolution and matmul FLOPs are linear in the batch.
    Backward starts from the sum of every floating-point output (for SimCLR both h and z, whose
    gradients meet at h, so the encoder's backward is counted once).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    model = _unwrap(model)
    meta = torch.device("meta")
    state = {name: torch.empty_like(p, device=meta).requires_grad_(p.requires_grad)
             for name, p in model.named_parameters()}
    state.update({name: torch.empty_like(b, device=meta) for name, b in model.named_buffers()})
    batch = 2
    x = torch.empty(batch, in_channels, image_size, image_size, device=meta)  # [2, C, S, S]
    with FlopCounterMode(display=False) as counter:
        out = functional_call(model, state, (x,), strict=False)
        forward = counter.get_total_flops()
        if backward:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            grads = [o.sum() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()
                     and o.requires_grad]
            if grads:
                torch.stack(grads).sum().backward()
        total = counter.get_total_flops()
    return StepFlops(forward / batch, (total - forward) / batch)


def training_flops_per_image(model: nn.Module, image_size: int, *, views: int = 2) -> float:
    """Counted forward+backward FLOPs of one training image: its `views` augmented views through
    encoder and projection head (SimCLR sends both views of each image through one pass)."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be a positive int, got {views!r}")
    return float(views * count_flops(model, image_size).total)


def _dtype_key(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
    elif isinstance(dtype, torch.dtype):
        key = str(dtype).removeprefix("torch.")
    else:
        raise ValueError(f"dtype must be a torch.dtype or one of 'bfloat16', 'float16', 'tf32', "
                         f"'float32', got {dtype!r}")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32"}.get(key, key)


def peak_flops_for_name(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Datasheet dense peak FLOP/s of the GPU called `device_name` (as torch.cuda.get_device_name
    returns it) for `dtype` (torch.bfloat16 / torch.float16 / torch.float32, or "tf32"); None when
    the GPU or the dtype is not in the table."""
    key = _dtype_key(dtype)
    for pattern, peaks in PEAK_FLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(key)
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype | str) -> float | None:
    """Peak FLOP/s of `device` for convolutions/matmuls in `dtype`, or None when unknown (any CPU,
    an unlisted GPU). Training under bf16 autocast: pass torch.bfloat16."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


def model_flops_utilisation(flops_per_image: float, images_per_s: float,
                            peak: float | None) -> float | None:
    """MFU = flops_per_image * images_per_s / peak (a fraction, 1.0 = the datasheet peak); None
    when the peak is unknown."""
    if peak is None:
        return None
    if not peak > 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak!r}")
    return flops_per_image * images_per_s / peak
