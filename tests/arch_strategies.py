"""Hypothesis strategies: random small CNN / token architectures, and random pruning plans.

An architecture is drawn as a *spec* (frozen dataclasses, pure data) and then built deterministically
from it, so that examples shrink well and every failure has a one-line reproducer::

    from tests.arch_strategies import *      # the spec classes and build()
    model, inputs = build(CNNSpec(seed=0, batch=1, cin=3, h=6, w=6, blocks=(Conv(cout=4),), head=Head()))

``arch_specs()`` draws specs, ``architectures()`` draws built ``(model in eval mode, example_inputs)``
pairs, ``plans(groups)`` draws a pruning plan ``{group id: sorted kept unit indices}`` for the
prunable groups of ``compressc.channel_groups``.

CNN blocks (``CNNSpec.blocks``, applied in order; ``Skip`` reaches back to any earlier output, which
makes the network a DAG):

- ``Conv``: conv (kernel 1/3, stride 1/2, dilation 1/2, same or valid padding, zeros/reflect/circular
  padding, dense / depthwise / grouped, bias or not) -> BN / GroupNorm / InstanceNorm(affine) / none
  -> activation (ReLU, in-place ReLU, GELU, SiLU, Hardswish, per-channel PReLU, one-slope PReLU,
  functional relu/gelu) -> optional dropout
- ``Residual``: body of convs combined with an identity or 1x1-projection shortcut by ``+``, ``-``, ``*``
- ``Concat``: two branches (identity or a conv) concatenated on dim 1
- ``Split``: ``chunk`` / ``torch.split`` / slicing into two parts, each processed, re-concatenated
- ``SE``: squeeze-excitation (pool -> flatten -> linear -> relu -> linear -> sigmoid -> view -> mul)
- ``Shuffle``: channel shuffle (view / transpose / view)
- ``Pool``, ``Act`` (activation + optional dropout), ``Skip`` (add or concat an earlier output)

then a ``Head``: global pool / mean / raw ``C*H*W`` flatten (several spellings) -> [hidden linear ->
act] -> logits, optionally with a second (auxiliary) output taken from an intermediate block.

``literal_shapes=True`` makes the SE view, the channel shuffle and the raw flatten use hard-coded
channel counts (``x.view(-1, 16, 1, 1)``, as much real code does) instead of sizes read from the
tensor: a pruner must then either rewrite those constants or leave the channels alone.

Token variant (``TokenSpec``): patch conv -> ``flatten(2).transpose(1, 2)`` -> ``MLP`` and
hand-written multi-head ``Attn`` blocks, each with a residual and an optional LayerNorm -> optional
final LayerNorm -> mean over tokens -> linear head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Conv", "Residual", "Concat", "Split", "SE", "Shuffle", "Pool", "Act", "Skip", "Head", "CNNSpec",
    "MLP", "Attn", "TokenSpec", "Spec",
    "arch_specs", "cnn_specs", "token_specs", "architectures", "build", "plans", "draw_plan",
]

MAX_C = 16  # channels a conv may produce
MAX_CAT_C = 32  # channels a concatenation may produce
ACTS = ("relu", "none", "relu_", "gelu", "silu", "hardswish", "prelu", "prelu1", "f_relu", "f_gelu")
TOKEN_ACTS = ("gelu", "relu", "silu", "hardswish", "prelu1", "f_gelu")  # per-channel PReLU acts on dim 1


# --- specs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conv:
    cout: int
    k: int = 1
    stride: int = 1
    dilation: int = 1
    valid: bool = False  # no padding (else "same": dilation * (k - 1) // 2)
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"
    norm: str = "bn"  # bn | gn | in | none
    norm_groups: int = 1  # GroupNorm's num_groups
    act: str = "relu"
    dropout: bool = False


@dataclass(frozen=True)
class Residual:
    body: tuple[Conv, ...]
    op: str = "add"  # add | sub | mul
    project: bool = False  # 1x1 conv (+ BN) shortcut; forced when channels or stride change
    act: str = "none"


@dataclass(frozen=True)
class Concat:
    left: tuple[Conv, ...]  # () is the identity branch
    right: tuple[Conv, ...]


@dataclass(frozen=True)
class Split:
    how: str  # chunk | split | slice
    at: int  # channels in the first part
    left: tuple[Conv, ...] = ()
    right: tuple[Conv, ...] = ()
    swap: bool = False  # concatenate (right, left)


@dataclass(frozen=True)
class SE:
    reduced: int


@dataclass(frozen=True)
class Shuffle:
    groups: int


@dataclass(frozen=True)
class Pool:
    kind: str = "max"  # max | avg
    k: int = 2
    stride: int = 2
    padding: int = 0


@dataclass(frozen=True)
class Act:
    act: str
    dropout: bool = False


@dataclass(frozen=True)
class Skip:
    src: int  # index into [network input, block 0 output, block 1 output, ...]
    op: str = "add"  # add | cat
    project: bool = False  # 1x1 conv on the earlier output (forced for add when channels differ)


@dataclass(frozen=True)
class Head:
    pool: str = "gap"  # gap | mean | flatten | view | nn_flatten | literal
    hidden: int = 0  # 0: no hidden linear
    act: str = "relu"
    classes: int = 2
    aux: Union[int, None] = None  # second output: mean over H, W of this block's output (1-based)


@dataclass(frozen=True)
class CNNSpec:
    seed: int
    batch: int
    cin: int
    h: int
    w: int
    blocks: tuple
    head: Head
    literal_shapes: bool = False


@dataclass(frozen=True)
class MLP:
    hidden: int
    act: str = "gelu"
    norm: bool = False
    dropout: bool = False


@dataclass(frozen=True)
class Attn:
    heads: int
    norm: bool = False
    qkv_bias: bool = True


@dataclass(frozen=True)
class TokenSpec:
    seed: int
    batch: int
    cin: int
    patch: int
    grid: int  # tokens per side
    dim: int
    blocks: tuple
    classes: int = 2
    final_norm: bool = False


Spec = Union[CNNSpec, TokenSpec]


# --- building --------------------------------------------------------------------------------------

class FnAct(nn.Module):
    """A functional activation (traced through: a call_function node, not a module)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        return torch.relu(x) if self.name == "f_relu" else F.gelu(x)


