"""The models of the examples, benchmarks and tests.

Built here with torch only:

* :func:`resnet32` (and :func:`cifar_resnet` for any depth ``6k + 2``): the CIFAR ResNet of
  He et al. 2016 (section 4.2), option A: a 3x3 stem conv with 16 channels, three stages of
  ``k`` basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the
  resolution), parameter-free shortcuts that subsample and zero-pad the channels, global
  average pooling and one Linear classifier. ResNet-32 has 0.46 M parameters.
* :func:`small_cnn`: three conv blocks (16, 32, 64 channels) and a classifier, for CPU runs.

Every conv except the stem has an input-channel count divisible by 16, so every N:M pattern of
the paper (2:4, 1:4, 1:16) applies to all of them; the stem and the classifier are what
:func:`bame_optim.nm_param_groups` keeps dense by default.

Built from torchvision (imported when called, so this module imports torch only):

* :func:`mobilenet_v2_cifar`: torchvision's MobileNet-V2 with the usual CIFAR change (stride 1
  in the stem and in the first stride-2 stage, so 32x32 inputs are not reduced to 1x1).
* :func:`resnet18`, :func:`resnet50`: torchvision's ImageNet ResNets.
* :func:`deit_small`: the ViT of the DeiT recipe (Touvron et al. 2021, DeiT-S: patch 16,
  width 384, depth 12, 6 heads, MLP 1536) as torchvision's ``VisionTransformer``.

:data:`MODELS` maps the names the scripts accept to builders ``f(num_classes, in_channels)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MODELS",
    "build_model",
    "cifar_resnet",
    "deit_small",
    "mobilenet_v2_cifar",
    "resnet18",
    "resnet32",
    "resnet50",
    "small_cnn",
]


class _PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and zero-pad the new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and a residual connection (He et al. 2016, Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``blocks`` basic blocks per stage (depth ``6 * blocks + 2``)."""

    def __init__(self, blocks: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet of ``depth`` layers (20, 32, 44, 56, 110, ...: ``6k + 2``)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"Invalid depth value: {depth!r} (6k + 2 with k >= 1 is required)")
    return CifarResNet((depth - 2) // 6, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for CIFAR-10 (5 basic blocks per stage), as in the paper's Table 1."""
    return cifar_resnet(32, num_classes, in_channels)


def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """Three conv-BN-ReLU blocks (16, 32, 64 channels; the last two halve the resolution),
    global average pooling and a Linear classifier. ``image_size`` is accepted for the
    benchmarks' uniform call; the model works at any size >= 4."""
    if image_size < 4:
        raise ValueError(f"Invalid image_size value: {image_size!r} (at least 4 is required)")

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(in_channels, 16, 1),
        *block(16, 32, 2),
        *block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def mobilenet_v2_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's MobileNet-V2 for 32x32 inputs: stride 1 in the stem and in the first
    stride-2 inverted residual (the common CIFAR adaptation), the rest unchanged."""
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    model.features[2].conv[1][0].stride = (1, 1)
    return model


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 (ImageNet layout)."""
    from torchvision.models import resnet18 as build

    return _with_stem_channels(build(num_classes=num_classes), in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (ImageNet layout)."""
    from torchvision.models import resnet50 as build

    return _with_stem_channels(build(num_classes=num_classes), in_channels)


def _with_stem_channels(model: nn.Module, in_channels: int) -> nn.Module:
    if in_channels != 3:
        stem = model.conv1
        model.conv1 = nn.Conv2d(in_channels, stem.out_channels, 7, 2, 3, bias=False)
    return model


DEIT_SMALL = dict(patch_size=16, hidden_dim=384, num_layers=12, num_heads=6, mlp_dim=1536)
"""DeiT-S of Touvron et al. 2021, Table 1."""


def deit_small(
    num_classes: int = 1000, in_channels: int = 3, image_size: int = 224
) -> nn.Module:
    """DeiT-small as torchvision's ``VisionTransformer`` (:data:`DEIT_SMALL`)."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=image_size, num_classes=num_classes, **DEIT_SMALL)
    if in_channels != 3:
        proj = model.conv_proj
        model.conv_proj = nn.Conv2d(in_channels, proj.out_channels, 16, 16)
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda num_classes=10, in_channels=1: small_cnn(in_channels, num_classes),
    "resnet32": resnet32,
    "mobilenet_v2": mobilenet_v2_cifar,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "deit_small": deit_small,
}
"""Builders by the names the scripts and benchmarks accept."""


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The model called ``name`` (a key of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"Invalid model value: {name!r} (choose from {sorted(MODELS)})")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
