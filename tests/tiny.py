"""Tiny networks that stand in for a torchvision ResNet in the maths tests: the same module
names (conv1, bn1, relu, maxpool, layer1..layer4, avgpool) in a forward that returns the pooled
features, so that TransferNet, the feature-map taps and DELTA's stage-by-stage ablation read
them as they read a ResNet, in float64 and in milliseconds."""

from collections import OrderedDict

from torch import nn

from safetransfer.training.backbones import FAMILY_STAGES, TransferNet

STAGES = FAMILY_STAGES["resnet"]


def resnet_shaped(num_features: int, **modules: nn.Module) -> nn.Sequential:
    """A Sequential named like a ResNet; the modules not given are the identity."""
    names = ("conv1", "bn1", "relu", "maxpool", *STAGES)
    backbone = nn.Sequential(
        OrderedDict(
            [(name, modules.get(name, nn.Identity())) for name in names]
            + [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
        )
    )
    backbone.num_features = num_features
    return backbone


def tiny_resnet(num_classes: int, width: int = 4) -> TransferNet:
    """Three-channel images through a 3x3 convolution, BatchNorm, ReLU and four stages of a
    convolution each (stride 2 from the second): 4 feature maps, `width` pooled features."""

    def stage(stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())

    backbone = resnet_shaped(
        width,
        conv1=nn.Conv2d(3, width, 3, 1, 1, bias=False),
        bn1=nn.BatchNorm2d(width),
        relu=nn.ReLU(),
        **{name: stage(1 if i == 0 else 2) for i, name in enumerate(STAGES)},
    )
    return TransferNet(backbone, num_classes, stages=STAGES)
