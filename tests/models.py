"""In-repo reference architectures for tests and benchmarks.

Each builder returns ``(model, example_inputs)``: a small, deterministically initialised model in
``eval()`` mode and a tuple of example tensors. The models are tiny (a forward pass takes
milliseconds on CPU) but keep the structure of the real architectures: residual adds, concatenation,
grouped and depthwise convolutions, channel shuffles, squeeze-excitation, attention, recurrences,
data-dependent control flow and nested outputs.

>>> model, inputs = REFERENCE_MODELS["resnet_basic"]()
>>> model(*inputs).shape
torch.Size([1, 10])
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["REFERENCE_MODELS", "VISION_TRANSFORMER_MODELS"]

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _finish(model: nn.Module, *inputs: torch.Tensor) -> Example:
    return model.eval(), inputs


def _image(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# --- VGG -------------------------------------------------------------------------------------------

class VGG(nn.Module):
    """VGG with BatchNorm: conv-bn-relu stacks, max pooling, dropout classifier."""

    def __init__(self, cfg=(16, 16, "M", 32, 32, "M", 64, 64, "M"), num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(cin * 4 * 4, 64), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_bn() -> Example:
    torch.manual_seed(0)
    return _finish(VGG(), _image())


# --- ResNet / ResNeXt ------------------------------------------------------------------------------

def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity or 1x1-conv+BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (optionally grouped: ResNeXt) -> 1x1 expand, with shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem, stages of blocks (first block of a stage may stride), global pool, linear head."""

    def __init__(self, stages: list[list[nn.Module]], stem: int, out: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(*[nn.Sequential(*blocks) for blocks in stages])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_basic() -> Example:
    torch.manual_seed(0)
    stages = [
        [BasicBlock(16, 16), BasicBlock(16, 16)],
        [BasicBlock(16, 32, 2), BasicBlock(32, 32)],
        [BasicBlock(32, 64, 2), BasicBlock(64, 64)],
    ]
    return _finish(ResNet(stages, 16, 64), _image())


def resnet_shallow() -> Example:
    """``resnet_basic`` with one block per stage (not in ``REFERENCE_MODELS``): the shallow teacher
    of the n2n policy-transfer experiment (``benchmarks/n2n_transfer.py``)."""
    torch.manual_seed(0)
    stages = [[BasicBlock(16, 16)], [BasicBlock(16, 32, 2)], [BasicBlock(32, 64, 2)]]
    return _finish(ResNet(stages, 16, 64), _image())


def resnet_bottleneck() -> Example:
    torch.manual_seed(0)
    stages = [
        [Bottleneck(16, 8, 32), Bottleneck(32, 8, 32)],
        [Bottleneck(32, 16, 64, 2), Bottleneck(64, 16, 64)],
    ]
    return _finish(ResNet(stages, 16, 64), _image())


def resnext() -> Example:
    torch.manual_seed(0)
    stages = [
        [Bottleneck(16, 32, 64, groups=8), Bottleneck(64, 32, 64, groups=8)],
        [Bottleneck(64, 64, 128, 2, groups=8), Bottleneck(128, 64, 128, groups=8)],
    ]
    return _finish(ResNet(stages, 16, 128), _image())


# --- MobileNetV2 -----------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> project 1x1 (linear); residual iff stride 1 and cin == cout."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a reduced inverted-residual setting (t, c, n, s)."""

    def __init__(self, setting=((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 2, 1)),
                 num_classes: int = 10):
        super().__init__()
        layers, cin = [conv_bn(3, 16, 3, 1, act=nn.ReLU6)], 16
        for t, c, n, s in setting:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 64, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2() -> Example:
    torch.manual_seed(0)
    return _finish(MobileNetV2(), _image())


# --- DenseNet --------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) -> BN-ReLU-3x3 conv producing ``growth`` new channels."""

    def __init__(self, cin: int, growth: int, bn_size: int = 2):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    """Each layer sees the concatenation of the block input and all earlier layers' outputs."""

    def __init__(self, n: int, cin: int, growth: int):
        super().__init__({f"layer{i}": DenseLayer(cin + i * growth, growth) for i in range(n)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """Stem, dense blocks separated by transitions (BN-ReLU-1x1 conv-avgpool), BN, pool, linear."""

    def __init__(self, growth: int = 8, blocks=(3, 3, 3), stem: int = 16, num_classes: int = 10):
        super().__init__()
        layers, c = [nn.Conv2d(3, stem, 3, 1, 1, bias=False)], stem
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth))
            c += n * growth
            if i != len(blocks) - 1:
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False),
                           nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def densenet() -> Example:
    torch.manual_seed(0)
    return _finish(DenseNet(), _image())


