"""The GPU renderer of a view's tail: `pipelines.render_cpu`'s maths as batched torch ops.

The same packed parameters (`augment_params.P_*`) and the same torchvision uint8 semantics: flip,
colour jitter in each sample's random order, grayscale, blur, then the study's rotation, Sobel,
noise (its field drawn on the device: the sampler's SplitMix64 in int64 arithmetic) and cutout, on
pixel values 0..255 held in float32 (every intermediate is truncated or rounded to an integer, as
torchvision's uint8 path does). The DALI and FFCV loaders run it on the GPU after their crop; it
runs on CPU tensors too, which is how the tests hold it to torchvision's functional ops. Samples
are grouped by what they apply from the parameters on the host, and every host array reaches the
GPU through pinned memory without blocking, so the loader never waits for the training step queued
before it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.augment_params import (
    GOLDEN,
    MIX_M1,
    MIX_M2,
    NOISE_FIRST,
    P_BLUR,
    P_CUTOUT,
    P_CUTOUT_BOX,
    P_FACTOR,
    P_FLIP,
    P_GRAY,
    P_JITTER,
    P_NOISE,
    P_NOISE_STD,
    P_NOISE_STREAM,
    P_ORDER,
    P_ROTATE,
    P_SIGMA,
    P_SOBEL,
    P_WINDOW,
)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """torchvision's r * 0.2989 + g * 0.587 + b * 0.114, with its own ops (fused where torch
    fuses). [B, 1, H, W]"""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _trunc(y: torch.Tensor) -> torch.Tensor:
    return y.clamp_(0.0, 255.0).floor_()  # clamp, then .to(uint8) truncates non-negative values


def _to(values, dtype, device) -> torch.Tensor:
    """A host array on `device`; to a GPU through (cached) pinned memory, without a host sync."""
    t = torch.as_tensor(np.ascontiguousarray(values)).to(dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _factor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return _to(values, torch.float32, like.device).view(-1, 1, 1, 1)


# HSV sector -> the (v, p, q, t) index of each output channel, torchvision's _hsv_to_rgb table
_SECTORS = np.array([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=np.int64)


def _brightness(x, f):
    return _trunc(x * _factor(f, x))


def _blend(x, f, gray):
    # one rounding, as add_(alpha=)
    return _trunc(torch.addcmul(x * _factor(f, x), gray, _factor(1.0 - f, x)))


def _contrast(x, f):
    return _blend(x, f, _luma(x).floor_().mean(dim=(1, 2, 3), keepdim=True))


def _saturation(x, f):
    return _blend(x, f, _luma(x).floor_())


def _hue(x, f):
    """torchvision's _rgb_to_hsv, hue + f turns (mod 1), _hsv_to_rgb, then x 255.999 truncated."""
    img = x * (1.0 / 255.0)
    r, g, _ = img.unbind(dim=1)
    minc, maxc = torch.aminmax(img, dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - img) / torch.where(eqc, ones, cr).unsqueeze(1)).unbind(dim=1)
    neq_r, eq_g = maxc != r, maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(eq_g & neq_r)
    hr = bc.sub(gc).mul_(~neq_r)
    hb = gc.add(4.0).sub_(rc).mul_(neq_r & ~eq_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    h = torch.remainder(h + _factor(f, x).view(-1, 1, 1), 1.0)
    h6 = h * 6.0
    i = torch.floor(h6)
    fr = h6 - i
    sxf = s * fr
    q = ((1.0 - sxf) * maxc).clamp_(0.0, 1.0)
    t = ((sxf + (1.0 - s)) * maxc).clamp_(0.0, 1.0)
    p = ((1.0 - s) * maxc).clamp_(0.0, 1.0)
    vpqt = torch.stack((maxc, p, q, t), dim=1)  # [B, 4, H, W]
    select = _to(_SECTORS, torch.int64, x.device)
    sector = torch.remainder(i, 6.0).long()  # [B, H, W]
    rgb = vpqt.gather(1, select[:, sector].permute(1, 0, 2, 3))  # [B, 3, H, W]
    return rgb.mul_(255.999).floor_()


_ADJUST = (_brightness, _contrast, _saturation, _hue)


def _kernels(sigma: np.ndarray, windows: np.ndarray, device) -> torch.Tensor:
    """torchvision's 1-D kernels (softmax of -(x / sigma)^2, x = linspace(-lim, lim, window)),
    centred in the batch's largest window and zero outside each sample's own. float32 [B, k]."""
    k_max = int(windows.max())
    out = torch.zeros(len(sigma), k_max, dtype=torch.float32)
    for i, (s, w) in enumerate(zip(sigma, windows)):
        lim = (w - 1) / (2.0 * math.sqrt(2.0))
        x = torch.linspace(-lim, lim, steps=int(w), dtype=torch.float32)
        off = (k_max - w) // 2
        out[i, off:off + w] = torch.softmax(x.div(float(s)).pow(2).neg(), dim=0)
    return (out.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda"
            else out)


def _blur(x: torch.Tensor, sigma: np.ndarray, windows: np.ndarray) -> torch.Tensor:
    """Separable Gaussian per sample, reflect-101 borders, rounded half to even."""
    b, c, h, w = x.shape
    # [B*3, k]: one filter per (sample, channel)
    k = _kernels(sigma, windows, x.device).repeat_interleave(c, dim=0)
    r = k.shape[1] // 2
    # torch's reflect is reflect-101
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w).round_().clamp_(0.0, 255.0)


