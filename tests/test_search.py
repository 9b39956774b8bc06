"""The search machinery: the evaluator's cache and budget, scoring, and executors that agree."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compressc
from compressc.errors import UserError
from compressc.plan import LayerSettings, Plan
from compressc.search import Evaluator, SearchBudget, Scorer, WorkerDiedError, Workload, plan_seed
from compressc.search.executors import ProcessExecutor
from compressc.passes.lowering.compact import finalize, prepare
from compressc.recovery import recover
from compressc.spec import Finetune

from . import search_models as sm

ROOT = Path(__file__).resolve().parents[1]


def _workload(evaluate=sm.evaluate, **kw) -> Workload:
    return Workload.in_memory(sm.build(), sm.example_inputs(), evaluate=evaluate, loss_fn=sm.loss_fn,
                              calibration=[(sm.X[:8],), (sm.X[8:],)], train_loader=sm.train_loader(), **kw)


def _plans() -> list[Plan]:
    group = compressc.channel_groups(compressc.trace(sm.build(), sm.example_inputs()))[0]
    assert group.size == 8
    return [Plan(), Plan(layers={"0.weight": LayerSettings(bits=2)}),
            Plan(channels={group.id: (0, 2, 5)}, layers={"4.weight": LayerSettings(bits=4, sparsity=0.5)}),
            Plan(channels={group.id: (1, 2, 3, 4, 5, 6)}), Plan(channels={group.id: (0, 1, 2, 3)})]


# -- the evaluator: cache and budget ------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(requests=st.lists(st.lists(st.integers(0, 5), max_size=6), max_size=5), limit=st.integers(1, 8))
def test_cache_and_evaluation_budget(requests, limit):
    """Invariant: a plan is scored at most once, at most ``limit`` plans are scored, a plan scored is
    always answered, and a None answer only comes once the budget is spent."""
    calls = []
    plans = [Plan(layers={f"w{i}": LayerSettings(bits=2)}) if i else Plan() for i in range(6)]
    ev = Evaluator.from_function(lambda p: calls.append(p) or float(len(calls)), budget=SearchBudget(max_evaluations=limit))
    answered = {}
    for request in requests:
        scores = ev.score_many([plans[i] for i in request])
        for i, s in zip(request, scores):
            if s is None:
                assert ev.exhausted and i not in answered
            else:
                assert answered.setdefault(i, s) == s
    assert len(calls) == len({str(p.to_dict()) for p in calls}) == ev.stats()["evaluations"] <= limit
    answers = sum(1 for r in requests for i in r if i in answered)  # every answer is final once given
    assert ev.stats()["cache_hits"] + ev.stats()["evaluations"] == answers


def test_time_limit_stops_new_evaluations():
    ev = Evaluator.from_function(lambda p: time.sleep(0.05) or 1.0, budget=SearchBudget(time_limit=0.12))
    plans = [Plan(layers={f"w{i}": LayerSettings(bits=2)}) for i in range(20)]
    scores = ev.score_many(plans)
    done = [s for s in scores if s is not None]
    assert 2 <= len(done) < 20 and scores[len(done):] == [None] * (20 - len(done))
    assert ev.stats()["stopped_by"] == "time_limit" and ev.exhausted


def test_bad_budgets_say_what_is_wrong():
    with pytest.raises(UserError, match="max_evaluations must be an integer >= 1"):
        SearchBudget(max_evaluations=0)
    with pytest.raises(UserError, match="'ten minutes' is not a duration"):
        SearchBudget(time_limit="ten minutes")


def test_candidate_seeds_come_from_the_plan_and_the_run_seed():
    a, b = Plan(), Plan(layers={"w": LayerSettings(bits=4)})
    assert plan_seed(a, 0, 0) == plan_seed(Plan.from_dict(a.to_dict()), 0, 0)
    assert len({plan_seed(a, 0, 0), plan_seed(b, 0, 0), plan_seed(a, 1, 0), plan_seed(a, 0, 5)}) == 4


# -- scoring ---------------------------------------------------------------------------------------
def test_scoring_is_what_ships_and_fine_tuning_steps_help():
    """The score of a plan is evaluate() on what the driver ships: prepare, recover (BatchNorm
    re-estimated on the calibration batches), finalize."""
    workload = _workload()
    scorer = Scorer(workload)
    plan = _plans()[2]
    prepared = prepare(scorer.graph, plan)
    trained, report = recover(scorer.graph, prepared, None, Finetune(), calibration=workload.bn_batches())
    assert report.recalibration_batches == 2
    assert scorer.score(plan, 0, 0) == sm.evaluate(finalize(prepared, trained).module)
    tuned = [scorer.score(plan, 8, seed) for seed in (1, 1, 2)]
    assert tuned[0] == tuned[1], "the same seed gives the same score"
    assert tuned[0] > scorer.score(plan, 0, 0), "8 distillation steps should recover some of the loss"


@pytest.mark.parametrize("own_generator", [True, False])
def test_drawing_the_search_batches_leaves_the_users_shuffling_untouched(own_generator):
    """The compile's final fine-tuning sees the same batches whether or not a search drew some first
    (a shuffling loader takes its order from its generator, or from torch's global one)."""
    from torch.utils.data import DataLoader, TensorDataset

    def loader():
        g = torch.Generator().manual_seed(3) if own_generator else None
        return DataLoader(TensorDataset(torch.arange(40.0)), batch_size=8, shuffle=True, generator=g)

    model, inputs = sm.build(), sm.example_inputs()
    torch.manual_seed(11)
    untouched = [b[0].tolist() for b in loader()]
    torch.manual_seed(11)
    drawn = loader()
    workload = Workload.in_memory(model, inputs, train_loader=drawn, train_batches=3)
    assert len(workload.train_batches) == 3
    assert [b[0].tolist() for b in drawn] == untouched


def test_batchnorm_statistics_come_from_the_shipped_batches_not_random_data():
    plan = _plans()[4]
    calibrated = Scorer(_workload()).score(plan, 0, 0)
    bare = Scorer(Workload.in_memory(sm.build(), sm.example_inputs(), evaluate=sm.evaluate)).score(plan, 0, 0)
    assert calibrated != bare and len(_workload().bn_batches()) == 2  # the calibration batches
    assert len(Workload.in_memory(sm.build(), sm.example_inputs(), train_loader=sm.train_loader()).bn_batches()) == 4


def test_data_free_score_is_minus_the_proxy():
    scorer = Scorer(_workload(evaluate=None))
    assert scorer.score(Plan(), 0, 0) == 0.0
    assert scorer.score(_plans()[1], 0, 0) < 0


# -- executors -------------------------------------------------------------------------------------
def test_processes_agree_with_serial_and_retry_a_dead_worker_once(tmp_path, monkeypatch):
    """One spawned pool (the start-up is the cost): the same scores as in this process, in task order;
    a worker killed while scoring is replaced and its plan retried; a plan that kills twice is an error.
    (Nothing is scored in this process while the workers start: a killing plan would kill the test.)"""
    plans = _plans()
    serial = Evaluator(_workload(), seed=7)
    agree = [plans[0], plans[1], plans[3]]
    expected = serial.score_many(agree, steps=3)
    monkeypatch.setenv(sm.KILL_MARKER, str(tmp_path / "killed-once"))
    pool = ProcessExecutor(2, startup_help=False)
    with Evaluator(_workload(evaluate=sm.evaluate_or_die), executor=pool, seed=7) as ev:
        assert ev.score_many(agree, steps=3) == expected
        assert ev.stats()["scored_while_starting"] == 0
        assert ev.score(plans[4]) == serial.score(plans[4])  # the first try died, the retry scored it
        assert (tmp_path / "killed-once").exists()
        with pytest.raises(WorkerDiedError, match=r"died twice while scoring plan .*\[0, 2, 5\]"):
            ev.score(Plan(channels=plans[2].channels))  # 3 channels: every try dies


def test_this_process_scores_while_the_workers_start_and_agrees_with_them():
    """Spawned workers take over a second to import torch: the first plans are scored here, later
    ones by the workers once they are up, and every score equals the serial one."""
    plans = _plans()
    serial = Evaluator(_workload(), seed=5)
    with Evaluator(_workload(), executor="processes", workers=2, seed=5) as ev:
        assert ev.score_many(plans, steps=2) == serial.score_many(plans, steps=2)
        helped = ev.stats()["scored_while_starting"]
        assert helped >= 1
        deadline = time.monotonic() + 120
        while not all(w.ready() for w in ev.executor._pool) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ev.score_many(plans, steps=3) == serial.score_many(plans, steps=3)
        assert ev.stats()["scored_while_starting"] == helped  # the workers scored these


def test_device_mapping_gives_one_worker_per_device():
    ex = ProcessExecutor(workers=5, devices=["cpu", "cuda:0", "cuda:1"])
    assert ex.workers == 3 and ex.devices == ["cpu", "cuda:0", "cuda:1"]
    assert ProcessExecutor(workers=3).devices == ["cpu"] * 3


def test_unpicklable_library_models_get_a_clear_error():
    ev = Evaluator(_workload(evaluate=lambda m: 1.0), executor="processes", workers=1)
    with pytest.raises(UserError, match="cannot send the model to worker processes"):
        ev.score(Plan())
    ev.close()


_INTERRUPTED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from compressc.plan import LayerSettings, Plan
    from compressc.search import Evaluator, Workload
    from tests import search_models as sm

    if __name__ == "__main__":  # worker processes are spawned: they import this file as a module
        w = Workload.in_memory(sm.build(), sm.example_inputs(), evaluate=sm.evaluate, loss_fn=sm.loss_fn,
                               train_loader=sm.train_loader())
        ev = Evaluator(w, executor="processes", workers=2)
        ev.score(Plan())
        print(" ".join(str(wk.process.pid) for wk in ev.executor._pool), flush=True)
        try:
            ev.score_many([Plan(layers={{"0.weight": LayerSettings(bits=b)}}) for b in range(2, 9)], steps=100000)
        finally:
            ev.close()
""")


def test_ctrl_c_leaves_no_worker_processes(tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2, proc.stderr.read()
    time.sleep(1.0)  # the workers are fine-tuning now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "worker processes outlived an interrupted search"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_ray_agrees_with_serial():
    """The default suite's one Ray test (a local cluster starts: about 10 s on two cores)."""
    pytest.importorskip("ray")
    plans = _plans()
    expected = Evaluator(_workload(), seed=3).score_many(plans, steps=2)
    with Evaluator(_workload(), executor="ray", workers=2, seed=3) as ev:
        assert ev.score_many(plans, steps=2) == expected
        assert ev.stats()["executor"] == "ray" and ev.stats()["evaluations"] == len(plans)


# -- the [search] table ----------------------------------------------------------------------------
@pytest.mark.parametrize("table,pattern", [
    ({"executor": "thread"}, r"search\.executor: .*is not an executor; allowed"),
    ({"time_limit": "a while"}, r"search\.time_limit: 'a while' is not a duration"),
    ({"time_limit": -5}, r"must be a positive duration"),
    ({"max_evaluations": 0}, r"search\.max_evaluations: 0 is out of range"),
    ({"executor": "processes", "workers": 3, "devices": ["cuda:0", "cuda:1"]}, r"3 workers but 2 devices"),
    ({"executor": "processes", "devices": ["gpu0"]}, r"search\.devices\[0\]: expected a device"),
    ({"ray_address": "auto"}, r'set executor = "ray"'),
    ({"executor": "serial", "workers": 2}, r"the serial executor runs one worker"),
])
def test_search_spec_errors_name_the_key(table, pattern):
    with pytest.raises(compressc.SpecError, match=pattern):
        compressc.Spec.from_dict({"target_size": "1MB", "search": table})


def test_search_spec_worker_counts():
    search = compressc.Spec.from_dict({"search": {"executor": "processes", "devices": ["cuda:0", "cuda:1"],
                                                  "time_limit": "1h30m"}}).search
    assert search.worker_count == 2 and search.time_limit == "1h30m"
    assert SearchBudget(time_limit=search.time_limit).time_limit == 5400.0