# --- ShuffleNetV2 ----------------------------------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: split channels in half, transform one half. Stride 2: two branches, both downsample."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        mid = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                                         conv_bn(cin, mid, 1))
        else:
            self.branch1 = nn.Sequential()
        bin_ = cin if stride > 1 else mid
        self.branch2 = nn.Sequential(conv_bn(bin_, mid, 1), conv_bn(mid, mid, 3, stride, groups=mid, act=None),
                                     conv_bn(mid, mid, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Stem, stages of one stride-2 unit followed by stride-1 units, 1x1 conv, pool, linear."""

    def __init__(self, repeats=(2, 3), channels=(16, 32, 64, 128), num_classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn(3, channels[0], 3, 1)
        stages, cin = [], channels[0]
        for n, cout in zip(repeats, channels[1:]):
            stages.append(nn.Sequential(ShuffleUnit(cin, cout, 2), *[ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn(cin, channels[-1], 1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.conv1(x)))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2() -> Example:
    torch.manual_seed(0)
    return _finish(ShuffleNetV2(), _image())


# --- Squeeze-excitation ----------------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    """Global average pool -> FC reduce -> ReLU -> FC expand -> sigmoid -> channel-wise scale."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c, c // reduction)
        self.fc2 = nn.Linear(c // reduction, c)

    def forward(self, x):
        b, c, _, _ = x.shape
        s = torch.flatten(self.pool(x), 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s)))).view(b, c, 1, 1)
        return x * s


class SEConvBlock(nn.Module):
    """conv-bn-relu, conv-bn, 1x1-conv SE gate (conv variant of the SE block), residual add."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c, act=None))
        self.se_reduce = nn.Conv2d(c, c // reduction, 1)
        self.se_expand = nn.Conv2d(c // reduction, c, 1)

    def forward(self, x):
        out = self.body(x)
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(out, 1)))))
        return F.relu(x + out * s)


class SENet(nn.Module):
    """Conv net mixing linear-FC SE blocks and 1x1-conv SE residual blocks."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16), SqueezeExcite(16), nn.MaxPool2d(2),
            conv_bn(16, 32), SqueezeExcite(32), SEConvBlock(32), nn.MaxPool2d(2),
            conv_bn(32, 64), SqueezeExcite(64), SEConvBlock(64),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def se_net() -> Example:
    torch.manual_seed(0)
    return _finish(SENet(), _image())


