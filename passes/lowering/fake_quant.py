"""Fake quantization for quantization-aware fine-tuning (QAT).

``FakeQuantize`` is a parametrization: it maps a float weight to ``dequantize(quantize(weight))``
on every access, with the very same math as ``quantize`` (so after training,
``dequantize(quantize(w, spec))`` equals, bit for bit, the weight the forward pass used). Its
gradient is a straight-through estimator: identity for weights inside the quantizer's
representable range (within half a step of it) and zero for clipped weights and masked-out weights.

``fake_quantize_module`` attaches one per named parameter to a deep copy of any module (an fx
GraphModule included) with ``torch.nn.utils.parametrize``; ``strip_fake_quant`` bakes the quantized
values back into plain parameters; ``export_quantized`` gives the ``QuantizedTensor`` of each one.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> qat = fake_quantize_module(net, {"0.weight": QuantSpec(bits=4), "2.weight": QuantSpec(bits=2)})
>>> loss = qat(torch.randn(5, 4)).square().sum()
>>> loss.backward()                                          # gradients reach the float weights
>>> qat[0].parametrizations.weight.original.grad is not None
True
>>> baked = strip_fake_quant(qat)
>>> torch.equal(baked[0].weight, dequantize(quantize(qat[0].parametrizations.weight.original, QuantSpec(bits=4))))
True
"""

from __future__ import annotations

import copy
import difflib

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from compressc.passes.lowering.quantize import (
    Fitted,
    QuantizationError,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    encode_rows,
    fit,
    float_values,
    from_rows,
    prepare_rows,
    quantize,
)

__all__ = ["FakeQuantize", "FoldedFakeQuantize", "fake_quantize_module", "strip_fake_quant", "export_quantized"]


class FakeQuantize(nn.Module):
    """Parametrization ``weight -> dequantize(quantize(weight, spec, mask=mask))`` with an STE gradient.

    Parameters
    ----------
    spec : the quantizer (any ``QuantSpec``; at 32 bits this is the identity, masked).
    mask : optional bool tensor of the weight's shape (True = kept); a buffer of this module.
    freeze_scales : fit the quantizer (scales, zero points or codebook) once, on the first weight it
        sees, and reuse it; by default it is refitted to the current weight at every call.
    name : the parameter's name, for error messages.

    >>> import torch
    >>> w = torch.randn(6, 5, requires_grad=True)
    >>> fq = FakeQuantize(QuantSpec(bits=3))
    >>> torch.equal(fq(w), dequantize(quantize(w, QuantSpec(bits=3))))
    True
    >>> fq(w).sum().backward()
    >>> sorted(set(w.grad.flatten().tolist())) in ([1.0], [0.0, 1.0])   # 1 inside the range, 0 if clipped
    True
    """

    def __init__(
        self, spec: QuantSpec, mask: torch.Tensor | None = None, *, freeze_scales: bool = False, name: str = "weight"
    ) -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.freeze_scales = freeze_scales
        self.register_buffer("mask", None if mask is None else mask.detach().to(torch.bool).clone())
        self._frozen: Fitted | None = None

    def reset_scales(self) -> None:
        """Forget frozen scales: the next call fits the quantizer again."""
        self._frozen = None

    def _fit_for(self, weight: torch.Tensor):
        rows, cd = prepare_rows(weight, self.spec, self.name, self.mask)
        if self.freeze_scales and self._frozen is not None:
            return rows, cd, self._frozen
        f = fit(rows, self.spec, self.name)
        if self.freeze_scales:
            self._frozen = f
        return rows, cd, f

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(weight, dtype=torch.bool) if self.mask is None else self.mask
        if self.spec.is_float:
            value = float_values(weight, self.spec, self.name, self.mask)
            return value.to(weight.dtype) + (weight - weight.detach()) * keep
        rows, cd, f = self._fit_for(weight)
        codes, inside = f.encode(rows.full())
        value = from_rows(f.decode(codes), tuple(weight.shape), cd).to(weight.dtype)
        grad_mask = keep & from_rows(inside, tuple(weight.shape), cd)
        # value + 0: the forward value is exactly the dequantized weight; d(out)/d(weight) = grad_mask.
        return value + (weight - weight.detach()) * grad_mask

    def quantized(self, weight: torch.Tensor) -> QuantizedTensor:
        """The ``QuantizedTensor`` whose dequantization is what ``forward(weight)`` returns."""
        if self.spec.is_float:
            return quantize(weight, self.spec, self.name, self.mask)
        rows, cd, f = self._fit_for(weight)
        return f.pack(encode_rows(f, rows), tuple(weight.shape), cd, self.spec)

    def extra_repr(self) -> str:
        return f"{self.spec}, masked={self.mask is not None}, freeze_scales={self.freeze_scales}"


