"""The compression problem the solvers see: knobs with options and measured distortions, exact costs.

A **knob** is one decision with a few options: how many units a channel group keeps (``keep``), how
many bits a weight tensor gets (``bits``), how sparse it is (``sparsity``), whether a removable block
goes (``remove``: options ``(0, 1)``). Option 0 is always "leave it as it is" (all units, 32 bits,
dense, kept) and options get more compressed with the index. A **choice** is one option index per
knob. The quality model is additive: ``objective(choice)`` is the sum of the knobs' measured
distortions (each measured with only that knob changed: the sensitivity curves), except that the knobs
a removed block ``covers`` (its inner keep / bits / sparsity / remove knobs) stop counting.
Costs are exact: ``bytes(choice)`` is the size of the weights file ``compressc`` would write (through
the lowering passes and the size model), ``flops(choice)`` the FLOPs of the lowered module.

Solvers that relax the problem use ``tensor_costs``: per weight tensor, which knobs scale its rows
(output channels), its columns (input channels), its bit-width and its density; the same structure
gives cheap screening estimates (``estimate_bytes``, ``estimate_flops``) without lowering anything.
Agents that walk the network read each knob's ``features`` (the layer it acts on) in ``order``
(topological). A Problem is data: it pickles (its exact cost functions hold the traced graph, not
closures), so it can travel to worker processes; the evaluator stays behind.

>>> import numpy as np
>>> p = Problem.from_table(options=[(4, 2, 1), (32, 8, 4)], distortion=[(0, .1, .5), (0, .01, .2)],
...                        bytes_table=[(400, 200, 100), (800, 200, 100)])
>>> p.bytes([1, 1]), p.objective([1, 1]), p.most_compressed()
(400, 0.11, (2, 2))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from compressc.plan import LayerSettings, Plan

if TYPE_CHECKING:
    from compressc.search.evaluator import Evaluator

__all__ = ["Knob", "LayerFeatures", "TensorCost", "Budget", "Problem", "Choice", "option_index"]

Choice = tuple[int, ...]

KIND_ORDER = ("keep", "remove", "bits", "sparsity")  # within one layer: structure first, then storage


@dataclass(frozen=True)
class LayerFeatures:
    """The layer a knob acts on, as numbers an agent can read: ``op`` (a node kind: ``conv``,
    ``linear``, ... or ``block`` for a removable block), its input / output channels, kernel area
    (1 for linear layers), stride, the weights and multiply-accumulates the knob acts on, and
    ``depth``: its position among the network's ``layers`` weight layers in topological order.

    >>> f = LayerFeatures("conv", 16, 32, 9, 1, 4608, 4718592, depth=3, layers=8)
    >>> f.vector().shape, float(f.vector()[-1])   # the last entry: relative depth
    ((12,), 0.4286)
    """

    op: str = "other"
    in_channels: int = 0
    out_channels: int = 0
    kernel: int = 1
    stride: int = 1
    params: int = 0
    macs: int = 0
    depth: int = 0
    layers: int = 1

    OPS = ("conv", "linear", "block", "embedding", "attention")  # one-hot; anything else: all zeros
    SIZE = len(OPS) + 7

    def vector(self) -> np.ndarray:
        """``SIZE`` floats of comparable scale across models (log-scaled counts, relative depth), so a
        policy learned on one network reads another: one-hot ``op``, log2 channels / 16, log2 kernel / 8,
        stride / 4, log10 params / 9, log10 MACs / 12, depth / (layers - 1)."""
        onehot = [float(self.op == op) for op in self.OPS]
        rest = [np.log2(1 + self.in_channels) / 16, np.log2(1 + self.out_channels) / 16,
                np.log2(1 + self.kernel) / 8, self.stride / 4, np.log10(1 + self.params) / 9,
                np.log10(1 + self.macs) / 12]
        depth = self.depth / max(self.layers - 1, 1)
        return np.round(np.array(onehot + rest + [depth], dtype=np.float64), 4)


@dataclass(frozen=True)
class Knob:
    """One decision. ``target``: a channel-group id (``keep``) or a weight tensor name (``bits``,
    ``sparsity``). ``options[0]`` leaves the model as it is; ``distortion[0] == 0``."""

    key: str
    kind: str  # "keep" | "bits" | "sparsity" | "remove"
    target: int | str
    options: tuple
    distortion: tuple[float, ...]
    covers: tuple[int, ...] = ()  # "remove" knobs: indices of the knobs that are moot once the block goes
    features: LayerFeatures = field(default_factory=LayerFeatures, compare=False)

    def __post_init__(self) -> None:
        if len(self.options) != len(self.distortion) or not self.options:
            raise ValueError(f"knob {self.key}: options and distortion must be non-empty and of equal length")

    @functools.cached_property
    def factors(self) -> tuple[float, ...]:
        """What each option scales its tensors' size by: the kept fraction of the group (``keep``:
        option / options[0]), ``bits / 32`` (``bits``), the density ``1 - sparsity`` (``sparsity``), 1 or 0
        (``remove``: kept, removed).

        >>> Knob("bits:w", "bits", "w", (32, 8, 4), (0, .1, .2)).factors
        (1.0, 0.25, 0.125)
        """
        o = [float(v) for v in self.options]
        if self.kind == "keep":
            return tuple(v / o[0] for v in o)
        if self.kind == "bits":
            return tuple(v / 32.0 for v in o)
        if self.kind in ("sparsity", "remove"):  # a removed block's tensors: 0 (relaxations in log space clamp it)
            return tuple(1.0 - v for v in o)
        raise ValueError(f"knob {self.key}: unknown kind {self.kind!r}; kinds are keep, bits, sparsity and remove")


@dataclass(frozen=True)
class TensorCost:
    """Structure of one weight tensor's bytes, for relaxations:
    ``bytes ~= numel * rows * cols * bits / 8 * density + per_row_bytes * rows`` where ``rows`` /
    ``cols`` are the kept fractions of its output / input channels:
    ``sum(w * keep_fraction[knob]) + (1 - sum(w))`` over ``out_keep`` / ``in_keep`` (pairs of knob
    index and the share ``w`` of the dim it covers; a part no listed knob covers keeps all its units)."""

    tensor: str
    numel: int
    out_keep: tuple[tuple[int, float], ...] = ()
    in_keep: tuple[tuple[int, float], ...] = ()
    bits_knob: int | None = None
    sparsity_knob: int | None = None
    per_row_bytes: float = 0.0
    macs: int = 0
    remove_knobs: tuple[int, ...] = ()  # "remove" knobs whose block holds the tensor: removed, it costs nothing

    def bytes(self, rows: float, cols: float, bits_factor: float, density: float) -> float:
        """The formula above, with ``bits_factor = bits / 32`` (``Knob.factors`` of the bits knob).

        >>> TensorCost("w", 1000, per_row_bytes=2.0).bytes(0.5, 1.0, 4 / 32, 1.0)   # 500 weights at 4 bits
        251.0
        """
        return self.numel * rows * cols * (32.0 * bits_factor) / 8.0 * density + self.per_row_bytes * rows

    def flops(self, rows: float, cols: float) -> float:
        """The tensor's share of the FLOPs model: ``macs`` scaled by the kept rows and columns."""
        return self.macs * rows * cols


