"""ResNet encoders f(.) for SimCLR: torchvision's blocks and layout, a width multiplier,
and the small-image stem (3x3 conv, stride 1, no max-pool) used for 32x32-class data.

With width=1 and the standard stem the module has exactly torchvision's ResNet parameters
(minus the classifier), so its state dict loads into torchvision's model and back.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
# conv1's kernel, stride and padding: torchvision's stem, and the small-image stem
STANDARD_STEM = (7, 2, 3)
SMALL_STEM = (3, 1, 1)


def set_stem(net: nn.Module, channels: int, *, small_stem: bool, stem_pool: bool | None = None
             ) -> None:
    """Give `net` (a torchvision ResNet, or this module's encoder) its stem: `conv1` from 3 to
    `channels` channels and the max-pool after it. The small stem is a 3x3 convolution of stride
    1, without the max-pool unless `stem_pool`; the standard stem is torchvision's own."""
    kernel, stride, padding = SMALL_STEM if small_stem else STANDARD_STEM
    net.conv1 = nn.Conv2d(3, channels, kernel, stride=stride, padding=padding, bias=False)
    # The max-pool is dropped by default with the small stem; keeping it makes the
    # network 4x cheaper on 28-32 px images at some cost in accuracy.
    pool = not small_stem if stem_pool is None else stem_pool
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if pool else nn.Identity()


class ResNetEncoder(ResNet):
    """torchvision ResNet without its classifier; forward returns pooled features [B, feat_dim]."""

    def __init__(self, arch: str = "resnet50", *, width: float = 1.0, small_stem: bool = False,
                 stem_pool: bool | None = None):
        if arch not in ARCHS:
            raise ValueError(f"unknown encoder '{arch}': choose one of {', '.join(ARCHS)}")
        if width <= 0:
            raise ValueError(f"encoder width multiplier must be > 0, got {width}")
        block, layers = ARCHS[arch]
        nn.Module.__init__(self)
        planes = [max(8, int(round(p * width))) for p in (64, 128, 256, 512)]
        # attributes torchvision's _make_layer reads
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = planes[0]
        set_stem(self, planes[0], small_stem=small_stem, stem_pool=stem_pool)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feat_dim = planes[3] * block.expansion
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)  # [B, feat_dim]
