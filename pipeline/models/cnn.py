"""Convolutional trunks (torchvision ResNet-50 and MobileNetV2) without their classifier heads.

Module names match torchvision's, so torchvision state dicts load after dropping the head
(`fc.*` for ResNet, `classifier.*` for MobileNetV2).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class ResNetTrunk(nn.Module):
    """torchvision ResNet up to `layer4` (stride 32), no pooling and no `fc`."""

    def __init__(self, arch: str = "resnet50") -> None:
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_dim = int(net.fc.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/32, W/32) `layer4` map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class MobileNetV2Trunk(nn.Module):
    """torchvision MobileNetV2 `features` (stride 32, 1280 channels), no classifier."""

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None)
        self.features = net.features
        self.out_dim = int(net.last_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280, ~H/32, ~W/32) last feature map."""
        return self.features(x)
