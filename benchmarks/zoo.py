"""Full-size reference architectures for the scaling benchmarks (no torchvision needed).

Each builder returns ``(model, example_inputs)`` in ``eval()`` mode with a fixed seed, at the real
widths and depths of the architecture it is named after (parameter counts within a few percent of
torchvision's): ResNet-50 (25.6M), DenseNet-121 (8.0M), an EfficientNet-V2-S-like net (fused and
SE-MBConv stages, 21M), VGG-16-BN (138M), and GPT-style decoder transformers from 1M to 350M
parameters. Images are ``(1, 3, size, size)`` (default 224; VGG pools adaptively to 7x7 as
torchvision's does, so smaller images work); token inputs ``(1, size)`` ids (default and at most 64).

>>> model, inputs = ZOO["gpt_1m"]()
>>> model(*inputs).shape, 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
(torch.Size([1, 64, 512]), True)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZOO", "param_count"]

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def param_count(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _image(size: int = 224) -> tuple[torch.Tensor]:
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act(inplace=True)] if act is not None else []))


# --- ResNet-50 -------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(_cbr(cin, width, 1), _cbr(width, width, 3, stride), _cbr(width, cout, 1, act=None))
        self.down = _cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet50(size: int = 224) -> Example:
    torch.manual_seed(0)
    layers, cin = [_cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
    for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(n):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))
    return model.eval(), _image(size)


# --- DenseNet-121 ----------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 32, bn_size: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
                                  nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet121(size: int = 224) -> Example:
    torch.manual_seed(0)
    layers, c = [_cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
    for i, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            layers.append(DenseLayer(c))
            c += 32
        if i != 3:
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    model = nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(c, 1000))
    return model.eval(), _image(size)


# --- EfficientNet-V2-S-like ------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    """Fused (3x3 expand conv) or depthwise (1x1 expand, depthwise 3x3, SE) inverted residual."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, fused: bool) -> None:
        super().__init__()
        hidden = cin * expand
        if fused:
            layers = [_cbr(cin, hidden, 3, stride, act=nn.SiLU)] if expand != 1 else []
            layers.append(_cbr(hidden if expand != 1 else cin, cout, 1 if expand != 1 else 3,
                               1 if expand != 1 else stride, act=None if expand != 1 else nn.SiLU))
        else:
            layers = [_cbr(cin, hidden, 1, act=nn.SiLU), _cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU),
                      SqueezeExcite(hidden, max(1, cin // 4)), _cbr(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def efficientnet_v2_s(size: int = 224) -> Example:
    torch.manual_seed(0)
    setting = ((1, 24, 2, 1, True), (4, 48, 4, 2, True), (4, 64, 4, 2, True), (4, 128, 6, 2, False),
               (6, 160, 9, 1, False), (6, 256, 15, 2, False))
    layers, cin = [_cbr(3, 24, 3, 2, act=nn.SiLU)], 24
    for expand, cout, n, stride, fused in setting:
        for i in range(n):
            layers.append(MBConv(cin, cout, expand, stride if i == 0 else 1, fused))
            cin = cout
    model = nn.Sequential(*layers, _cbr(cin, 1280, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(1280, 1000))
    return model.eval(), _image(size)


# --- VGG-16-BN -------------------------------------------------------------------------------------
def vgg16_bn(size: int = 224) -> Example:
    torch.manual_seed(0)
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                          nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(4096, 1000))
    return model.eval(), _image(size)


# --- GPT-style decoder -----------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int = 64) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(1, context, d))
        self.blocks = nn.Sequential(*[DecoderBlock(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        return self.head(self.ln(self.blocks(self.embed(ids) + self.pos[:, : ids.shape[1]])))


def _gpt(vocab: int, d: int, layers: int) -> Callable[[], Example]:
    def build(size: int = 64) -> Example:
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (1, min(size, 64)), generator=torch.Generator().manual_seed(1))
        return GPT(vocab, d, layers, max(1, d // 64)).eval(), (ids,)

    build.__doc__ = f"GPT decoder: vocab {vocab}, width {d}, {layers} layers (~{(12 * d * d * layers + 2 * vocab * d) / 1e6:.0f}M)."
    return build


ZOO: dict[str, Callable[[], Example]] = {
    "gpt_1m": _gpt(512, 128, 4),
    "gpt_10m": _gpt(4096, 256, 10),
    "gpt_45m": _gpt(8192, 512, 12),
    "resnet50": resnet50,
    "densenet121": densenet121,
    "efficientnet_v2_s": efficientnet_v2_s,
    "vgg16_bn": vgg16_bn,
    "gpt_350m": _gpt(24000, 1024, 24),
}

if __name__ == "__main__":
    for name, build in ZOO.items():
        model, inputs = build()
        print(f"{name:20s} {param_count(model) / 1e6:8.1f}M  out {tuple(model(*inputs).shape)}")
        del model