@dataclass(frozen=True)
class Budget:
    bytes: int | None = None
    flops: int | None = None


@dataclass
class Problem:
    """Knobs, exact cost functions and (optionally) a real score of a plan.

    ``bytes_of`` / ``flops_of`` take a ``Plan``; ``evaluator`` (a ``compressc.search.Evaluator``:
    ``evaluator.score(plan)`` is the real score of a lowered plan, higher is better) is set by the
    driver for solvers with the ``score`` capability, None otherwise. ``ranking[g]`` orders group ``g``'s units
    from most to least important: a ``keep`` option of ``k`` keeps ``ranking[g][:k]``.
    """

    knobs: tuple[Knob, ...]
    bytes_of: Callable[[Plan], int]
    flops_of: Callable[[Plan], int] = field(default_factory=lambda: _no_flops)
    ranking: dict[int, tuple[int, ...]] = field(default_factory=dict)
    scheme: str = "symmetric"
    sparsity_kind: str = "unstructured"
    tensor_costs: tuple[TensorCost, ...] = ()
    fixed_bytes: int = 0  # bytes of what no knob changes (float tensors, headers): for relaxations
    fixed_flops: int = 0  # FLOPs outside the weight layers' MACs (norms, activations, ...): for estimates
    evaluator: "Evaluator | None" = None

    # -- data: pickling and order --------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Everything but the evaluator (it holds workers and data) and the memo tables."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_bytes", "_flops", "order", "_calibrations")}
        state["evaluator"] = None
        return state

    @functools.cached_property
    def order(self) -> tuple[int, ...]:
        """Knob indices in topological order of their layers (``features.depth``), within one layer
        ``keep``, ``remove``, ``bits``, ``sparsity``; ties keep the knobs' own order.

        >>> Problem.from_table(options=[(32, 8)] * 3, distortion=[(0, .1)] * 3, bytes_table=[(4, 1)] * 3).order
        (0, 1, 2)
        """
        return tuple(sorted(range(len(self.knobs)), key=lambda j: (
            self.knobs[j].features.depth, KIND_ORDER.index(self.knobs[j].kind), j)))

    # -- choices and plans ---------------------------------------------------------------------
    def uncompressed(self) -> Choice:
        return tuple(0 for _ in self.knobs)

    def most_compressed(self) -> Choice:
        return tuple(len(k.options) - 1 for k in self.knobs)

    def moot(self, choice: Sequence[int]) -> frozenset[int]:
        """Indices of the knobs that a removed block covers under ``choice`` (their options do nothing)."""
        return frozenset(j for k, i in zip(self.knobs, choice) if k.kind == "remove" and k.options[int(i)]
                         for j in k.covers)

    def plan(self, choice: Sequence[int]) -> Plan:
        self._check(choice)
        channels: dict[int, tuple[int, ...]] = {}
        layers: dict[str, dict] = {}
        removed: list[str] = []
        moot = self.moot(choice)
        for j, (knob, i) in enumerate(zip(self.knobs, choice)):
            value = knob.options[i]
            if j in moot:
                continue
            if knob.kind == "remove":
                if value:
                    removed.append(str(knob.target))
            elif knob.kind == "keep":
                if i:
                    channels[int(knob.target)] = tuple(sorted(self.ranking[int(knob.target)][: int(value)]))
            elif knob.kind == "bits":
                layers.setdefault(str(knob.target), {})["bits"] = int(value)
            elif knob.kind == "sparsity":
                layers.setdefault(str(knob.target), {})["sparsity"] = float(value)
        settings = {
            name: LayerSettings(bits=s.get("bits", 32), scheme=self.scheme, sparsity=s.get("sparsity", 0.0),
                                sparsity_kind=self.sparsity_kind)
            for name, s in layers.items()
            if s.get("bits", 32) != 32 or s.get("sparsity", 0.0) > 0
        }
        return Plan(channels=channels, layers=settings, removed=tuple(removed))

    def choice_of(self, plan: Plan) -> Choice | None:
        """The option indices behind ``plan`` (the inverse of ``plan(choice)``), or None when a
        setting of ``plan`` is not one of its knob's options."""
        choice = []
        moot = {j for k in self.knobs if k.kind == "remove" and str(k.target) in plan.removed for j in k.covers}
        for j, knob in enumerate(self.knobs):
            if j in moot:  # a removed block's inner knob: the plan says nothing about it
                choice.append(0)
                continue
            if knob.kind == "remove":
                value = int(str(knob.target) in plan.removed)
            elif knob.kind == "keep":
                kept = plan.channels.get(int(knob.target))
                value = knob.options[0] if kept is None else len(kept)
            else:
                s = plan.layers.get(str(knob.target))
                value = (s.bits if s else 32) if knob.kind == "bits" else (s.sparsity if s else 0.0)
            if value not in knob.options:
                return None
            choice.append(knob.options.index(value))
        return tuple(choice)

    def tensor_factors(self, tc: TensorCost, choice: Sequence[int]) -> tuple[float, float, float, float]:
        """``(rows, cols, bits_factor, density)`` of ``tc`` under ``choice``: the arguments of
        ``tc.bytes``; a part of a dimension no listed knob covers keeps all its units."""
        def kept(pairs):
            return sum(w * self.knobs[k].factors[choice[k]] for k, w in pairs) + (1.0 - sum(w for _, w in pairs))

        bits = 1.0 if tc.bits_knob is None else self.knobs[tc.bits_knob].factors[choice[tc.bits_knob]]
        density = 1.0 if tc.sparsity_knob is None else self.knobs[tc.sparsity_knob].factors[choice[tc.sparsity_knob]]
        present = float(np.prod([self.knobs[k].factors[choice[k]] for k in tc.remove_knobs]))  # 0: removed
        return present * kept(tc.out_keep), kept(tc.in_keep), bits, density

    def estimate_bytes(self, choice: Sequence[int]) -> float:
        """A cheap estimate of ``bytes(choice)`` for screening, without lowering: every tensor's
        ``TensorCost.bytes`` plus the positions of sparse tensors' kept weights (at the mask's entropy),
        calibrated linearly so that it is exact at the uncompressed and the most compressed choices
        (what the structure misses, such as norms folded away and biases pruned, moves with the
        compression). tests/test_problem_data.py bounds its error. Problems without tensor structure
        answer with the exact bytes."""
        if not self.tensor_costs:
            return float(self.bytes(choice))
        alpha, beta = self._calibration("bytes")
        return alpha * self._structure_bytes(tuple(int(i) for i in choice)) + beta

    def estimate_flops(self, choice: Sequence[int]) -> float:
        """A cheap estimate of ``flops(choice)``: two FLOPs per remaining multiply-accumulate of the
        weight layers, calibrated as ``estimate_bytes`` is. Problems without tensor structure answer
        exactly."""
        if not self.tensor_costs:
            return float(self.flops(choice))
        alpha, beta = self._calibration("flops")
        return alpha * self._structure_flops(tuple(int(i) for i in choice)) + beta

    def _structure_bytes(self, c: Choice) -> float:
        total = 0.0
        for tc in self.tensor_costs:
            rows, cols, bits, density = self.tensor_factors(tc, c)
            total += tc.bytes(rows, cols, bits, density)
            if 0.0 < density < 1.0:  # where the kept weights are: near the mask's entropy (Rice codes)
                h = -(density * np.log2(density) + (1 - density) * np.log2(1 - density))
                total += tc.numel * rows * cols * h / 8.0
        return total

    def _structure_flops(self, c: Choice) -> float:
        return float(sum(2 * tc.flops(*self.tensor_factors(tc, c)[:2]) for tc in self.tensor_costs))

    def _calibration(self, resource: str) -> tuple[float, float]:
        """``(alpha, beta)`` with ``exact = alpha * structure + beta`` at both ends of the choice space."""
        memo = self.__dict__.setdefault("_calibrations", {})
        if resource not in memo:
            exact, model = (self.bytes, self._structure_bytes) if resource == "bytes" else (self.flops, self._structure_flops)
            lo, hi = self.most_compressed(), self.uncompressed()
            span = model(hi) - model(lo)
            alpha = (exact(hi) - exact(lo)) / span if span > 0 else 1.0
            memo[resource] = (alpha, exact(lo) - alpha * model(lo))
        return memo[resource]

    def objective(self, choice: Sequence[int]) -> float:
        self._check(choice)
        moot = self.moot(choice)
        return float(sum(k.distortion[i] for j, (k, i) in enumerate(zip(self.knobs, choice)) if j not in moot))

    def bytes(self, choice: Sequence[int]) -> int:
        return self._bytes(tuple(int(i) for i in choice))

    def flops(self, choice: Sequence[int]) -> int:
        return self._flops(tuple(int(i) for i in choice))

    def feasible(self, choice: Sequence[int], budget: Budget) -> bool:
        if budget.bytes is not None and self.bytes(choice) > budget.bytes:
            return False
        return budget.flops is None or self.flops(choice) <= budget.flops

    def fit_on_line(self, start: Sequence[int], end: Sequence[int], budget: Budget) -> Choice:
        """The first choice on the straight line from ``start`` towards ``end`` (option indices
        rounded; ``end`` must fit) that fits ``budget``: each knob moved the same share of its way,
        found by bisection over the distinct choices on the line, with exact costs. How the random
        solver turns a uniform draw into a feasible candidate (and the drl solver its warm-up episodes).

        >>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 2, distortion=[(0, .1, .2, .9)] * 2,
        ...                        bytes_table=[(400, 100, 50, 25)] * 2)
        >>> p.fit_on_line((0, 0), p.most_compressed(), Budget(bytes=200))
        (1, 1)
        """
        a, b = np.asarray(start, dtype=float), np.asarray(end, dtype=float)
        steps = int(np.abs(b - a).max()) * 4 + 1
        return self.first_fitting([tuple(int(i) for i in np.round(a + t * (b - a)))
                                   for t in np.linspace(0.0, 1.0, steps + 1)], budget)

    def first_fitting(self, path: Sequence[Choice], budget: Budget) -> Choice:
        """The first choice of ``path`` (ordered from least to most compressed; its last must fit)
        that fits ``budget``: the first itself when it fits, else by bisection with exact costs.

        >>> p = Problem.from_table(options=[(32, 8, 4, 2)], distortion=[(0, .1, .2, .9)],
        ...                        bytes_table=[(400, 100, 50, 25)])
        >>> p.first_fitting([(0,), (1,), (2,), (3,)], Budget(bytes=60))
        (2,)
        """
        path = list(dict.fromkeys(tuple(c) for c in path))
        if self.feasible(path[0], budget):
            return path[0]
        lo, hi = 0, len(path) - 1  # path[hi] fits by contract
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.feasible(path[mid], budget) else (mid, hi)
        return path[hi]

    @functools.cached_property
    def _bytes(self) -> Callable[[Choice], int]:
        return functools.lru_cache(maxsize=4096)(lambda c: int(self.bytes_of(self.plan(c))))

    @functools.cached_property
    def _flops(self) -> Callable[[Choice], int]:
        return functools.lru_cache(maxsize=4096)(lambda c: int(self.flops_of(self.plan(c))))

    def _check(self, choice: Sequence[int]) -> None:
        if len(choice) != len(self.knobs):
            raise ValueError(f"a choice needs one option index per knob ({len(self.knobs)}), got {len(choice)}")
        for knob, i in zip(self.knobs, choice):
            if not 0 <= int(i) < len(knob.options):
                raise ValueError(f"knob {knob.key}: option {i} out of range 0..{len(knob.options) - 1}")

    # -- small problems for tests and examples ---------------------------------------------------
    @classmethod
    def from_table(cls, options: Sequence[Sequence], distortion: Sequence[Sequence[float]],
                   bytes_table: Sequence[Sequence[int]], kinds: Sequence[str] | None = None) -> "Problem":
        """A separable toy problem: knob ``j`` at option ``i`` costs ``bytes_table[j][i]`` bytes."""
        kinds = kinds or ["bits"] * len(options)
        knobs = tuple(Knob(f"{kind}:t{j}", kind, f"t{j}.weight", tuple(o), tuple(float(d) for d in dist))
                      for j, (kind, o, dist) in enumerate(zip(kinds, options, distortion)))
        return cls(knobs=knobs, bytes_of=_TableBytes(knobs, tuple(tuple(int(b) for b in row) for row in bytes_table)))


def _no_flops(plan: Plan) -> int:
    return 0


@dataclass(frozen=True)
class _TableBytes:
    """``from_table``'s exact bytes: knob ``j`` at option ``i`` costs ``table[j][i]`` (picklable)."""

    knobs: tuple[Knob, ...]
    table: tuple[tuple[int, ...], ...]

    def __call__(self, plan: Plan) -> int:
        total = 0
        for j, knob in enumerate(self.knobs):
            s = plan.layers.get(knob.target)
            total += self.table[j][knob.options.index(s.bits) if s is not None else 0]
        return total


def option_index(knob: Knob, value) -> int:
    """Index of ``value`` in ``knob.options`` (for solvers mapping continuous values back)."""
    arr = np.asarray(knob.options, dtype=float)
    return int(np.argmin(np.abs(arr - float(value))))