# --- Transformers ----------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """Pre-norm encoder block: LN -> nn.MultiheadAttention -> residual, LN -> MLP -> residual."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """Patch-embedding conv, cls token, learned positional embedding, encoder blocks, cls head."""

    def __init__(self, image: int = 32, patch: int = 8, d: int = 32, depth: int = 2, heads: int = 4,
                 mlp: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(d, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding
        x = self.ln(self.layers(x))
        return self.head(x[:, 0])


def vit() -> Example:
    torch.manual_seed(0)
    return _finish(ViT(), _image())


class Attention(nn.Module):
    """Hand-written multi-head self-attention (timm style): one qkv Linear, matmuls, softmax, proj."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TransformerBlock(nn.Module):
    """LN -> hand-written attention -> residual, LN -> MLP (Linear-GELU-Linear) -> residual."""

    def __init__(self, d: int = 32, heads: int = 4, mlp: int = 64):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def handwritten_attention() -> Example:
    torch.manual_seed(0)
    tokens = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    return _finish(TransformerBlock(), tokens)


# --- Sequence models -------------------------------------------------------------------------------

class Conv1dNet(nn.Module):
    """Conv1d-BN-ReLU stacks with max pooling, global average pool, linear head over (B, C, L)."""

    def __init__(self, cin: int = 4, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(cin, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.MaxPool1d(2),
            nn.Conv1d(32, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool1d(1),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def conv1d_net() -> Example:
    torch.manual_seed(0)
    return _finish(Conv1dNet(), torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1)))


class LSTMNet(nn.Module):
    """Linear input projection -> 2-layer batch-first LSTM -> Linear head on the last time step."""

    def __init__(self, features: int = 8, d: int = 16, hidden: int = 32, num_classes: int = 4):
        super().__init__()
        self.proj = nn.Linear(features, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        out, _ = self.lstm(torch.relu(self.proj(x)))
        return self.head(out[:, -1])


def lstm_net() -> Example:
    torch.manual_seed(0)
    return _finish(LSTMNet(), torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(1)))


# --- Tracing edge cases ----------------------------------------------------------------------------

class DataDependentGate(nn.Module):
    """Chooses a branch from the input's values: ``fx.symbolic_trace`` cannot trace this module."""

    def __init__(self, c: int):
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = nn.Sequential(nn.Conv2d(c, c, 1), nn.Tanh())

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


class ControlFlowNet(nn.Module):
    """Traceable conv net around one untraceable submodule (``gate``): exercises leaf fallback."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.gate = DataDependentGate(16)
        self.body = nn.Sequential(conv_bn(16, 32, stride=2), conv_bn(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.body(self.gate(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def control_flow() -> Example:
    torch.manual_seed(0)
    return _finish(ControlFlowNet(), _image())


class MultiInputNet(nn.Module):
    """Two tensor inputs, a keyword-only constant, and a dict output holding a nested tuple."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.image = nn.Sequential(conv_bn(3, 16, stride=2), conv_bn(16, 32, stride=2), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten())
        self.side = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.fuse = nn.Linear(64, 32)
        self.head = nn.Linear(32, num_classes)
        self.aux_head = nn.Linear(32, 2)

    def forward(self, x, y, *, scale: float = 0.5):
        a = self.image(x)
        b = self.side(y) * scale
        h = F.relu(self.fuse(torch.cat([a, b], dim=1)))
        return {"logits": self.head(h), "aux": (self.aux_head(a), a + b)}


def multi_input() -> Example:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return _finish(MultiInputNet(), torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 8, generator=g))


REFERENCE_MODELS: dict[str, Callable[[], Example]] = {
    "vgg_bn": vgg_bn,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "densenet": densenet,
    "shufflenet_v2": shufflenet_v2,
    "resnext": resnext,
    "se_net": se_net,
    "vit": vit,
    "handwritten_attention": handwritten_attention,
    "conv1d_net": conv1d_net,
    "lstm_net": lstm_net,
    "control_flow": control_flow,
    "multi_input": multi_input,
}


# --- Transformer-era vision models (hidden width under LayerNorm, heads) ---------------------------

class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv -> channels-last LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale -> residual."""

    def __init__(self, d: int):
        super().__init__()
        self.dwconv = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.pwconv1, self.pwconv2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem, stages of ConvNeXt blocks with LayerNorm + strided-conv downsampling, pooled head."""

    def __init__(self, dims: tuple[int, ...] = (16, 32), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 4, 4)
        self.stem_norm = nn.LayerNorm(dims[0])
        self.stages = nn.ModuleList(nn.Sequential(ConvNeXtBlock(d), ConvNeXtBlock(d)) for d in dims)
        self.down_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims[:-1])
        self.downs = nn.ModuleList(nn.Conv2d(a, b, 2, 2) for a, b in zip(dims, dims[1:]))
        self.norm, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.downs):
                x = self.downs[i](self.down_norms[i](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.head(self.norm(x.mean((2, 3))))


def convnext_style() -> Example:
    torch.manual_seed(0)
    return _finish(ConvNeXt(), _image())


class WindowBlock(nn.Module):
    """Swin/MaxViT-style block on (B, H, W, C): LN -> attention inside windows (``grid=False``) or across a
    strided grid (``grid=True``, MaxViT), optionally shifted (``torch.roll``, Swin) -> residual; LN -> MLP."""

    def __init__(self, d: int, heads: int, window: int, shift: int = 0, grid: bool = False):
        super().__init__()
        self.window, self.shift, self.grid = window, shift, grid
        self.norm1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        B, H, W, C = x.shape
        w = self.window
        y = torch.roll(self.norm1(x), (-self.shift, -self.shift), (1, 2)) if self.shift else self.norm1(x)
        if self.grid:  # token (i, j) of window (a, b) sits at (i * H/w + a, j * W/w + b)
            y = y.view(B, w, H // w, w, W // w, C).permute(0, 2, 4, 1, 3, 5).reshape(-1, w * w, C)
            y = self.attn(y).view(B, H // w, W // w, w, w, C).permute(0, 3, 1, 4, 2, 5).reshape(B, H, W, C)
        else:
            y = y.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
            y = self.attn(y).view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class WindowTransformer(nn.Module):
    """Patch embedding + LN, window blocks (Swin: plain then shifted; MaxViT: an MBConv, block then grid
    attention), final LN, pooled head."""

    def __init__(self, maxvit: bool = False, d: int = 32, heads: int = 4, window: int = 4, num_classes: int = 10):
        super().__init__()
        self.embed, self.embed_norm = nn.Conv2d(3, d, 4, 4), nn.LayerNorm(d)
        self.mbconv = nn.Sequential(conv_bn(d, 2 * d, 1), conv_bn(2 * d, 2 * d, 3, groups=2 * d),
                                    conv_bn(2 * d, d, 1, act=None)) if maxvit else None
        second = dict(grid=True) if maxvit else dict(shift=window // 2)
        self.blocks = nn.Sequential(WindowBlock(d, heads, window), WindowBlock(d, heads, window, **second))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.embed(x)
        if self.mbconv is not None:
            x = x + self.mbconv(x)
        x = self.blocks(self.embed_norm(x.permute(0, 2, 3, 1)))
        return self.head(self.norm(x.mean((1, 2))))


def swin_style() -> Example:
    torch.manual_seed(0)
    return _finish(WindowTransformer(), _image())


def maxvit_style() -> Example:
    torch.manual_seed(0)
    return _finish(WindowTransformer(maxvit=True), _image())


class TokenViT(nn.Module):
    """ViT with hand-written attention (timm style): patch conv, cls token, positional embedding, blocks."""

    def __init__(self, image: int = 32, patch: int = 8, d: int = 32, depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(d, 4, 2 * d) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_style() -> Example:
    torch.manual_seed(0)
    return _finish(TokenViT(), _image())


#: Transformer-era vision architectures whose hidden width sits under LayerNorm (prunable with
#: ``Graph.norm_width``) and whose attention is hand-written (heads prunable).
VISION_TRANSFORMER_MODELS: dict[str, Callable[[], Example]] = {
    "vit_style": vit_style,
    "swin_style": swin_style,
    "convnext_style": convnext_style,
    "maxvit_style": maxvit_style,
}
