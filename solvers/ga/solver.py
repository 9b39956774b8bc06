"""``ga``: NSGA-II over (score, bytes[, FLOPs]) under the budget, seeded and guided by sensitivity,
with a two-step fitness (GeneCAI's Pareto search and the GA channel-pruning paper's guidance).

One generation: binary tournaments on (front, crowding) pick parents; ``crossover`` and
sensitivity-biased ``mutate`` breed children; a child over the budget is repaired into it by the
shared kernel (``LocalSearch.repair``: the least distortion per byte or FLOP saved first), never
dropped, so every genotype the search scores fits; children get the cheap score, the best fraction
of parents and children the fine-tuned one (``compressc.solvers.ga.fitness``); NSGA-II's elitist
survival keeps the population. The first population is random genotypes (repaired) plus the
sensitivity model's own solutions (``greedy`` at tighter budgets, ``convex`` at the budget). The
search stops when the evaluator's budget is spent or after ``generations`` generations.

The plan returned is the best measured one (refined score first); ``front()`` lists every
non-dominated plan found, and ``statistics()`` (report.json's ``solver_statistics``) carries the
front, the counts of cheap and refined scores, and one line per generation. With ``checkpoint`` (a
directory) the state is saved after every generation; ``resume=True`` continues from it, to the same
result as an uninterrupted run with the same seed.

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9), (0, .01, .1, .5), (0, .3, .6, .9)],
...                        bytes_table=[(400, 100, 50, 25)] * 3)
>>> solver = GeneticSolver(population=8, generations=4)
>>> plan = solver.solve(p, Budget(bytes=250), np.random.default_rng(0))
>>> sorted((name, s.bits) for name, s in plan.layers.items())
[('t0.weight', 8), ('t1.weight', 4), ('t2.weight', 8)]
>>> [(f.bytes, round(f.score, 2)) for f in solver.front()][-2:]
[(200, -0.6), (250, -0.5)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from compressc.errors import UserError
from compressc.pass_context import PassContext
from compressc.plan import Plan
from compressc.search.local_search import LocalSearch
from compressc.search.problem import Budget, Choice, Problem
from compressc.solvers.ga import checkpoint
from compressc.solvers.ga.fitness import Fitness
from compressc.solvers.ga.genotype import Genotype
from compressc.solvers.ga.nsga import pareto_mask, ranks, survivors, tournament
from compressc.solvers.ga.operators import SEED_SOLVERS, compress_bias, crossover, mutate, seed_choices

__all__ = ["GeneticSolver", "FrontPoint"]


@dataclass(frozen=True)
class FrontPoint:
    """One non-dominated plan: its fitness ``score`` (the refined score when it has one), its cheap
    and refined scores (``refined`` None when not refined), exact ``bytes`` and ``flops``."""

    plan: Plan
    score: float
    cheap: float | None
    refined: float | None
    bytes: int
    flops: int

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "cheap_score": self.cheap, "refined_score": self.refined, "bytes": self.bytes,
                "flops": self.flops, "plan": self.plan.to_dict()}


def _check(name: str, value, kind, low, high=None) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise TypeError(f"{name} must be {'an integer' if kind is int else 'a number'} {rng}, got {value!r}")


class GeneticSolver:
    """The ``ga`` solver (module doc). Options (the spec's ``[solver_options]``):

    ``population``: genotypes kept per generation; ``generations``: at most this many generations
    (the evaluation budget usually stops it first); ``crossover_rate``: the share of parent pairs
    crossed (the others are copied, then mutated); ``mutation_rate``: each free gene's chance to move
    (default ``1.5 / number of free genes``); ``refine_fraction``: the share of the population that
    gets the fine-tuned score each generation; ``refine_steps``: its fine-tuning steps (0: cheap
    scores only); ``seed_fractions``: where between the smallest plan and the budget ``greedy`` seeds
    the first population; ``seed_solvers``: which of ``convex`` and ``greedy`` seed it;
    ``checkpoint``: a directory for per-generation checkpoints; ``resume``: continue from it;
    ``progress``: report each generation as a task of ``ctx`` (the compile's ``PassContext``: its
    progress bars show it).
    """

    name: ClassVar[str] = "ga"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops", "score"})

    def __init__(self, population: int = 20, generations: int = 30, crossover_rate: float = 0.9,
                 mutation_rate: float | None = None, refine_fraction: float = 0.2, refine_steps: int = 20,
                 seed_fractions: tuple[float, ...] | list[float] = (0.25, 0.5, 0.75, 0.9),
                 seed_solvers: tuple[str, ...] | list[str] = SEED_SOLVERS, checkpoint: str | None = None,
                 resume: bool = False, progress: bool = True) -> None:
        _check("population", population, int, 4)
        _check("generations", generations, int, 0)
        _check("crossover_rate", crossover_rate, (int, float), 0, 1)
        if mutation_rate is not None:
            _check("mutation_rate", mutation_rate, (int, float), 0, 1)
        _check("refine_fraction", refine_fraction, (int, float), 0, 1)
        _check("refine_steps", refine_steps, int, 0)
        for q in seed_fractions:
            _check("seed_fractions[]", q, (int, float), 0, 1)
        unknown = set(seed_solvers) - set(SEED_SOLVERS)
        if unknown:
            raise TypeError(f"seed_solvers: {sorted(unknown)} are not seed solvers; pick from {list(SEED_SOLVERS)}")
        if not isinstance(resume, bool) or not isinstance(progress, bool):
            raise TypeError(f"resume and progress must be true or false, got {resume!r} and {progress!r}")
        if resume and checkpoint is None:
            raise TypeError("resume = true needs checkpoint = DIRECTORY (where the interrupted search saved itself)")
        self.population, self.generations, self.crossover_rate = population, generations, float(crossover_rate)
        self.mutation_rate, self.refine_fraction, self.refine_steps = mutation_rate, float(refine_fraction), refine_steps
        self.seed_fractions, self.seed_solvers = tuple(float(q) for q in seed_fractions), tuple(seed_solvers)
        self.checkpoint, self.resume, self.progress = checkpoint, resume, progress
        self._stats: dict[str, Any] = {}
        self._front: list[FrontPoint] = []
        self._points: list[tuple[int, float]] = []
        self._budget: Budget | None = None
        self._chosen: FrontPoint | None = None
        self._solves = 0
        self.ctx = PassContext()  # where generations are reported (the driver sets its own: bars, logs)

    def options(self) -> dict[str, Any]:
        """The options that shape the search (what a checkpoint is matched on)."""
        return {"population": self.population, "generations": self.generations, "crossover_rate": self.crossover_rate,
                "mutation_rate": self.mutation_rate, "refine_fraction": self.refine_fraction,
                "refine_steps": self.refine_steps, "seed_fractions": list(self.seed_fractions),
                "seed_solvers": list(self.seed_solvers)}

    # -- results -----------------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """What the last ``solve`` did: generations, evaluations (cheap and refined), the front and
        the chosen plan's scores, and one line per generation."""
        return dict(self._stats)

    def front(self) -> list[FrontPoint]:
        """Every non-dominated plan the last ``solve`` scored, smallest first (all fit the budget)."""
        return list(self._front)

    def plot(self, path: str | Path) -> None:
        """Draw the last search: score against bytes (every plan scored, the front, the chosen plan,
        the budget) into ``path`` (PNG, SVG or PDF by its suffix). Needs ``compressc[plot]``."""
        from compressc.solvers.ga.plot import plot_front

        if self._budget is None:
            raise UserError("ga: nothing to plot before solve() has run")
        plot_front(path, self._points, self._front, self._chosen, self._budget, self._stats.get("evaluations", 0))

    # -- the search --------------------------------------------------------------------------------
    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        """The best measured plan under ``budget`` (module doc). A solve that finds the evaluation budget
        already spent (the driver solving restricted problems after the search) returns the sensitivity
        model's plan and leaves the recorded search (``statistics``, ``front``, ``plot``) as it was."""
        first_solve, self._solves = self._solves == 0, self._solves + 1
        keep = self._budget is not None and problem.evaluator is not None and problem.evaluator.exhausted
        top = problem.uncompressed()
        if problem.feasible(top, budget):
            if not keep:
                self._budget, self._front, self._points, self._chosen = budget, [], [], None
                self._stats = {"generations": 0, "evaluations": 0, "front": []}
            return problem.plan(top)
        run = _Run(self, problem, budget, rng)
        state = None
        if self.resume:
            state = checkpoint.load(self.checkpoint, run.name)
            if state is None and first_solve:
                raise UserError(f"ga: no checkpoint in {self.checkpoint} matches this search (model, spec, budget, "
                                "solver options and seed)", hint="resume with exactly the same command, or run "
                                "without --resume to start over")
        choice = run.finish_from(state) if state is not None and state["done"] else run.search(state)
        if keep:
            self._stats["later_solves"] = self._stats.get("later_solves", 0) + 1
        else:
            self._budget, self._front, self._points = budget, run.front(), run.points()
            self._stats = run.statistics(choice)
            self._chosen = next((f for f in self._front if problem.plan(choice) == f.plan), None)
        return problem.plan(choice)


class _Run:
    """One search: the state a checkpoint holds, and the generation loop."""

    def __init__(self, solver: GeneticSolver, problem: Problem, budget: Budget, rng: np.random.Generator) -> None:
        self.s, self.problem, self.budget, self.rng = solver, problem, budget, rng
        self.name = checkpoint.fingerprint(problem, budget, solver.options(), rng.bit_generator.state)
        self.geno = Genotype(problem)
        self.fit = Fitness(problem, solver.refine_steps)
        self.local = LocalSearch.on(problem, budget)
        self.bias = compress_bias(problem)
        n_free = max(len(self.geno.free), 1)
        self.rate = solver.mutation_rate if solver.mutation_rate is not None else min(1.0, 1.5 / n_free)
        self.n_refine = math.ceil(solver.refine_fraction * solver.population) if self.fit.steps else 0
        self.population: list[Choice] = []
        self.seeds: list[Choice] = []
        self.generation, self.repaired, self.revisits, self.resumed_at = 0, 0, 0, None
        self.history: list[dict[str, Any]] = []

    # -- building blocks ---------------------------------------------------------------------------
    def repair(self, genes) -> Choice:
        choice = self.geno.clip(genes)
        if self.problem.feasible(choice, self.budget):
            return choice
        self.repaired += 1
        return self.geno.canonical(self.local.repair(choice))

    def objectives(self, pool: list[Choice]) -> np.ndarray:
        cols = [[-self.fit.value(g) for g in pool], [self.problem.bytes(g) for g in pool]]
        if self.budget.flops is not None:
            cols.append([self.problem.flops(g) for g in pool])
        return np.array(cols, dtype=float).T

    def evaluate(self, pool: list[Choice]) -> list[Choice]:
        """Cheap scores for ``pool``, fine-tuned ones for its best unrefined members; the scored part of ``pool``."""
        self.fit.score(pool)
        scored = [g for g in dict.fromkeys(pool) if self.fit.value(g) is not None]
        if self.n_refine:
            todo = sorted((g for g in scored if g not in self.fit.refined), key=lambda g: -self.fit.cheap[g])
            self.fit.refine(todo[: self.n_refine])
        return scored

    def children(self) -> list[Choice]:
        pop = np.array(self.population, dtype=int)
        rank, crowd = ranks(self.objectives(self.population))
        parents = tournament(rank, crowd, self.rng, 2 * math.ceil(self.s.population / 2))
        out: list[Choice] = []
        for a, b in zip(parents[::2], parents[1::2]):
            pair = crossover(pop[a], pop[b], self.geno.free, self.rng) if self.rng.random() < self.s.crossover_rate \
                else (pop[a].copy(), pop[b].copy())
            for child in pair:
                c = self.repair(mutate(child, self.geno.free, self.geno.sizes, self.bias, self.rate, self.rng))
                if self.fit.value(c) is not None:
                    self.revisits += 1
                out.append(c)
        return list(dict.fromkeys(out))

    # -- the loop ----------------------------------------------------------------------------------
    def initial(self) -> None:
        s = self.s
        self.seeds = seed_choices(self.problem, self.budget, s.seed_fractions, s.seed_solvers)
        n_random = max(s.population - len(self.seeds), 0)
        randoms = [self.repair([self.rng.integers(n) for n in self.geno.sizes]) for _ in range(n_random)]
        self.population = self.evaluate(list(dict.fromkeys(randoms + self.seeds)))[: max(s.population, len(self.seeds))]

    def search(self, state: dict[str, Any] | None) -> Choice:
        if state is None:
            self.initial()
            self.save(done=False)
        else:
            self.restore(state)
        ctx = self.s.ctx if self.s.progress else PassContext()
        with ctx.task("ga: generations", total=self.s.generations) as task:
            task.update(completed=self.generation)
            while self.generation < self.s.generations and not self.fit.exhausted and self.population:
                pool = self.evaluate(self.population + self.children())  # parents and children compete
                self.population = [pool[i] for i in survivors(self.objectives(pool), self.s.population)]
                self.generation += 1
                self.history.append({"generation": self.generation, "evaluations": self.fit.spent,
                                     "best_score": max(self.fit.value(g) for g in self.population),
                                     "front_size": int(pareto_mask(self.objectives(pool)).sum())})
                self.save(done=False)
                task.advance(detail=f"{self.fit.spent} evaluations, best {self.history[-1]['best_score']:.4g}")
        choice = self.result()
        self.save(done=True, result=choice)
        return choice

    def result(self) -> Choice:
        best = self.fit.best(list(self.fit.cheap))
        if best is not None:
            return best
        if self.seeds:  # not one evaluation fitted the budget: the sensitivity model's choice at the budget
            return self.seeds[-1]
        return self.problem.most_compressed()

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, done: bool, result: Choice | None = None) -> None:
        if self.s.checkpoint is None:
            return
        checkpoint.save(self.s.checkpoint, self.name, {
            "done": done, "result": None if result is None else list(result), "generation": self.generation,
            "rng": self.rng.bit_generator.state, "population": [list(g) for g in self.population],
            "seeds": [list(g) for g in self.seeds], "fitness": self.fit.state(), "history": self.history,
            "repaired": self.repaired, "revisits": self.revisits})

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.population = [tuple(g) for g in state["population"]]
        self.seeds = [tuple(g) for g in state["seeds"]]
        self.fit.restore(state["fitness"])
        self.generation, self.history = int(state["generation"]), list(state["history"])
        self.repaired, self.revisits, self.resumed_at = int(state["repaired"]), int(state["revisits"]), self.generation
        if self.fit.ev is not None and self.fit.spent:
            self.fit.ev.charge(self.fit.spent)

    def finish_from(self, state: dict[str, Any]) -> Choice:
        self.restore(state)
        return tuple(state["result"])

    # -- what the solver reports -------------------------------------------------------------------
    def scored(self) -> list[Choice]:
        return [g for g in self.fit.cheap if self.fit.value(g) is not None]

    def front(self) -> list[FrontPoint]:
        pool = self.scored()
        if not pool:
            return []
        mask = pareto_mask(self.objectives(pool))
        pts = [FrontPoint(self.problem.plan(g), self.fit.value(g), self.fit.cheap.get(g), self.fit.refined.get(g),
                          self.problem.bytes(g), self.problem.flops(g)) for g, m in zip(pool, mask) if m]
        return sorted(pts, key=lambda f: (f.bytes, -f.score))

    def points(self) -> list[tuple[int, float]]:
        return [(self.problem.bytes(g), self.fit.value(g)) for g in self.scored()]

    def statistics(self, choice: Choice) -> dict[str, Any]:
        f = self.fit
        return {"population": self.s.population, "generations": self.generation, "evaluations": f.spent,
                "cheap_scores": f.counts["cheap"], "refined_scores": f.counts["refined"], "refine_steps": f.steps,
                "refine_gain": round(f.gain, 6), "seeds": len(self.seeds), "repaired": self.repaired,
                "revisits": self.revisits, "resumed_at_generation": self.resumed_at,
                "chosen": {"score": f.value(choice), "cheap_score": f.cheap.get(choice),
                           "refined_score": f.refined.get(choice), "bytes": self.problem.bytes(choice)},
                "front": [p.to_dict() for p in self.front()], "history": self.history}