def _sobel(x: torch.Tensor) -> torch.Tensor:
    """min(255, floor(sqrt(gx^2 + gy^2) / 4)) of the truncated luma, reflect-101 borders, in all
    three channels; the gradients are integers, so float32 holds them exactly."""
    gray = _trunc(_luma(x))  # [B, 1, H, W]
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float32)
    kernels = torch.stack([gx, gx.T]).unsqueeze(1)  # [2, 1, 3, 3]
    if x.device.type == "cuda":
        kernels = kernels.pin_memory().to(x.device, non_blocking=True)
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="reflect"), kernels)  # [B, 2, H, W]
    return g.square().sum(1, keepdim=True).sqrt_().div_(4.0).floor_().clamp_(max=255.0).expand(
        -1, 3, -1, -1)


def _signed(v) -> int:
    """A uint64 constant as the int64 of the same bits."""
    v = int(v)
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN, _MUL1, _MUL2 = _signed(GOLDEN), _signed(MIX_M1), _signed(MIX_M2)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _uniform(s: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`augment_params.uniform(s, k)` on int64 tensors (wrapping arithmetic = uint64's): float64."""
    x = s + k * _GOLDEN + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    x = x ^ _shr(x, 31)
    return _shr(x, 11).double() * (1.0 / 9007199254740992.0)


def _noise(x: torch.Tensor, sigma: np.ndarray, streams: np.ndarray) -> torch.Tensor:
    """x + sigma * z, rounded half to even and clipped; z of element (y * W + x) * 3 + c by
    Box-Muller from each sample's noise stream (`augment_params.noise_normal`), in float64."""
    b, c, h, w = x.shape
    hi, lo = streams[:, 0].astype(np.int64), streams[:, 1].astype(np.int64)
    s = _to((hi << 32) | lo, torch.int64, x.device).view(b, 1, 1, 1)  # the uint64 bits
    e = torch.arange(h * w * c, dtype=torch.int64, device=x.device).view(1, h, w, c)
    e = e.permute(0, 3, 1, 2)  # [1, 3, H, W]: element (y * W + x) * 3 + c
    k = NOISE_FIRST + 2 * e
    z = torch.sqrt(-2.0 * torch.log(1.0 - _uniform(s, k))) * torch.cos(
        2.0 * math.pi * _uniform(s, k + 1))  # [B, 3, H, W]
    y = x.double() + _to(sigma, torch.float64, x.device).view(-1, 1, 1, 1) * z
    return y.round_().clamp_(0.0, 255.0).float()


def render_batch(images: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """The tail of every view of a batch on the batch's device.

    images: uint8 [B, H, W, 3] (the loaders' layout); params: float64 [B, N_P] on the host (the
    sampler's `sample_views`). Returns pixel values 0..255 as float32 [B, 3, H, W] with
    channels_last storage.
    """
    x = images.permute(0, 3, 1, 2).to(torch.float32)  # NHWC storage = channels_last [B, 3, H, W]
    dev = x.device

    def rows(mask: np.ndarray):
        sel = np.flatnonzero(mask)
        return sel, _to(sel, torch.int64, dev)

    sel, idx = rows(params[:, P_FLIP] > 0.5)
    if len(sel):
        x[idx] = x[idx].flip(3)
    jitter = params[:, P_JITTER] > 0.5
    order = params[:, P_ORDER:P_ORDER + 4].astype(np.int64)
    for slot in range(4):
        for op in range(4):
            sel, idx = rows(jitter & (order[:, slot] == op))
            if len(sel):
                x[idx] = _ADJUST[op](x[idx], params[sel, P_FACTOR + op])
    sel, idx = rows(params[:, P_GRAY] > 0.5)
    if len(sel):
        x[idx] = _trunc(_luma(x[idx])).expand(-1, 3, -1, -1)
    sel, idx = rows(params[:, P_BLUR] > 0.5)
    if len(sel):
        x[idx] = _blur(x[idx], params[sel, P_SIGMA], params[sel, P_WINDOW].astype(np.int64))
    for quarters in (1, 2, 3):  # counter-clockwise
        sel, idx = rows(params[:, P_ROTATE] == quarters)
        if len(sel):
            x[idx] = x[idx].rot90(quarters, dims=(2, 3))
    sel, idx = rows(params[:, P_SOBEL] > 0.5)
    if len(sel):
        x[idx] = _sobel(x[idx])
    sel, idx = rows(params[:, P_NOISE] > 0.5)
    if len(sel):
        streams = params[sel, P_NOISE_STREAM:P_NOISE_STREAM + 2]
        x[idx] = _noise(x[idx], params[sel, P_NOISE_STD], streams)
    sel, idx = rows(params[:, P_CUTOUT] > 0.5)
    if len(sel):
        # one mask for the whole group: rows and columns inside each sample's square
        box = _to(params[sel, P_CUTOUT_BOX:P_CUTOUT_BOX + 3].astype(np.int64), torch.int64, dev)
        top, left, side = (box[:, j].view(-1, 1, 1, 1) for j in range(3))
        ys = torch.arange(x.shape[2], device=dev).view(1, 1, -1, 1)
        xs = torch.arange(x.shape[3], device=dev).view(1, 1, 1, -1)
        inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
        x[idx] = x[idx].masked_fill(inside, 0.0)
    return x