def make_act(name: str, c: int) -> list[nn.Module]:
    table = {
        "relu": lambda: nn.ReLU(), "relu_": lambda: nn.ReLU(inplace=True), "gelu": lambda: nn.GELU(),
        "silu": lambda: nn.SiLU(), "hardswish": lambda: nn.Hardswish(), "prelu": lambda: nn.PReLU(c),
        "prelu1": lambda: nn.PReLU(), "f_relu": lambda: FnAct("f_relu"), "f_gelu": lambda: FnAct("f_gelu"),
    }
    return [] if name == "none" else [table[name]()]


def conv_unit(spec: Conv, cin: int) -> nn.Sequential:
    pad = 0 if spec.valid else spec.dilation * (spec.k - 1) // 2
    layers: list[nn.Module] = [
        nn.Conv2d(cin, spec.cout, spec.k, spec.stride, pad, spec.dilation, spec.groups, spec.bias, spec.padding_mode)
    ]
    if spec.norm == "bn":
        layers.append(nn.BatchNorm2d(spec.cout))
    elif spec.norm == "gn":
        layers.append(nn.GroupNorm(spec.norm_groups, spec.cout))
    elif spec.norm == "in":
        layers.append(nn.InstanceNorm2d(spec.cout, affine=True))
    layers += make_act(spec.act, spec.cout)
    if spec.dropout:
        layers.append(nn.Dropout(0.3))
    return nn.Sequential(*layers)


def conv_chain(specs: tuple[Conv, ...], cin: int) -> tuple[nn.Sequential, int]:
    units = []
    for s in specs:
        units.append(conv_unit(s, cin))
        cin = s.cout
    return nn.Sequential(*units), cin


