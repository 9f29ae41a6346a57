"""The search's results table: a trial's row comes from Tune's last result, unless the trial's latest
Train run reached the budget after that result (its per-rank final reports are saved with the checkpoint)."""

import json
from types import SimpleNamespace

import pytest

from ampray.actors.worker import report_metrics
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.orchestrator.search import results_table


def test_a_finished_train_run_outranks_an_older_tune_result(tmp_path):
    engine = MixedPrecisionTrainer(MixedPrecisionConfig(), "cpu")
    trials = tmp_path / "trials"

    def save(run: str, step: int, losses: list[float]) -> None:
        folder = trials / run / f"checkpoint_{step:06d}"
        folder.mkdir(parents=True)
        for rank, loss in enumerate(losses):
            report = report_metrics(engine, step, rank, len(losses), loss, 0)
            (folder / f"report_rank{rank}.json").write_text(json.dumps(report))

    save("t_a", 40, [9.0])        # the first run reached the budget under its old settings,
    save("t_a-g1", 30, [3.0])     # but the restarted run (the trial's current settings) stopped at 30
    save("t_b", 20, [5.0, 5.0])
    save("t_b-g1", 40, [2.0, 4.0])  # the restarted run finished; Tune's last result was its step 30
    save("t_c", 40, [1.0])
    grid = [SimpleNamespace(metrics={"step": 30, "objective": 3.0, "loss": 3.0}, config={"x": 1},
                            path=str(tmp_path / name), error=error)
            for name, error in (("t_a", None), ("t_b", None), ("t_c", RuntimeError("boom")))]
    rows = {r["trial"]: r for r in results_table(grid, ["x"], 40, trials, skip_penalty=10.0)}
    assert (rows["t_a"]["status"], rows["t_a"]["step"], rows["t_a"]["loss"]) == ("stopped_early", 30, 3.0)
    assert (rows["t_b"]["status"], rows["t_b"]["step"]) == ("completed", 40)
    assert rows["t_b"]["loss"] == pytest.approx(3.0)  # the mean over both ranks' final reports
    assert rows["t_c"]["status"] == "error"  # an errored trial is never overridden
    assert all(r["x"] == 1 for r in rows.values())


def test_trials_whose_workers_fill_the_cpus_still_fit_beside_the_trials_own_sliver():
    """`--workers-per-trial 2` on a 2-CPU machine: each trial's function holds 0.01 CPU beside its workers,
    so 2 x 1 CPU never fit and every trial timed out after 60 s; the workers now give up that sliver."""
    from ampray.job import JobConfig
    from ampray.orchestrator.search import TRIAL_CPU, SearchConfig, _plan
    from ampray.orchestrator.train import ResourceError

    job = JobConfig.load(None, {"model.kind": "mlp"})
    trial, concurrent = _plan(job, SearchConfig(workers_per_trial=2), {"CPU": 2.0})
    assert concurrent == 1 and trial.scaling.cpus_per_worker == 0.99  # any node with a worker fits the trial
    assert 2 * trial.scaling.cpus_per_worker + TRIAL_CPU <= 2.0
    for cpus, workers in ((20.0, 20), (25.0, 25), (15.0, 15)):  # float sums a hair above the total fit too
        assert _plan(job, SearchConfig(workers_per_trial=workers), {"CPU": cpus})[1] == 1
    trial, concurrent = _plan(job, SearchConfig(workers_per_trial=1), {"CPU": 4.0})
    assert concurrent == 3 and trial.scaling.cpus_per_worker == 1.0  # 4 x 1.01 would not fit
    with pytest.raises(ResourceError, match="one trial needs 3.01 CPUs"):
        _plan(job, SearchConfig(workers_per_trial=3), {"CPU": 2.0})


def test_a_resume_names_the_search_settings_it_does_not_use():
    from ampray.orchestrator.search import SearchConfig, ignored_on_resume

    saved = SearchConfig(space="scaler", samples=8, name="s")
    assert ignored_on_resume(SearchConfig(name="s"), saved) == []  # nothing given: nothing to say
    assert ignored_on_resume(SearchConfig(name="s", samples=8, space="scaler"), saved) == []  # the same again
    notes = ignored_on_resume(SearchConfig(name="s", space="adaptive", samples=8, seed=3), saved)
    assert notes == [
        "search.space='adaptive' is not used: the resumed search 's' goes on as it began, with 'scaler' (start a "
        "new search, under another name, for other settings)",
        "search.seed=3 is not used: the resumed search 's' goes on as it began, with 0 (start a new search, under "
        "another name, for other settings)"]
