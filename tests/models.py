"""Tiny networks for tests: two stages, <= 32 channels, 16x16 or 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class TinyResNet(nn.Module):
    """stem 3->w, stage1: 2 blocks of w channels, stage2: 2 blocks of 2w (first strided); w = 8 by default."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Block(w, w), Block(w, w))
        self.layer2 = nn.Sequential(Block(w, 2 * w, 2), Block(2 * w, 2 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyVGG(nn.Module):
    """conv-bn-relu stacks: 3->8, 8->8, 8->8 | pool | 8->16, 16->16, 16->16 (bias on, no BN on the last)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cfg = [(3, 8), (8, 8), (8, 8), "M", (8, 16), (16, 16), (16, 16)]
        for i, c in enumerate(cfg):
            if c == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cin, cout = c
            layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=True))
            if i != len(cfg) - 1:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VGGHead(nn.Module):
    """torchvision's VGG in miniature: single convs at 16x16 and 8x8 (no mix group there), two at 4x4,
    and a classifier of three Linears (32*2*2 -> 64 -> 64 -> classes) holding most parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for c in (8, "M", 16, "M", 32, 32, "M"):
            if c == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(cin, int(c), 3, padding=1), nn.BatchNorm2d(int(c)), nn.ReLU()]
            cin = int(c)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLPBlock(nn.Module):
    """A ConvNeXt block in its Linear form: depthwise 3x3, channels-last LayerNorm, Linear MLP, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)


class TinyMixer(nn.Module):
    """stem 3->8 | two MLP blocks at 16x16 | 8->16 stride 2 | two MLP blocks at 8x8 | pool | Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(MLPBlock(8), MLPBlock(8))
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.stage2 = nn.Sequential(MLPBlock(16), MLPBlock(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


class DepthwiseStage(nn.Module):
    """Section 1 (16x16): a stem conv and two depthwise convs; section 2 (8x8): three dense 3x3 convs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.dw2(self.dw1(self.stem(x)))).mean((2, 3)))


def depthwise_stage(num_classes: int = 10) -> nn.Module:
    return DepthwiseStage(num_classes)


class Untraceable(nn.Module):
    """Data-dependent control flow inside a submodule: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class NoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def tiny_resnet(num_classes: int = 10) -> nn.Module:
    """Factory for ``tests.models:tiny_resnet`` on the command line."""
    return TinyResNet(num_classes)


def no_conv(num_classes: int = 10) -> nn.Module:
    return NoConv()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights, so tests mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def untraceable(num_classes: int = 10) -> nn.Module:
    """Factory for ``tests.models:untraceable``: fx fails inside ``gate`` (a tests.models.Gate)."""
    return Untraceable()


def tiny_vgg(num_classes: int = 10) -> nn.Module:
    """Factory for ``tests.models:tiny_vgg`` (one 2x2 max-pool: inputs below 2x2 fail)."""
    return TinyVGG(num_classes)


class NanAfter(nn.Module):
    """Wraps a model; its outputs become NaN from the ``after``-th training forward on (a fault to inject)."""

    def __init__(self, model: nn.Module, after: int) -> None:
        super().__init__()
        self.model, self.after, self.calls = model, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


class TwoGroups(nn.Module):
    """One 16x16 section with two share groups of different configurations: four 3x3 convs 16->16 and four
    1x1 convs 16->16 (inverted-residual-like pairs), so each group can take its own bank size."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.body = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(16, 16, 3, 1, 1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, 1, bias=False),
                nn.BatchNorm2d(16),
            )
            for _ in range(4)
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.body:
            x = torch.relu(x + block(x))
        return self.fc(x.mean((2, 3)))
