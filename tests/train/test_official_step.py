"""A recipe that copies the official SimCLR hyperparameters takes the official optimizer step.

The oracle is the official formulation written out from google-research/simclr (tf2/objective.py
and tf2/lars_optimizer.py): the contrastive loss as the sum of the two directions' mean
cross-entropies with the self-similarities masked by a large number, and LARS with classic momentum
whose weight decay and layer adaptation skip every BatchNorm parameter and bias by name. Ours:
`nt_xent` (the mean over the 2N anchors) times `loss.scale`, `LARS` over `lars_param_groups`, and
the official projection head (`model.head_out_bn`).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.nt_xent import nt_xent
from model.simclr import SimCLR
from tests.fashion_mnist import REPO
from train.config import load_config
from train.lars import LARS, lars_param_groups

LARGE_NUM = 1e9


def official_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """add_contrastive_loss on one replica: z [2N, D], the two views stacked."""
    h = F.normalize(z, dim=1)
    h1, h2 = h.chunk(2)
    n = h1.shape[0]
    masks = torch.eye(n, dtype=z.dtype)
    labels = torch.arange(n)
    logits_aa = h1 @ h1.T / temperature - masks * LARGE_NUM
    logits_bb = h2 @ h2.T / temperature - masks * LARGE_NUM
    logits_ab = h1 @ h2.T / temperature
    logits_ba = h2 @ h1.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels, reduction="none")
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels, reduction="none")
    return (loss_a + loss_b).mean()


class OfficialLARS:
    """LARSOptimizer(classic_momentum=True, exclude=['batch_normalization', 'bias']) per
    parameter."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, weight_decay: float,
                 eeta: float = 1e-3):
        bn = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
        self.params = [(name, p, id(p) in bn or name.endswith("bias"))
                       for name, p in model.named_parameters() if p.requires_grad]
        self.lr, self.momentum, self.wd, self.eeta = lr, momentum, weight_decay, eeta
        self.v = {name: torch.zeros_like(p) for name, p, _ in self.params}

    @torch.no_grad()
    def step(self):
        for name, p, excluded in self.params:
            grad = p.grad.clone()
            trust = 1.0
            if not excluded:
                grad += self.wd * p
                w_norm, g_norm = p.norm(), grad.norm()
                trust = self.eeta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            self.v[name] = self.momentum * self.v[name] + self.lr * trust * grad
            p -= self.v[name]


def _run(loss_scale: float | None, steps: int = 2):
    """(our model, official model) after `steps` steps from the same start on the same batches;
    loss_scale None: the recipe's own settings."""
    cfg = load_config(REPO / "train/configs/cifar10_resnet18.yaml")
    scale = cfg.loss.scale if loss_scale is None else loss_scale
    torch.manual_seed(0)
    ours = SimCLR("resnet18", width=0.125, small_stem=True, head_out=16,
                  head_out_bn=cfg.model.head_out_bn).double()
    theirs = copy.deepcopy(ours)
    lr, tau, wd, m = 1.2, cfg.loss.temperature, cfg.optim.weight_decay, cfg.optim.momentum
    opt = LARS(lars_param_groups(ours, wd), lr=lr, momentum=m, eta=cfg.optim.eta)
    official = OfficialLARS(theirs, lr, m, wd, cfg.optim.eta)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # two views of 12 images
        x = torch.randn(2 * 12, 3, 16, 16, generator=gen, dtype=torch.float64)
        _, z = ours(x)
        z1, z2 = z.chunk(2)
        opt.zero_grad()
        (nt_xent(z1, z2, tau, impl="chunked") * scale).backward()
        opt.step()
        _, zt = theirs(x)
        for _, p, _ in official.params:
            p.grad = None
        official_loss(zt, tau).backward()
        official.step()
    return ours, theirs, cfg


def test_recipe_step_equals_the_official_step():
    ours, theirs, cfg = _run(None)
    assert cfg.loss.scale == 2.0 and cfg.model.head_out_bn
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    torch.manual_seed(0)
    start = SimCLR("resnet18", width=0.125, small_stem=True, head_out=16, head_out_bn=True).double()
    moved = [not torch.equal(a, s)
             for (_, a), s in zip(ours.named_parameters(), start.parameters(), strict=True)
             if a.requires_grad]
    assert all(moved)  # every trained tensor moved: the agreement above is not vacuous


def test_algorithm_1_scale_takes_a_different_step():
    """With scale 1 (the mean over 2N anchors) and the same hyperparameters, BatchNorm and bias
    parameters move half as far and the weights see twice the relative weight decay."""
    ours, theirs, _ = _run(1.0, steps=1)
    torch.manual_seed(0)
    start = dict(SimCLR("resnet18", width=0.125, small_stem=True, head_out=16,
                        head_out_bn=True).double().named_parameters())
    bn_w = next(k for k in start if k.endswith("bn1.weight"))
    a, b, s = (dict(ours.named_parameters())[bn_w], dict(theirs.named_parameters())[bn_w],
               start[bn_w])
    # an excluded tensor: half the step
    torch.testing.assert_close(a - s, 0.5 * (b - s), rtol=1e-6, atol=1e-12)
    conv = next(k for k, v in start.items() if v.ndim == 4)
    assert not torch.allclose(dict(ours.named_parameters())[conv],
                              dict(theirs.named_parameters())[conv], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("recipe", ["imagenet_resnet50.yaml", "cifar10_resnet18.yaml",
                                    "cifar10_resnet50.yaml"])
def test_recipes_that_claim_the_papers_settings_use_the_official_head_and_scale(recipe):
    cfg = load_config(REPO / "train/configs" / recipe)
    assert cfg.model.head_out_bn and cfg.loss.scale == 2.0