class ResidualBlock(nn.Module):
    def __init__(self, spec: Residual, cin: int):
        super().__init__()
        self.op = spec.op
        self.body, cout = conv_chain(spec.body, cin)
        stride = spec.body[0].stride
        self.shortcut = None
        if spec.project or cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.Sequential(*make_act(spec.act, cout))

    def forward(self, x):
        y = self.body(x)
        s = x if self.shortcut is None else self.shortcut(x)
        if self.op == "add":
            out = y + s
        elif self.op == "sub":
            out = s - y
        else:
            out = y * s
        return self.act(out)


class ConcatBlock(nn.Module):
    def __init__(self, spec: Concat, cin: int):
        super().__init__()
        self.left, _ = conv_chain(spec.left, cin)
        self.right, _ = conv_chain(spec.right, cin)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 1)


class SplitBlock(nn.Module):
    def __init__(self, spec: Split, cin: int):
        super().__init__()
        self.how, self.at, self.rest, self.swap = spec.how, spec.at, cin - spec.at, spec.swap
        self.left, _ = conv_chain(spec.left, spec.at)
        self.right, _ = conv_chain(spec.right, cin - spec.at)

    def forward(self, x):
        if self.how == "chunk":
            a, b = x.chunk(2, 1)
        elif self.how == "split":
            a, b = torch.split(x, [self.at, self.rest], 1)
        else:
            a, b = x[:, : self.at], x[:, self.at :]
        a, b = self.left(a), self.right(b)
        return torch.cat((b, a) if self.swap else (a, b), dim=1)


class SEBlock(nn.Module):
    def __init__(self, spec: SE, c: int, literal: bool):
        super().__init__()
        self.c, self.literal = c, literal
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c, spec.reduced)
        self.fc2 = nn.Linear(spec.reduced, c)

    def forward(self, x):
        s = torch.flatten(self.pool(x), 1)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        if self.literal:
            return x * s.view(-1, self.c, 1, 1)
        b, c, _, _ = x.shape
        return x * s.view(b, c, 1, 1)