class FoldedFakeQuantize(FakeQuantize):
    """``FakeQuantize`` of a weight as it will be stored once the BatchNorm after its layer is folded.

    Folding multiplies output channel ``c`` by ``f[c] = gamma[c] / sqrt(running_var[c] + eps)``, so the
    file stores ``quantize(w * f)``. This parametrization returns ``fake_quant(w * f) / f`` (``f`` read
    from the live BatchNorm at every call, without gradient): the layer followed by its BatchNorm in eval
    mode then computes exactly what the folded, quantized layer computes, while the BatchNorm keeps
    training (quantization-aware training with BatchNorm live, folding simulated). A channel with
    ``f == 0`` is passed through unquantized: folding zeroes it whatever its weights.

    >>> import torch, torch.nn as nn
    >>> bn = nn.BatchNorm1d(3).eval(); _ = bn.running_var.fill_(4.0)
    >>> w = torch.randn(3, 5)
    >>> fq = FoldedFakeQuantize(QuantSpec(bits=4), bn)
    >>> f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[:, None]
    >>> torch.allclose(fq(w) * f, dequantize(quantize(w * f, QuantSpec(bits=4))))
    True
    """

    def __init__(self, spec: QuantSpec, batchnorm: nn.Module, mask: torch.Tensor | None = None, *,
                 name: str = "weight") -> None:
        super().__init__(spec, mask, name=name)
        object.__setattr__(self, "batchnorm", batchnorm)  # a reference, not a submodule (no second copy)

    def _factor(self, weight: torch.Tensor) -> torch.Tensor:
        bn = self.batchnorm
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            f = (bn.weight if bn.affine else torch.ones_like(std)) / std
            f = torch.where(f == 0, torch.ones_like(f), f)
        return f.to(weight.dtype).reshape((-1,) + (1,) * (weight.dim() - 1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        f = self._factor(weight)
        return super().forward(weight * f) / f

    def quantized(self, weight: torch.Tensor) -> QuantizedTensor:
        """The ``QuantizedTensor`` of the folded weight ``w * f``."""
        return super().quantized(weight * self._factor(weight))


def _copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy``, except that parametrized submodules get a class of their own.

    parametrize injects one class per parametrized module and keeps the properties on it; a deep
    copy shares that class with the original, so adding or removing a parametrization on the copy
    would change the original too.
    """
    out = copy.deepcopy(module)
    for m in out.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, body)
    return out


def _owner(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    path, _, leaf = qualified.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def fake_quantize_module(
    module: nn.Module,
    specs: dict[str, QuantSpec],
    *,
    masks: dict[str, torch.Tensor] | None = None,
    freeze_scales: bool = False,
    folded: dict[str, str] | None = None,
) -> nn.Module:
    """A deep copy of ``module`` whose parameters named in ``specs`` are fake-quantized.

    Parameters
    ----------
    module : any ``nn.Module`` (left untouched).
    specs : qualified parameter name (``"layer1.0.conv1.weight"``) -> its ``QuantSpec``.
    masks : optional qualified name -> bool keep-mask (sparsity): masked-out weights are exact zeros
        in the forward pass and get no gradient.
    freeze_scales : passed to every ``FakeQuantize``; parametrize evaluates each one once when it is
        registered, so frozen scales are those of the weights as they are now.
    folded : optional qualified weight name -> path of the BatchNorm that will be folded into its layer:
        those weights get a ``FoldedFakeQuantize`` bound to the copy's BatchNorm (see
        ``fold_batchnorm.foldable_batchnorms``).

    Raises
    ------
    QuantizationError
        an unknown or tied (shared) parameter name, a parameter already fake-quantized, a mask
        without a spec, or a weight ``quantize`` refuses (NaN/Inf).

    >>> import torch.nn as nn
    >>> qat = fake_quantize_module(nn.Conv2d(3, 8, 3), {"weight": QuantSpec(bits=4)})
    >>> type(qat.parametrizations.weight[0]).__name__
    'FakeQuantize'
    """
    masks = masks or {}
    extra = sorted(set(masks) - set(specs))
    if extra:
        raise QuantizationError(
            f"masks given for parameters without a QuantSpec: {', '.join(extra)}",
            hint="add a spec for each (bits=32 keeps a tensor in float)",
        )
    out = _copy(module)
    aliases: dict[int, list[str]] = {}
    for n, p in out.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    by_name = {n: p for n, p in out.named_parameters(remove_duplicate=False)}
    for name, spec in specs.items():
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            raise QuantizationError(
                f"{type(module).__name__} has no parameter {name!r} to fake-quantize",
                hint=f"did you mean {close[0]!r}?" if close else "use the names of module.named_parameters()",
            )
        if ".parametrizations." in name:
            raise QuantizationError(
                f"{name!r} is already parametrized", hint="fake-quantize the plain module (strip_fake_quant first)"
            )
        shared = aliases[id(by_name[name])]
        if len(shared) > 1:
            raise QuantizationError(
                f"parameter {name!r} is shared with {', '.join(n for n in shared if n != name)} (tied weights)",
                hint="untie them (e.g. clone the parameter) before quantization-aware training",
            )
        owner, leaf = _owner(out, name)
        if folded and name in folded:
            fq = FoldedFakeQuantize(spec, out.get_submodule(folded[name]), masks.get(name), name=name)
        else:
            fq = FakeQuantize(spec, masks.get(name), freeze_scales=freeze_scales, name=name)
        parametrize.register_parametrization(owner, leaf, fq)
    return out


def _fake_quantized(module: nn.Module):
    """(qualified name, owner, leaf, FakeQuantize, original) of every fake-quantized tensor."""
    for path, m in module.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for leaf, plist in m.parametrizations.items():
            fqs = [p for p in plist if isinstance(p, FakeQuantize)]
            if fqs:
                yield (f"{path}.{leaf}" if path else leaf), m, leaf, fqs[-1], plist.original


def strip_fake_quant(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every fake-quantized tensor baked into a plain ``nn.Parameter``
    holding its quantized values (``remove_parametrizations(..., leave_parametrized=True)``).

    >>> import torch, torch.nn as nn
    >>> qat = fake_quantize_module(nn.Linear(4, 2), {"weight": QuantSpec(bits=2)})
    >>> plain = strip_fake_quant(qat)
    >>> parametrize.is_parametrized(plain), len(torch.unique(plain.weight[0])) <= 4
    (False, True)
    """
    out = _copy(module)
    for _, owner, leaf, _, _ in list(_fake_quantized(out)):
        parametrize.remove_parametrizations(owner, leaf, leave_parametrized=True)
    return out


def export_quantized(module: nn.Module) -> dict[str, QuantizedTensor]:
    """The ``QuantizedTensor`` of every fake-quantized tensor of ``module``, by qualified name; each
    dequantizes to exactly the value the fake-quantized forward pass uses.

    >>> import torch.nn as nn
    >>> qat = fake_quantize_module(nn.Linear(4, 2), {"weight": QuantSpec(bits=4, scheme="codebook")})
    >>> q = export_quantized(qat)["weight"]
    >>> q.scheme, q.codes.shape, bool((dequantize(q) == qat.weight).all())
    ('codebook', (2, 4), True)
    """
    with torch.no_grad():
        return {name: fq.quantized(original) for name, _, _, fq, original in _fake_quantized(module)}
