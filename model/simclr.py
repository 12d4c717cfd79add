"""SimCLR model: encoder f and projection head g (Chen et al., 2020, Sec. 2.1).

The head is one of the paper's three (Sec. 4.2, Fig. 8), chosen by its number of layers: 0 = none
(g is the identity: the loss sees h), 1 = linear (one Linear layer), 2 or more = non-linear (Linear,
BN, ReLU blocks, then a Linear; 2 in SimCLR v1, 3 in v2).
"""

from __future__ import annotations

import torch
from torch import nn

from model.encoder import ResNetEncoder


def head_kind(layers: int) -> str:
    """The paper's name for a head of `layers` layers: none, linear or non-linear."""
    return "none" if layers == 0 else "linear" if layers == 1 else "non-linear"


def head_problem(layers: int, hidden: int = 0, out_bn: bool = False) -> str | None:
    """Why these head settings make no sense together (one line naming the key and the fix), or
    None. Only a head with no layers has settings that cannot apply to it: a linear head ignores
    `hidden`, as it always has, so older runs that set it still build."""
    if layers < 0:
        return f"'model.head_layers' must be >= 0 (0 = no head), got {layers}"
    if layers == 0 and out_bn:
        return ("'model.head_out_bn' needs a projection head and model.head_layers=0 has none: "
                "set model.head_out_bn=false or model.head_layers >= 1")
    if layers == 0 and hidden:
        return ("'model.head_hidden' is the width inside a head and model.head_layers=0 has "
                "none: set model.head_hidden=0 or model.head_layers >= 2")
    return None


class ProjectionHead(nn.Sequential):
    """g(.): `layers` linear layers with BN+ReLU between them (2 in SimCLR v1, 3 in v2; 1 is the
    paper's linear head).

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
    """f and g. `head_layers=0` gives no head (`head` is the identity and `head_out` is unused);
    `proj_dim` is the width of what the loss sees: `head_out`, or the encoder's width with no head.
    """

    def __init__(self, arch: str = "resnet50", *, width: float = 1.0, small_stem: bool = False,
                 stem_pool: bool | None = None, head_hidden: int = 0, head_out: int = 128,
                 head_layers: int = 2, head_out_bn: bool = False):
        super().__init__()
        problem = head_problem(head_layers, head_hidden, head_out_bn)
        if problem:
            raise ValueError(problem)
        self.encoder = ResNetEncoder(arch, width=width, small_stem=small_stem, stem_pool=stem_pool)
        feat = self.encoder.feat_dim
        self.head_kind = head_kind(head_layers)
        if head_layers == 0:
            self.head: nn.Module = nn.Identity()
            self.proj_dim = feat
        else:
            self.head = ProjectionHead(feat, head_hidden or feat, head_out, head_layers,
                                       out_bn=head_out_bn)
            self.proj_dim = head_out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # [B, F] representation kept after training
        return h, self.head(h)  # [B, F], [B, proj_dim]

    def features(self, which: str = "h") -> nn.Module:
        """The network that maps images to the features `which` names: "h" the encoder's output
        f(x), "g" the head's output g(f(x)) (= h with no head). Shares this model's modules."""
        if which == "h":
            return self.encoder
        if which == "g":
            return nn.Sequential(self.encoder, self.head)
        raise ValueError(f"features must be 'h' or 'g', got {which!r}")


def build_simclr(mc) -> SimCLR:
    """The model described by a `train.config.ModelConfig`."""
    return SimCLR(mc.arch, width=mc.width, small_stem=mc.small_stem,
                  stem_pool=mc.stem_pool if mc.small_stem else None,
                  head_hidden=mc.head_hidden, head_out=mc.head_out, head_layers=mc.head_layers,
                  head_out_bn=mc.head_out_bn)
