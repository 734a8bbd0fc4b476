"""Compact rebuilds of torchvision / timm architectures with the same wiring
(module tree, residual adds, SE scales, depthwise / grouped convolutions,
channels-last LayerNorm, class token) at tiny widths, for discovery tests.
torchvision cannot be installed next to the CPU torch used here."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def cna(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    """torchvision's Conv2dNormActivation: conv (no bias) + BatchNorm + activation."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


# -- ResNet ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, layers=(1, 1, 1, 1), width=8, classes=5):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make(block, width, layers[0])
        self.layer2 = self._make(block, width * 2, layers[1], 2)
        self.layer3 = self._make(block, width * 4, layers[2], 2)
        self.layer4 = self._make(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, classes)

    def _make(self, block, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -- MobileNetV2 / V3, EfficientNet ------------------------------------------------------------------
class InvertedResidualV2(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [cna(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [cna(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes=5, last=32):
        super().__init__()
        cfg = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 1, 2)]  # t, c, n, s
        feats = [cna(3, 8, 3, 2, act=nn.ReLU6)]
        cin = 8
        for t, c, n, s in cfg:
            for i in range(n):
                feats.append(InvertedResidualV2(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(cna(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: 1x1 conv fc1 / fc2, scale the input."""

    def __init__(self, cin, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(cin, squeeze, 1), nn.Conv2d(squeeze, cin, 1)
        self.activation, self.scale_activation = activation(), scale_activation()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, exp, cout, k, se, hs, stride):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers = [cna(cin, exp, 1, act=act)] if exp != cin else []
        layers.append(cna(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, max(8, exp // 4), scale_activation=nn.Hardsigmoid))
        layers.append(cna(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        cfg = [(8, 8, 8, 3, True, False, 2), (8, 24, 12, 3, False, False, 2), (12, 32, 12, 3, False, True, 1),
               (12, 48, 16, 5, True, True, 2), (16, 48, 16, 5, True, True, 1)]
        feats = [cna(3, 8, 3, 2, act=nn.Hardswish)]
        feats += [InvertedResidualV3(*c) for c in cfg]
        feats.append(cna(16, 48, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth ("row"): identity in eval mode."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, stride, sd):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        exp = cin * expand
        layers = [cna(cin, exp, 1, act=nn.SiLU)] if exp != cin else []
        layers += [cna(exp, exp, k, stride, groups=exp, act=nn.SiLU),
                   SqueezeExcitation(exp, max(1, cin // 4), activation=nn.SiLU), cna(exp, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd)

    def forward(self, x):
        y = self.block(x)
        if self.use_res_connect:
            y = self.stochastic_depth(y) + x
        return y


class EfficientNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        cfg = [(1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 12, 2), (6, 5, 2, 12, 16, 1)]  # expand, k, stride, cin, cout, n
        feats: list[nn.Module] = [cna(3, 8, 3, 2, act=nn.SiLU)]
        for e, k, s, cin, cout, n in cfg:
            feats.append(nn.Sequential(*[MBConv(cin if i == 0 else cout, cout, e, k, s if i == 0 else 1, 0.1)
                                         for i in range(n)]))
        feats.append(cna(16, 64, 1, act=nn.SiLU))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -- ConvNeXt ----------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-6 * 1e5):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(0.1)

    def forward(self, x):
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXt(nn.Module):
    def __init__(self, dims=(8, 16), classes=5):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, d in enumerate(dims):
            layers.append(nn.Sequential(CNBlock(d), CNBlock(d)))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# -- RegNet (Y: group conv + SE) ------------------------------------------------------------------------
class BottleneckTransform(nn.Module):
    def __init__(self, cin, cout, stride, group_width, se_ratio):
        super().__init__()
        self.a = cna(cin, cout, 1)
        self.b = cna(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcitation(cout, max(1, int(round(se_ratio * cin)))) if se_ratio else None
        self.c = cna(cout, cout, 1, act=None)

    def forward(self, x):
        x = self.b(self.a(x))
        if self.se is not None:
            x = self.se(x)
        return self.c(x)


class ResBottleneckBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width=4, se_ratio=0.25):
        super().__init__()
        self.proj = cna(cin, cout, 1, stride, act=None) if cin != cout or stride != 1 else None
        self.f = BottleneckTransform(cin, cout, stride, group_width, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = (self.proj(x) if self.proj is not None else x) + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    def __init__(self, widths=(8, 16), depths=(1, 2), classes=5, se_ratio=0.25):
        super().__init__()
        self.stem = cna(3, 8, 3, 2)
        blocks, cin = [], 8
        for i, (w, d) in enumerate(zip(widths, depths)):
            stage = [ResBottleneckBlock(cin if j == 0 else w, w, 1 + (j == 0), se_ratio=se_ratio) for j in range(d)]
            blocks.append((f"block{i + 1}", nn.Sequential(*stage)))
            cin = w
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


# -- Vision Transformers -----------------------------------------------------------------------------
class MLPBlock(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    """torchvision's ViT block: ln_1, nn.MultiheadAttention, ln_2, MLP."""

    def __init__(self, heads, dim, hidden):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """torchvision VisionTransformer wiring: patch conv, class token, position embedding."""

    def __init__(self, image=16, patch=4, layers=2, heads=4, dim=16, hidden=32, classes=5):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        n = (image // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, hidden) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential(nn.Linear(dim, classes))

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.heads(x[:, 0])


class TimmAttention(nn.Module):
    """timm's Attention: fused qkv, num_heads, head_dim, proj. ``reshape_c`` keeps timm's
    ``reshape(B, N, C)`` (C read from the input), which breaks with fewer heads."""

    def __init__(self, dim, heads, reshape_c=False):
        super().__init__()
        self.num_heads, self.head_dim, self.reshape_c = heads, dim // heads, reshape_c
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C if self.reshape_c else -1)
        return self.proj_drop(self.proj(x))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads, hidden, reshape_c=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads, reshape_c)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    def __init__(self, dim=16, heads=4, hidden=32, layers=2, classes=5, reshape_c=False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads, hidden, reshape_c) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# -- timm's MobileNetV2 (BatchNorm + activation in one module with a forward of its own) ----------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's wiring: the functional batch norm on the module's own tensors, then an
    activation, in the module's own forward (not a stock BatchNorm leaf)."""

    def __init__(self, c, act=True):
        super().__init__(c)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average (what nest.calibrate asks for)
                factor = 1.0 / float(self.num_batches_tracked)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, factor, self.eps)
        return self.act(x)


class TimmInvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), BatchNormAct2d(cout, act=False)

    def forward(self, x):
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + y if self.has_skip else y


class TimmMobileNetV2(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv_stem, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), BatchNormAct2d(8)
        self.blocks = nn.Sequential(TimmInvertedResidual(8, 12, 2, 4), TimmInvertedResidual(12, 12, 1, 4),
                                    TimmInvertedResidual(12, 16, 1, 4))
        self.conv_head, self.bn2 = nn.Conv2d(16, 32, 1, bias=False), BatchNormAct2d(32)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))


class UNet(nn.Module):
    """A small U-Net: strided-conv encoder, ConvTranspose2d upsampling, one added and one concatenated skip,
    a per-pixel head (segmentation: the output keeps the input's spatial size)."""

    def __init__(self, classes=2):
        super().__init__()
        self.enc1, self.down1, self.down2 = cna(3, 8), cna(8, 16, stride=2), cna(16, 32, stride=2)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2), nn.BatchNorm2d(16))
        self.dec2 = cna(16, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False)
        self.dec1, self.head = cna(16, 8), nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        d1 = self.down1(e1)
        y = self.dec2(self.up2(self.down2(d1)) + d1)          # added skip
        return self.head(self.dec1(torch.cat([self.up1(y), e1], 1)))  # concatenated skip


def _randomise_bn(m: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (a freshly built BN is the identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):  # (and BatchNormAct2d)
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    return m.eval()


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: ResNet(BasicBlock),
    "resnet50": lambda: ResNet(Bottleneck, width=4),
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3": MobileNetV3,
    "efficientnet_b0": EfficientNet,
    "convnext": ConvNeXt,
    "regnet_y": RegNet,
    "regnet_x": lambda: RegNet(se_ratio=0.0),
    "vit_torchvision": ViT,
    "vit_timm": TimmViT,
    "mobilenet_v2_timm": TimmMobileNetV2,
    "unet": UNet,
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A fresh model of architecture ``name`` (eval mode) and an example batch."""
    torch.manual_seed(seed)
    return _randomise_bn(ARCHS[name]()), torch.randn(2, 3, 16, 16)
