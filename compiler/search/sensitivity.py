"""Sensitivity curves: how much quality each knob option costs when it is the only change.

``measure_sensitivity`` takes the ``Problem``'s knobs (distortions still zero) and fills in, for every
option, the *quality loss* of the model compressed with that option alone (every other knob at option 0).
Option 0 is 0.0 by definition; the rest is measured on exactly the module ``lower`` builds for that
one-knob plan. With the model file's ``evaluate`` (higher is better) the loss is the score drop
``max(0, base - score)`` plus a bounded tie-breaker; without it, it is the data-free proxy
``proxy_distortion``: the normalised squared error of the outputs on calibration inputs. Curves are made
non-decreasing along the options (a running maximum) so solvers see monotone curves. Measurements are
cached on disk per model, so a second compile of the same model calls ``evaluate`` not once.
docs/sensitivity.md has the details.

>>> import torch, compressc
>>> from compressc.search.problem import Knob
>>> _ = torch.manual_seed(0)
>>> g = compressc.trace(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
...                     (torch.randn(8, 16),))
>>> knob = Knob("bits:0.weight", "bits", "0.weight", (32, 8, 2), (0.0, 0.0, 0.0))
>>> (measured,) = measure_sensitivity(g, [knob], {}, cache_dir=False)
>>> measured.distortion[0], 0 < measured.distortion[1] < 1e-3 < measured.distortion[2]
(0.0, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from compressc.evaluation import checked_score
from compressc.ir import Graph
from compressc.pass_context import PassContext, Task
from compressc.passes.analysis.removable_blocks import removable_blocks
from compressc.passes.lowering.compact import PlanError, prepare, quant_spec
from compressc.passes.lowering.fold_batchnorm import FoldCache, fold_batchnorm
from compressc.passes.lowering.prune_channels import channel_masks
from compressc.passes.lowering.quantize import QuantSpec, dequantize, quantize
from compressc.passes.lowering.sparsify import sparsity_mask
from compressc.perf import release
from compressc.plan import SPARSITY_KINDS, LayerSettings, Plan, weight_tensors
from compressc.search.curves import anchors, between, fallback_anchors, from_local
from compressc.search.problem import Knob
from compressc.search.replay import Replay

__all__ = ["measure_sensitivity", "proxy_distortion", "default_calibration_inputs", "model_hash",
           "default_cache_dir", "TIE_BREAK"]

#: Weight of the proxy in the ``evaluate`` path: ``TIE_BREAK * proxy / (1 + proxy)`` is below
#: ``TIE_BREAK`` for any proxy, so it orders options of equal score without outweighing a real drop.
TIE_BREAK = 1e-3
#: Proxies above this (or NaN / Inf outputs) are stored as this: "the outputs are gone".
PROXY_CAP = 1e6
CACHE_VERSION = 1
_SAVE_EVERY_S = 5.0
_ORDER = {"keep": -1, "bits": -1, "sparsity": 1, "remove": 1}  # options must strictly decrease / increase with the index

Inputs = tuple


# -- calibration inputs and the proxy ------------------------------------------------------------
def default_calibration_inputs(example_inputs: Sequence, n_random: int = 3, seed: int = 0) -> list[Inputs]:
    """``example_inputs`` plus ``n_random`` seeded random input tuples of the same shapes and dtypes.

    Floating tensors are drawn from a normal with the example's mean and standard deviation, integer
    tensors uniformly between the example's min and max (token ids stay valid), bool tensors at random;
    anything that is not a tensor is passed as is.

    >>> batches = default_calibration_inputs((torch.zeros(2, 3), torch.tensor([4, 7])), n_random=2)
    >>> len(batches), batches[1][0].shape, bool(((batches[2][1] >= 4) & (batches[2][1] <= 7)).all())
    (3, torch.Size([2, 3]), True)
    """
    example = tuple(example_inputs)
    gen = torch.Generator().manual_seed(seed)
    out: list[Inputs] = [example]
    for _ in range(n_random):
        out.append(tuple(_random_like(x, gen) for x in example))
    return out


def _random_like(x: Any, gen: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype == torch.bool:
        return (torch.rand(x.shape, generator=gen) < 0.5).to(x.device)
    if x.is_floating_point():
        xf = x.detach().double()
        mean = float(xf.mean()) if xf.numel() else 0.0
        std = float(xf.std()) if xf.numel() > 1 else 0.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        return (mean + std * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.dtype).to(x.device)
    if x.is_complex() or x.numel() == 0:
        return x.clone()
    lo, hi = int(x.min()), int(x.max())
    return torch.randint(lo, hi + 1, x.shape, generator=gen).to(x.dtype).to(x.device)


def proxy_distortion(reference: Sequence[Sequence[torch.Tensor]], compressed: Sequence[Sequence[torch.Tensor]]) -> float:
    """Mean over batches of ``||f_c(x) - f(x)||^2 / ||f(x)||^2``, every floating output of a batch
    counted together; NaN / Inf outputs or a ratio above ``PROXY_CAP`` give ``PROXY_CAP``.

    >>> ref = [[torch.tensor([3.0, 4.0])], [torch.tensor([1.0])]]
    >>> proxy_distortion(ref, [[torch.tensor([3.0, 4.0])], [torch.tensor([0.5])]])
    0.125
    """
    ratios = []
    for ref, out in zip(reference, compressed, strict=True):
        if len(ref) != len(out) or any(r.shape != o.shape for r, o in zip(ref, out)):
            raise ValueError("the compressed module's outputs differ in number or shape from the original's")
        num = sum(float((o - r).square().sum()) for r, o in zip(ref, out))
        den = sum(float(r.square().sum()) for r in ref)
        ratio = num / max(den, 1e-30)
        ratios.append(ratio if math.isfinite(ratio) else PROXY_CAP)
    return min(float(np.mean(ratios)), PROXY_CAP) if ratios else 0.0


# -- hashing and the cache -----------------------------------------------------------------------
def _update(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        h.update(f"tensor|{t.dtype}|{tuple(t.shape)}|".encode())
        try:
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
        except (RuntimeError, TypeError):  # sparse, quantized, ...: slower but still exact
            h.update(repr(t.tolist()).encode())
    else:
        h.update(f"{type(value).__qualname__}|{value!r}|".encode())


def model_hash(graph: Graph) -> str:
    """sha256 of the traced code and every state-dict entry (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(graph.module.code.encode())
    for name, t in sorted(graph.module.state_dict().items()):
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


def _evaluate_identity(evaluate: Callable | None) -> str | None:
    """Module, qualified name and bytecode of ``evaluate``: what the cache can see of it."""
    if evaluate is None:
        return None
    code = getattr(evaluate, "__code__", None) or getattr(getattr(evaluate, "__call__", None), "__code__", None)
    digest = hashlib.sha256(code.co_code).hexdigest()[:16] if code is not None else "-"
    return f"{getattr(evaluate, '__module__', '?')}.{getattr(evaluate, '__qualname__', type(evaluate).__qualname__)}:{digest}"


def _code_digest() -> str:
    """sha256 of the source of this pass, of the lowering passes it builds modules with, and of the
    replay and curve interpolation it measures and derives with: a change to the quantizer, the
    pruning or the interpolation invalidates what was measured with the old code."""
    from compressc.passes.lowering import compact, fold_batchnorm, prune_channels, quantize, sparsify
    from compressc.search import curves, replay

    h = hashlib.sha256()
    for module in (compact, fold_batchnorm, prune_channels, quantize, sparsify, curves, replay):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/compressc/sensitivity`` (``~/.cache/compressc/sensitivity`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "compressc" / "sensitivity"


class _Cache:
    """One JSON file per (model, calibration inputs, evaluate): ``points`` maps a one-knob setting
    (``_point_key``) to its measured ``{"proxy": float, "score": float | null}``."""

    def __init__(self, directory: Path | None, context: dict[str, Any], with_score: bool) -> None:
        self.context_key = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()
        self.context = context
        self.with_score = with_score
        self.path = directory / f"{self.context_key[:32]}.json" if directory is not None else None
        self.base_score, self.points = self._read()
        self.dirty = False

    def _read(self) -> tuple[float | None, dict[str, dict]]:
        if self.path is None:
            return None, {}
        try:
            data = json.loads(self.path.read_text())
            if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION
                    and data.get("context_key") == self.context_key and isinstance(data.get("points"), dict)):
                return None, {}
            base = data.get("base_score")
            base = float(base) if _finite(base) else None
            if self.with_score and base is None:  # drops cannot be computed without the base score
                return None, {}
            return base, {k: v for k, v in data["points"].items() if self._valid(v)}
        except (OSError, ValueError, TypeError, AttributeError):  # missing or corrupt: measure again
            return None, {}

    def _valid(self, entry: Any) -> bool:
        return (isinstance(entry, dict) and _finite(entry.get("proxy")) and entry["proxy"] >= 0
                and (_finite(entry.get("score")) if self.with_score else True))

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        base, points = self._read()  # merge what a concurrent run wrote meanwhile
        points.update(self.points)
        data = {"version": CACHE_VERSION, "context_key": self.context_key, "context": self.context,
                "base_score": self.base_score if self.base_score is not None else base, "points": points}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as err:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            warnings.warn(f"could not write the sensitivity cache {self.path}: {err}", stacklevel=3)
            self.path = None  # do not try again for every point


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _point_key(knob: Knob, value: Any, ranking: dict[int, tuple[int, ...]], scheme: str, sparsity_kind: str) -> str:
    """What identifies the module measured for ``knob`` at ``value`` (given the cache's context)."""
    if knob.kind == "keep":
        kept = ",".join(map(str, _kept(ranking, knob, value)))
        return f"keep:{int(knob.target)}:{int(value)}:{hashlib.sha256(kept.encode()).hexdigest()[:16]}"
    if knob.kind == "bits":
        return f"bits:{knob.target}:{int(value)}:{scheme}"
    if knob.kind == "remove":
        return f"remove:{knob.target}:{int(value)}"
    return f"sparsity:{knob.target}:{float(value)!r}:{sparsity_kind}"


def _kept(ranking: dict[int, tuple[int, ...]], knob: Knob, value: Any) -> tuple[int, ...]:
    return tuple(sorted(int(u) for u in ranking[int(knob.target)][: int(value)]))


# -- measuring -----------------------------------------------------------------------------------
class _Meter:
    """Builds the one-knob modules and scores them against the BatchNorm-folded float reference.

    No copy of the model: the reference shares every tensor BatchNorm folding leaves alone; a
    ``bits``/``sparsity`` option swaps one compressed weight in, replays only the layers downstream of
    it on the batched calibration inputs (``Replay``) and puts the weight back; a ``keep``/``remove``
    option builds a pruned module sharing the tensors it leaves whole, and releases it after."""

    def __init__(self, graph: Graph, inputs: list[Inputs], evaluate: Callable | None, scheme: str, sparsity_kind: str):
        self.graph, self.inputs, self.evaluate = graph, inputs, evaluate
        self.scheme, self.sparsity_kind = scheme, sparsity_kind
        # lower() folds BatchNorm for every non-empty plan, so the folded module is the uncompressed reference
        self.folds = FoldCache()  # pruned variants share the folded tensors of the layers they leave whole
        self.reference = fold_batchnorm(graph.module, share_tensors=True, cache=self.folds).eval()
        self.replay = Replay(self.reference, inputs)
        self.outputs = self.replay.outputs
        self.params = dict(self.reference.named_parameters())
        self.record_local = False  # keep the local errors of the options measured end to end (for ``_derive``)
        self.local: dict[tuple[str, str, Any], float | None] = {}

    def score(self, module: nn.Module, what: str) -> float | None:
        if self.evaluate is None:
            return None
        module.eval()
        with torch.no_grad():
            return checked_score(self.evaluate(module), what)

    def measure(self, knob: Knob, value: Any, ranking: dict[int, tuple[int, ...]]) -> dict[str, float | None]:
        what = f"for knob {knob.key} at option {value!r}"
        if knob.kind in ("keep", "remove"):
            plan = Plan(channels={int(knob.target): _kept(ranking, knob, value)}) if knob.kind == "keep" else \
                Plan(removed=(str(knob.target),))
            module = prepare(self.graph, plan, share_tensors=True, fold_cache=self.folds).module.eval()
            try:  # only what the pruning changes is recomputed
                return {"proxy": proxy_distortion(self.outputs, self.replay.run_variant(module)),
                        "score": self.score(module, what)}
            finally:
                release(module)  # its own (sliced, folded) tensors go now, not when the cyclic collector runs
        name = str(knob.target)
        compressed = self._compressed_weight(knob, value, self.params[name].detach())
        proxy = proxy_distortion(self.outputs, self.replay.run_with(name, compressed))
        if self.record_local:  # one layer's work, and interpolation then needs no second quantization
            self.local[knob.kind, name, value] = self.replay.local_error(name, compressed)
        if self.evaluate is None:
            return {"proxy": proxy, "score": None}
        with self.replay.swapped(name, compressed) as module:
            return {"proxy": proxy, "score": self.score(module, what)}

    def local_error(self, knob: Knob, value: Any, ranking: dict[int, tuple[int, ...]]) -> float | None:
        """The layer-local output error of a ``bits`` / ``sparsity`` option (``Replay.local_error``), or
        of a ``keep`` option: zeroing the removed channels, at the layers that consume them
        (``Replay.masked_local_error``)."""
        if knob.kind == "keep":
            return self.replay.masked_local_error(channel_masks(self.graph, {int(knob.target): _kept(ranking, knob, value)}))
        name = str(knob.target)
        if (knob.kind, name, value) in self.local:
            return self.local[knob.kind, name, value]
        return self.replay.local_error(name, self._compressed_weight(knob, value, self.params[name].detach()))

    def _compressed_weight(self, knob: Knob, value: Any, w: torch.Tensor) -> torch.Tensor:
        """What ``finalize`` stores for this weight: the (masked) quantize-dequantize round trip."""
        name = str(knob.target)
        if knob.kind == "bits":  # the same quantizer finalize picks (scale granularity included)
            spec, mask = quant_spec(LayerSettings(bits=int(value), scheme=self.scheme), w), None
        else:
            spec = quant_spec(LayerSettings(bits=32), w)
            mask = sparsity_mask(w, float(value), self.sparsity_kind)
        return dequantize(quantize(w, spec, name=name, mask=mask)).to(w.dtype).to(w.device)


def _check(graph: Graph, knobs: Sequence[Knob], ranking: dict[int, tuple[int, ...]], sparsity_kind: str) -> None:
    params = dict(graph.module.named_parameters())
    weights = set(weight_tensors(graph.module))
    blocks = {b.id for b in removable_blocks(graph)} if any(k.kind == "remove" for k in knobs) else set()
    for knob in knobs:
        if knob.kind not in _ORDER:
            raise ValueError(f"knob {knob.key}: unknown kind {knob.kind!r}; expected keep, bits, sparsity or remove")
        values = np.asarray(knob.options, dtype=float)
        if len(values) > 1 and not (np.diff(values) * _ORDER[knob.kind] > 0).all():
            order = "decrease" if _ORDER[knob.kind] < 0 else "increase"
            raise ValueError(f"knob {knob.key}: options {knob.options} must strictly {order} (more compressed "
                             "with the index): the monotone cleanup relies on it")
        if knob.kind == "keep":
            units = ranking.get(int(knob.target))
            if units is None:
                raise ValueError(f"knob {knob.key}: ranking has no entry for channel group {knob.target}")
            if not all(1 <= int(k) <= len(units) for k in knob.options[1:]):
                raise ValueError(f"knob {knob.key}: keep counts {knob.options} must be in 1..{len(units)}")
        elif knob.kind == "remove":
            if str(knob.target) not in blocks:
                raise PlanError(f"knob {knob.key}: {knob.target!r} is not a removable block of the model",
                                hint="use ids from compressc.removable_blocks(graph)")
        elif str(knob.target) not in weights:
            raise PlanError(f"knob {knob.key}: {knob.target!r} is not a quantizable weight of the model",
                            hint="use names from compressc.plan.weight_tensors(graph.module)")
        elif knob.kind == "sparsity" and sparsity_kind == "kernel" and params[str(knob.target)].dim() < 3:
            raise PlanError(f"{knob.target}: kernel-wise sparsity needs a conv weight (3+ dims), "
                            f"got shape {tuple(params[str(knob.target)].shape)}")


def _loss(entry: dict, base: float | None) -> float:
    proxy = float(entry["proxy"])
    if base is None:
        return proxy
    return max(0.0, base - float(entry["score"])) + TIE_BREAK * proxy / (1.0 + proxy)


def measure_sensitivity(
    graph: Graph,
    knobs: Sequence[Knob],
    ranking: dict[int, tuple[int, ...]],
    *,
    scheme: str = "symmetric",
    sparsity_kind: str = "unstructured",
    evaluate: Callable[[nn.Module], float] | None = None,
    calibration_inputs: Iterable[Inputs] | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    ctx: PassContext | None = None,
    interpolate: bool = True,
) -> tuple[Knob, ...]:
    """The knobs with their measured sensitivity curves as ``distortion`` (same order, keys, options).

    Parameters
    ----------
    graph : from ``compressc.trace``; never modified (nor is the model it shares parameters with).
    knobs : ``keep`` (target: channel-group id, options: units kept, decreasing), ``bits`` (target: a
        weight tensor, options decreasing) and ``sparsity`` (options increasing) knobs; option 0 is
        not measured and gets 0.0. Their ``distortion`` is ignored.
    ranking : per channel group, its units from most to least important; a ``keep`` option ``k``
        keeps ``ranking[g][:k]`` (as ``Problem.plan`` does).
    scheme, sparsity_kind : how ``bits`` and ``sparsity`` knobs are realised (``LayerSettings``).
    evaluate : ``evaluate(model) -> float``, higher is better. Loss = ``max(0, base - score)`` plus
        ``TIE_BREAK * proxy / (1 + proxy)``. Without it, loss = the data-free proxy.
    calibration_inputs : input tuples (batches) for the proxy; default ``graph.example_inputs`` and
        three seeded random tuples like it (``default_calibration_inputs``).
    cache_dir : where measurements are cached (default ``default_cache_dir()``); ``False``: no cache.
    ctx : where progress goes: a ``sensitivity`` task, one step per option measured (its instruments
        draw it, e.g. ``ProgressBars``); None: nowhere.
    interpolate : without ``evaluate``, measure only a few options of each curve end to end and derive
        the others where the curve is smooth (``compressc.search.curves``); ``False``: measure every option.

    Raises
    ------
    UserError
        ``evaluate`` returned a non-number or a non-finite number (the message names the knob and option).
    PlanError
        a ``bits``/``sparsity`` knob names a tensor that is not a quantizable weight, or a kernel-wise
        sparsity knob targets a tensor with fewer than 3 dims.
    ValueError
        a knob of unknown kind, options out of compression order, a ``keep`` knob without a ranking.
    """
    knobs = tuple(knobs)
    if sparsity_kind not in SPARSITY_KINDS:
        raise ValueError(f"sparsity_kind must be one of {SPARSITY_KINDS}, got {sparsity_kind!r}")
    _check(graph, knobs, ranking, sparsity_kind)
    QuantSpec(bits=8, scheme=scheme)  # an unknown scheme fails here, before anything is measured
    inputs = [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in
              (calibration_inputs if calibration_inputs is not None else default_calibration_inputs(graph.example_inputs))]
    if not inputs:
        raise ValueError("calibration_inputs is empty: give at least one input tuple, or None for the default")
    directory = None if cache_dir is False else Path(default_cache_dir() if cache_dir in (None, True) else cache_dir)
    h = hashlib.sha256()
    for batch in inputs:
        for x in batch:
            _update(h, x)
    context = {"model": model_hash(graph), "calibration": h.hexdigest(), "evaluate": _evaluate_identity(evaluate),
               "code": _code_digest(), "torch": torch.__version__, "version": CACHE_VERSION}
    cache = _Cache(directory, context, with_score=evaluate is not None)

    keys = {(j, i): _point_key(k, k.options[i], ranking, scheme, sparsity_kind)
            for j, k in enumerate(knobs) for i in range(1, len(k.options))}
    todo = {key: ji for ji, key in keys.items() if key not in cache.points}  # a key shared by two knobs: once
    if todo:
        meter = _Meter(graph, inputs, evaluate, scheme, sparsity_kind)
        with (ctx or PassContext()).task("sensitivity", total=len(todo)) as task:  # one task, whatever is derived
            if evaluate is None and interpolate:
                first = {key: (j, i) for key, (j, i) in todo.items() if i in anchors(knobs[j].kind, len(knobs[j].options))}
                meter.record_local = True
                task.update(total=len(first))
                _measure(meter, cache, first, knobs, ranking, task)
                todo = _derive(meter, cache, keys, todo, knobs, ranking, local=True)
                second = {key: (j, i) for key, (j, i) in todo.items() if i in fallback_anchors(knobs[j].kind, len(knobs[j].options))
                          and knobs[j].kind == "keep"}  # keep curves the local errors could not fill in
                task.update(total=len(first) + len(todo))
                _measure(meter, cache, second, knobs, ranking, task)
                todo = _derive(meter, cache, keys, todo, knobs, ranking, local=False)
                task.update(total=len(first) + len(second) + len(todo))
            _measure(meter, cache, todo, knobs, ranking, task)
        cache.save()  # derived points too

    out = []
    for j, knob in enumerate(knobs):
        curve = [0.0]
        for i in range(1, len(knob.options)):
            curve.append(max(curve[-1], _loss(cache.points[keys[j, i]], cache.base_score)))
        out.append(dataclasses.replace(knob, distortion=tuple(curve)))
    return tuple(out)


def _derive(meter: _Meter, cache: _Cache, keys: dict[tuple[int, int], str], todo: dict[str, tuple[int, int]],
            knobs: tuple[Knob, ...], ranking: dict[int, tuple[int, ...]], local: bool) -> dict[str, tuple[int, int]]:
    """Fill in the options ``curves`` can derive from the measured ones (stored as ``derived``):
    with ``local``, from local errors (``from_local``); without, ``keep`` options between measured
    neighbours (``between``). Return those still to measure."""
    missing: dict[int, list[int]] = {}
    for key, (j, i) in todo.items():
        if key not in cache.points:
            missing.setdefault(j, []).append(i)
    rest: dict[str, tuple[int, int]] = {}
    for j, indices in missing.items():
        knob, n = knobs[j], len(knobs[j].options)
        measured = {i: float(cache.points[keys[j, i]]["proxy"]) for i in range(1, n) if keys[j, i] in cache.points}
        derived: dict[int, float] | None = {}
        if local and knob.kind in ("bits", "sparsity", "keep"):
            errors = {i: meter.local_error(knob, knob.options[i], ranking) for i in set(indices) | set(measured)}
            derived = from_local(measured, errors, indices)
        elif not local and knob.kind == "keep":
            derived = between(measured, indices)
        for i in indices:
            if derived and i in derived:
                cache.points[keys[j, i]] = {"proxy": min(derived[i], PROXY_CAP), "score": None, "derived": True}
                cache.dirty = True
            else:
                rest[keys[j, i]] = (j, i)
    return rest


def _measure(meter: _Meter, cache: _Cache, todo: dict[str, tuple[int, int]], knobs: tuple[Knob, ...],
             ranking: dict[int, tuple[int, ...]], task: Task) -> None:
    last_save = time.monotonic()
    try:
        if meter.evaluate is not None and cache.base_score is None:
            cache.base_score = meter.score(meter.reference, "for the uncompressed model")
            cache.dirty = True
        for key, (j, i) in todo.items():
            knob = knobs[j]
            task.update(detail=f"{knob.key} = {knob.options[i]}")
            cache.points[key] = meter.measure(knob, knob.options[i], ranking)
            cache.dirty = True
            task.advance()
            if time.monotonic() - last_save > _SAVE_EVERY_S:  # an interrupted run keeps what it measured
                cache.save()
                last_save = time.monotonic()
    finally:
        cache.save()
