"""Frozen-network features for evaluation (kNN monitor, linear evaluation): the encoder's,
h = f(x), or those of encoder and head, g(h) (`SimCLR.features`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipelines.eval_view import eval_resize, eval_transform, load_image
from pipelines.sources import Split, one_line_worker_errors
from pipelines.spec import AugmentSpec
from train import precision as precisions


class _EvalViews(Dataset):
    def __init__(self, split: Split, spec: AugmentSpec, indices: np.ndarray):
        self.split, self.indices, self.transform = split, indices, eval_transform(spec)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.transform(load_image(self.split, int(self.indices[i])))


def _array_views(split: Split, spec: AugmentSpec, idx: np.ndarray) -> torch.Tensor:
    """Batched eval views for in-memory uint8 arrays (no per-sample Python work)."""
    # uint8 [B, C, H, W]
    x = torch.from_numpy(np.ascontiguousarray(split.images[idx])).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size or spec.size > 32:
        x = eval_resize(x, spec.size)
    x = x.float().div_(255)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_views(split: Split, spec: AugmentSpec, indices: np.ndarray, batch_size: int,
               num_workers: int = 2):
    """Yields normalised, un-augmented float batches [B, 3, S, S] for `indices`, in order."""
    if split.images is not None:
        for s in range(0, len(indices), batch_size):
            yield _array_views(split, spec, indices[s : s + batch_size])
        return
    yield from one_line_worker_errors(DataLoader(_EvalViews(split, spec, indices),
                                                 batch_size=batch_size, num_workers=num_workers))


def eval_bf16(precision: str, device) -> bool:
    """Whether evaluation forwards on `device` run under bf16 autocast: precision "auto" as
    training's (a GPU, or a CPU with native bf16: `cpu_native_bf16`), "bf16" always, "fp32"
    never."""
    if precision not in precisions.PRECISIONS:
        raise ValueError(f"precision must be one of {precisions.PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.device(device).type == "cuda" or (
            torch.device(device).type == "cpu" and precisions.cpu_native_bf16())
    return precision == "bf16"


@torch.no_grad()
def forward_eval(net: torch.nn.Module, x: torch.Tensor, device,
                 precision: str = "auto") -> torch.Tensor:
    """`net` on a normalised batch as every evaluation runs it: on `device`, channels_last, under
    bf16 autocast where `eval_bf16` says so (a GPU or a native-bf16 CPU by default); the output
    float32 on the CPU."""
    device = torch.device(device)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                        enabled=eval_bf16(precision, device)):
        out = net(x)
    return out.float().cpu()


@torch.no_grad()
def extract_features(net: torch.nn.Module, split: Split, spec: AugmentSpec, *, indices=None,
                     batch_size: int = 512, device="cpu", num_workers: int = 2,
                     normalize: bool = False, progress=None,
                     precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the frozen network `net` (eval mode) and labels, on CPU, float32: h = f(x)
    when `net` is the encoder, g(h) when it is `SimCLR.features("g")`; `precision` as in
    `eval_bf16`."""
    indices = np.arange(len(split)) if indices is None else np.asarray(indices)
    was_training = net.training
    net.eval()
    feats = []
    for x in eval_views(split, spec, indices, batch_size, num_workers):
        feats.append(forward_eval(net, x, device, precision))
        if progress is not None:
            progress(len(x))
    net.train(was_training)
    h = torch.cat(feats)
    if normalize:
        h = F.normalize(h, dim=1)
    return h, torch.from_numpy(np.asarray(split.labels)[indices]).long()


def knn_bank(cfg, n_train: int) -> np.ndarray:
    """The train images of the kNN monitor's bank: a seeded draw of train.knn_train_samples."""
    n = min(cfg.train.knn_train_samples, n_train)
    return np.random.default_rng(cfg.train.seed).choice(n_train, n, replace=False)


def knn_top1(cfg, encoder: torch.nn.Module, train_split: Split, eval_split: Split,
             device) -> float:
    """The kNN monitor's evaluation of `encoder`: train.knn_k neighbours over the seeded bank,
    on the whole evaluation split, its features at the run's precision (train.mixed_precision)."""
    kw = dict(batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.data.num_workers,
              precision=cfg.train.mixed_precision)
    th, ty = extract_features(encoder, train_split, cfg.augment,
                              indices=knn_bank(cfg, len(train_split)), **kw)
    eh, ey = extract_features(encoder, eval_split, cfg.augment, **kw)
    return knn_accuracy(th, ty, eh, ey, k=cfg.train.knn_k)


def knn_accuracy(train_h: torch.Tensor, train_y: torch.Tensor, test_h: torch.Tensor,
                 test_y: torch.Tensor, k: int = 200, t: float = 0.07, chunk: int = 1024) -> float:
    """Weighted cosine kNN top-1 accuracy (Wu et al., 2018, Eq. 7): votes weighted by exp(sim/t)."""
    train_h, test_h = F.normalize(train_h, dim=1), F.normalize(test_h, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_h))
    correct = 0
    for s in range(0, len(test_h), chunk):
        sim = test_h[s : s + chunk] @ train_h.T  # [c, M]
        w, nn_idx = sim.topk(k, dim=1)  # [c, k]
        votes = torch.zeros(len(w), classes).scatter_add_(1, train_y[nn_idx], (w / t).exp())
        correct += (votes.argmax(1) == test_y[s : s + chunk]).sum().item()
    return correct / len(test_h)
