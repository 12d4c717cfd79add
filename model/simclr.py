"""SimCLR model: encoder f and projection head g (Chen et al., 2020, Sec. 2.1)."""

from __future__ import annotations

import torch
from torch import nn

from model.encoder import ResNetEncoder


class ProjectionHead(nn.Sequential):
    """g(.): `layers` linear layers with BN+ReLU between them (2 in SimCLR v1, 3 in v2).

    out_bn=False: the last layer is Linear with bias (the paper's description, SimCLR v1).
    out_bn=True: the last layer is Linear without bias followed by BatchNorm with a learned scale
    and no shift, as the official code builds it (`LinearLayer(use_bias=False, use_bn=True)`:
    BatchNorm with center=False); the shift is a zero bias that never trains.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2,
                 out_bn: bool = False):
        if layers < 1:
            raise ValueError(f"projection head needs >= 1 layer, got {layers}")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                     nn.ReLU(inplace=True)]
            dim = hidden_dim
        if out_bn:
            bn = nn.BatchNorm1d(out_dim)
            bn.bias.requires_grad_(False)  # center=False: no shift
            mods += [nn.Linear(dim, out_dim, bias=False), bn]
        else:
            mods.append(nn.Linear(dim, out_dim))
        super().__init__(*mods)


class SimCLR(nn.Module):
    def __init__(self, arch: str = "resnet50", *, width: float = 1.0, small_stem: bool = False,
                 stem_pool: bool | None = None, head_hidden: int = 0, head_out: int = 128,
                 head_layers: int = 2, head_out_bn: bool = False):
        super().__init__()
        self.encoder = ResNetEncoder(arch, width=width, small_stem=small_stem, stem_pool=stem_pool)
        feat = self.encoder.feat_dim
        self.head = ProjectionHead(feat, head_hidden or feat, head_out, head_layers,
                                   out_bn=head_out_bn)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # [B, F] representation kept after training
        return h, self.head(h)  # [B, F], [B, D]


def build_simclr(mc) -> SimCLR:
    """The model described by a `train.config.ModelConfig`."""
    return SimCLR(mc.arch, width=mc.width, small_stem=mc.small_stem,
                  stem_pool=mc.stem_pool if mc.small_stem else None,
                  head_hidden=mc.head_hidden, head_out=mc.head_out, head_layers=mc.head_layers,
                  head_out_bn=mc.head_out_bn)
