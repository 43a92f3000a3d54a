"""CIFAR ResNet18 as used by ADBA (SPEC section 2).

3x3 stem convolution (stride 1, no max-pool), BasicBlocks [2, 2, 2, 2] with w, 2w, 4w, 8w channels,
global average pool and a linear head. Inputs are [0, 1] images without normalisation.

The attribute names are fixed by real ADBA checkpoints, whose state-dict keys must load unchanged:
``conv1, bn1, layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2}, layer{2,3,4}.0.shortcut.{0,1}, linear``.
At width 64 with 10 classes the model has 11,173,962 parameters.
"""
import torch.nn as nn
import torch.nn.functional as F


class StridedPointwise(nn.Conv2d):
    """A 1x1 convolution with stride ``s`` (the shortcut's), computed as the 1x1 convolution of ``x[:, :, ::s, ::s]``:
    the same numbers, without PyTorch's strided 1x1 CPU kernel, which in channels_last corrupts the heap, crashes
    or hangs (torch 2.14.1, 2-core AMD EPYC: 4 -> 8 channels at any batch with one thread, and at odd batches of a
    width-8 ResNet18 with two; tests/test_resnet.py runs the cases in a subprocess). Same parameter, same keys."""

    def forward(self, x):
        s = self.stride
        return F.conv2d(x[:, :, ::s[0], ::s[1]], self.weight, self.bias)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                StridedPointwise(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes=10, width=64):
        super().__init__()
        self.width = width
        self.num_classes = num_classes
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes=10, width=64):
    """The standard CIFAR ResNet18 at ``width=64``; smaller widths give narrow variants for tests and CPUs."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width)