class ShuffleBlock(nn.Module):
    def __init__(self, spec: Shuffle, c: int, h: int, w: int, literal: bool):
        super().__init__()
        self.g, self.chw, self.literal = spec.groups, (c, h, w), literal

    def forward(self, x):
        if self.literal:
            c, h, w = self.chw
            x = x.view(-1, self.g, c // self.g, h, w).transpose(1, 2).contiguous()
            return x.view(-1, c, h, w)
        b, c, h, w = x.size()
        x = torch.transpose(x.view(b, self.g, c // self.g, h, w), 1, 2).contiguous()
        return x.view(b, c, h, w)


class ActBlock(nn.Sequential):
    def __init__(self, spec: Act, c: int):
        super().__init__(*make_act(spec.act, c), *([nn.Dropout(0.2)] if spec.dropout else []))


class SkipBlock(nn.Module):
    def __init__(self, spec: Skip, c_src: int, c: int):
        super().__init__()
        self.op = spec.op
        self.proj = None
        if spec.project or (spec.op == "add" and c_src != c):
            self.proj = nn.Conv2d(c_src, c if spec.op == "add" else c_src, 1, bias=False)

    def forward(self, x, other):
        if self.proj is not None:
            other = self.proj(other)
        return x + other if self.op == "add" else torch.cat([x, other], 1)


class HeadBlock(nn.Module):
    def __init__(self, spec: Head, c: int, h: int, w: int):
        super().__init__()
        self.pool_kind, self.features = spec.pool, c * h * w
        feats = c if spec.pool in ("gap", "mean") else c * h * w
        if spec.pool == "gap":
            self.pool = nn.AdaptiveAvgPool2d(1)
        if spec.pool == "nn_flatten":
            self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        if spec.hidden:
            layers += [nn.Linear(feats, spec.hidden), *make_act(spec.act, spec.hidden)]
            feats = spec.hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(feats, spec.classes))

    def forward(self, x):
        if self.pool_kind == "gap":
            x = torch.flatten(self.pool(x), 1)
        elif self.pool_kind == "mean":
            x = x.mean((2, 3))
        elif self.pool_kind == "flatten":
            x = torch.flatten(x, 1)
        elif self.pool_kind == "view":
            x = x.view(x.size(0), -1)
        elif self.pool_kind == "nn_flatten":
            x = self.flatten(x)
        else:
            x = x.reshape(-1, self.features)
        return self.mlp(x)


class RandomCNN(nn.Module):
    """A network built from a ``CNNSpec``; ``extra_repr`` shows the spec (a reproducer)."""

    def __init__(self, spec: CNNSpec):
        super().__init__()
        self.spec = spec
        shapes = [(spec.cin, spec.h, spec.w)]
        blocks = []
        for b in spec.blocks:
            c, h, w = shapes[-1]
            if isinstance(b, Conv):
                blocks.append(conv_unit(b, c))
            elif isinstance(b, Residual):
                blocks.append(ResidualBlock(b, c))
            elif isinstance(b, Concat):
                blocks.append(ConcatBlock(b, c))
            elif isinstance(b, Split):
                blocks.append(SplitBlock(b, c))
            elif isinstance(b, SE):
                blocks.append(SEBlock(b, c, spec.literal_shapes))
            elif isinstance(b, Shuffle):
                blocks.append(ShuffleBlock(b, c, h, w, spec.literal_shapes))
            elif isinstance(b, Pool):
                cls = nn.MaxPool2d if b.kind == "max" else nn.AvgPool2d
                blocks.append(cls(b.k, b.stride, b.padding))
            elif isinstance(b, Act):
                blocks.append(ActBlock(b, c))
            elif isinstance(b, Skip):
                blocks.append(SkipBlock(b, shapes[b.src][0], c))
            else:
                raise TypeError(f"unknown block spec {b!r}")
            shapes.append(_cnn_out_shape(b, (c, h, w), shapes))
        self.blocks = nn.ModuleList(blocks)
        self.head = HeadBlock(spec.head, *shapes[-1])

    def extra_repr(self) -> str:
        return repr(self.spec)

    def forward(self, x):
        feats = [x]
        for b, block in zip(self.spec.blocks, self.blocks):
            x = block(x, feats[b.src]) if isinstance(b, Skip) else block(x)
            feats.append(x)
        logits = self.head(x)
        if self.spec.head.aux is None:
            return logits
        return logits, feats[self.spec.head.aux].mean((2, 3))


class MLPBlock(nn.Module):
    def __init__(self, spec: MLP, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d) if spec.norm else None
        self.fc1 = nn.Linear(d, spec.hidden)
        self.act = nn.Sequential(*make_act(spec.act, spec.hidden), *([nn.Dropout(0.1)] if spec.dropout else []))
        self.fc2 = nn.Linear(spec.hidden, d)

    def forward(self, x):
        y = x if self.norm is None else self.norm(x)
        return x + self.fc2(self.act(self.fc1(y)))


class AttnBlock(nn.Module):
    """Hand-written multi-head self-attention (timm style) with a residual."""

    def __init__(self, spec: Attn, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d) if spec.norm else None
        self.heads, self.head_dim = spec.heads, d // spec.heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(d, 3 * d, bias=spec.qkv_bias)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        y = x if self.norm is None else self.norm(x)
        B, N, C = y.shape
        qkv = self.qkv(y).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return x + self.proj(y)


class TokenNet(nn.Module):
    def __init__(self, spec: TokenSpec):
        super().__init__()
        self.spec = spec
        d = spec.dim
        self.patch = nn.Conv2d(spec.cin, d, spec.patch, spec.patch)
        self.blocks = nn.ModuleList(MLPBlock(b, d) if isinstance(b, MLP) else AttnBlock(b, d) for b in spec.blocks)
        self.norm = nn.LayerNorm(d) if spec.final_norm else None
        self.head = nn.Linear(d, spec.classes)

    def extra_repr(self) -> str:
        return repr(self.spec)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x.mean(1))


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial norm statistics and affine parameters (a fresh BN is the identity), moderate scale."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)


def build(spec: Spec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model (eval mode, deterministic in ``spec.seed``) and its example inputs."""
    torch.manual_seed(spec.seed)
    if isinstance(spec, CNNSpec):
        model: nn.Module = RandomCNN(spec)
        h, w = spec.h, spec.w
    else:
        model = TokenNet(spec)
        h = w = spec.patch * spec.grid
    _randomize(model, spec.seed)
    x = torch.randn(spec.batch, spec.cin, h, w, generator=torch.Generator().manual_seed(spec.seed + 1))
    return model.eval(), (x,)


# --- shape arithmetic (mirrors the modules above) ------------------------------------------------

def _conv_hw(s: Conv, h: int, w: int) -> tuple[int, int]:
    pad = 0 if s.valid else s.dilation * (s.k - 1) // 2
    span = s.dilation * (s.k - 1) + 1
    return (h + 2 * pad - span) // s.stride + 1, (w + 2 * pad - span) // s.stride + 1


def _chain_shape(specs: tuple[Conv, ...], c: int, h: int, w: int) -> tuple[int, int, int]:
    for s in specs:
        c, (h, w) = s.cout, _conv_hw(s, h, w)
    return c, h, w


def _cnn_out_shape(b, chw: tuple[int, int, int], shapes: list) -> tuple[int, int, int]:
    c, h, w = chw
    if isinstance(b, Conv):
        return _chain_shape((b,), c, h, w)
    if isinstance(b, Residual):
        return _chain_shape(b.body, c, h, w)
    if isinstance(b, Concat):
        return _chain_shape(b.left, c, h, w)[0] + _chain_shape(b.right, c, h, w)[0], h, w
    if isinstance(b, Split):
        return _chain_shape(b.left, b.at, h, w)[0] + _chain_shape(b.right, c - b.at, h, w)[0], h, w
    if isinstance(b, Pool):
        return c, (h + 2 * b.padding - b.k) // b.stride + 1, (w + 2 * b.padding - b.k) // b.stride + 1
    if isinstance(b, Skip):
        return (c if b.op == "add" else c + shapes[b.src][0]), h, w
    return c, h, w  # SE, Shuffle, Act


# --- drawing ---------------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _conv(draw, cin: int, h: int, w: int, *, cout: int | None = None, stride_ok: bool = True,
          valid_ok: bool = False, max_cout: int = MAX_C) -> Conv:
    k = draw(st.sampled_from([1, 3]))
    dilation = draw(st.sampled_from([1, 2])) if k == 3 and min(h, w) >= 3 else 1
    span = dilation * (k - 1) + 1
    valid = k > 1 and valid_ok and min(h, w) >= span + 1 and draw(st.booleans())
    stride = draw(st.sampled_from([1, 2])) if stride_ok and min(h, w) >= 4 else 1
    pad = 0 if valid else dilation * (k - 1) // 2
    style = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    groups = 1
    if cout is None:
        if style == "depthwise" and cin * 2 <= max_cout:
            groups, cout = cin, cin * draw(st.sampled_from([1, 2]))
        elif style == "grouped" and [d for d in _divisors(cin)[1:-1] if d <= max_cout]:
            groups = draw(st.sampled_from([d for d in _divisors(cin)[1:-1] if d <= max_cout]))
            cout = groups * draw(st.integers(1, max(1, max_cout // groups)))
        else:  # one dense conv in eight is a 1-channel bottleneck (size-1 channel dims are an edge case)
            cout = 1 if draw(st.integers(0, 7)) == 7 else draw(st.integers(2, max_cout))
    elif style != "dense":
        common = [d for d in _divisors(cin) if cout % d == 0 and d > 1]
        groups = draw(st.sampled_from(common)) if common else 1
    ho, wo = (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1
    padding_mode = "zeros"
    if 0 < pad < min(h, w):
        padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    # GroupNorm / InstanceNorm refuse to normalise a single value per (sample, group)
    gn_groups = [g for g in _divisors(cout) if cout // g * ho * wo > 1]
    norms = ["bn", "none"] + (["gn"] if gn_groups else []) + (["in"] if ho * wo > 1 else [])
    norm = draw(st.sampled_from(norms))
    norm_groups = draw(st.sampled_from(gn_groups)) if norm == "gn" else 1
    return Conv(
        cout=cout, k=k, stride=stride, dilation=dilation, valid=valid, groups=groups, bias=draw(st.booleans()),
        padding_mode=padding_mode, norm=norm, norm_groups=norm_groups, act=draw(st.sampled_from(ACTS)),
        dropout=draw(st.booleans()),
    )


@st.composite
def _branch(draw, cin: int, h: int, w: int, *, max_cout: int = MAX_C, identity_ok: bool = True):
    if identity_ok and draw(st.booleans()):
        return ()
    return (draw(_conv(cin, h, w, stride_ok=False, max_cout=max_cout)),)


@st.composite
def _block(draw, shapes: list[tuple[int, int, int]], literal: bool):
    c, h, w = shapes[-1]
    kinds = ["conv", "residual", "concat", "se", "act", "pool", "skip", "split", "shuffle"]
    if c < 2:
        kinds = [k for k in kinds if k not in ("split", "se")]
    if min(h, w) < 2:
        kinds.remove("pool")
    if c + 2 > MAX_CAT_C:
        kinds.remove("concat")
    sources = [i for i, (_, hs, ws) in enumerate(shapes[:-1]) if (hs, ws) == (h, w)]
    if not sources:
        kinds.remove("skip")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return draw(_conv(c, h, w, valid_ok=True))
    if kind == "residual":
        first = draw(_conv(c, h, w))
        body = (first,)
        if draw(st.booleans()):
            h1, w1 = _conv_hw(first, h, w)
            body += (draw(_conv(first.cout, h1, w1, stride_ok=False)),)
        return Residual(body, op=draw(st.sampled_from(["add", "sub", "mul"])), project=draw(st.booleans()),
                        act=draw(st.sampled_from(["none", "relu", "silu"])))
    if kind == "concat":
        left = draw(_branch(c, h, w, max_cout=min(MAX_C, MAX_CAT_C - 2)))
        cl = left[0].cout if left else c
        right = draw(_branch(c, h, w, max_cout=min(MAX_C, MAX_CAT_C - cl), identity_ok=False))
        return Concat(left, right)
    if kind == "split":
        how = draw(st.sampled_from(["chunk", "split", "slice"]))
        at = (c + 1) // 2 if how == "chunk" else draw(st.integers(1, c - 1))
        left = draw(_branch(at, h, w))
        right = draw(_branch(c - at, h, w))
        return Split(how, at, left, right, swap=draw(st.booleans()))
    if kind == "se":
        return SE(draw(st.integers(1, c)))
    if kind == "shuffle":
        return Shuffle(draw(st.sampled_from(_divisors(c)[1:] + [1])))  # groups=1: a no-op, size-1 dims
    if kind == "act":
        # not the in-place ReLU: the block's input may be the network input or an output kept for a Skip
        return Act(draw(st.sampled_from([a for a in ACTS if a not in ("none", "relu_")])), dropout=draw(st.booleans()))
    if kind == "pool":
        options = [(2, 2, 0), (3, 1, 1)] + ([(3, 2, 1)] if min(h, w) >= 3 else [])
        k, stride, pad = draw(st.sampled_from(options))
        return Pool(draw(st.sampled_from(["max", "avg"])), k, stride, pad)
    src = draw(st.sampled_from(sources))
    op = draw(st.sampled_from(["add", "cat"])) if c + shapes[src][0] <= MAX_CAT_C else "add"
    return Skip(src, op, project=draw(st.booleans()))


@st.composite
def cnn_specs(draw, max_blocks: int = 7) -> CNNSpec:
    literal = draw(st.sampled_from([False, False, False, True]))
    cin = draw(st.integers(1, 4))
    h, w = draw(st.integers(4, 12)), draw(st.integers(4, 12))
    shapes = [(cin, h, w)]
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        b = draw(_block(shapes, literal))
        blocks.append(b)
        shapes.append(_cnn_out_shape(b, shapes[-1], shapes))
    pools = ["gap", "mean", "flatten", "view", "nn_flatten"] + (["literal"] if literal else [])
    head = Head(
        pool=draw(st.sampled_from(pools)),
        hidden=draw(st.sampled_from([0, 0, *range(2, 17)])),
        act=draw(st.sampled_from(ACTS)),
        classes=draw(st.integers(2, 5)),
        aux=draw(st.none() | st.integers(1, len(blocks))),
    )
    return CNNSpec(seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(1, 2)), cin=cin, h=h, w=w,
                   blocks=tuple(blocks), head=head, literal_shapes=literal)


@st.composite
def token_specs(draw, max_blocks: int = 4) -> TokenSpec:
    dim = draw(st.integers(2, 16))
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        if draw(st.booleans()):
            blocks.append(MLP(draw(st.integers(2, 16)), draw(st.sampled_from(TOKEN_ACTS)), draw(st.booleans()),
                              draw(st.booleans())))
        else:
            heads = draw(st.sampled_from([d for d in _divisors(dim) if d <= 4]))
            blocks.append(Attn(heads, draw(st.booleans()), draw(st.booleans())))
    return TokenSpec(
        seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(1, 2)), cin=draw(st.integers(1, 3)),
        patch=draw(st.integers(1, 4)), grid=draw(st.integers(1, 3)), dim=dim, blocks=tuple(blocks),
        classes=draw(st.integers(2, 5)), final_norm=draw(st.booleans()),
    )


def arch_specs() -> st.SearchStrategy[Spec]:
    """CNN specs (three in four) and token specs."""
    return st.one_of(cnn_specs(), cnn_specs(), cnn_specs(), token_specs())


def architectures() -> st.SearchStrategy[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """Built ``(model in eval mode, example_inputs)``; the model's repr starts with its spec."""
    return arch_specs().map(build)


# --- plans -----------------------------------------------------------------------------------------

def draw_plan(draw, groups, min_keep: int = 1) -> dict[int, list[int]]:
    """Per prunable group: skip it, keep all its units, or keep a random non-empty proper subset.

    A subset also keeps at least one unit of each of the group's ``segments`` (unit sets that are all
    the channels of one tensor: a split part, or a producer covering part of the group), the one
    constraint on plans besides non-emptiness. Three groups in five get a subset, so that most plans
    prune something even where a model has a single prunable group; shrinks towards keeping ``[0]``.
    """
    plan: dict[int, list[int]] = {}
    for group in groups:
        if not group.prunable:
            continue
        choice = draw(st.sampled_from(["subset", "subset", "subset", "skip", "all"]))
        if choice == "all":
            plan[group.id] = list(range(group.size))
        elif choice == "subset":
            least = min(min_keep, group.size)
            most = max(least, group.size - 1)  # a proper subset where there is one ("all" covers the rest)
            keep = set(draw(st.lists(st.integers(0, group.size - 1), min_size=least, max_size=most, unique=True)))
            for segment in getattr(group, "segments", ()):
                units = sorted(int(u) for u in segment)
                if not keep.intersection(units):
                    keep.add(draw(st.sampled_from(units)))
            plan[group.id] = sorted(keep)
    return plan


def plans(groups, min_keep: int = 1) -> st.SearchStrategy[dict[int, list[int]]]:
    """Plans for ``groups`` (the list ``compressc.channel_groups`` returns), keeping at least
    ``min_keep`` units of every group they prune (where the group has that many)."""
    groups = list(groups)
    return st.composite(lambda draw: draw_plan(draw, groups, min_keep))()
