"""The plan of a continuous job's run, with a clock and no servers, no Prefect: what each run
does first, how the cursor and the re-check move, where a run stops, and how long a full
re-check of the history takes."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from adit_tasks.core.continuous import JobState, RunPlanner, Step, Sweep
from adit_tasks.core.errors import ConfigError, InvalidInput
from adit_tasks.core.results import StudyJob, StudyResult

NOW = dt.datetime(2026, 6, 30, 12, 0)
D = dt.date


def sweep(start: str = "2024-07-01", **kw) -> Sweep:
    return Sweep.of(start, **kw)


def result(uid: str, status: str = "success", transferred: int = 1, message: str = "",
           series: tuple[str, ...] = ()) -> StudyResult:
    return StudyResult(1, StudyJob(uid, series), status, transferred=transferred,
                       message=message)  # type: ignore[arg-type]


def run(state: JobState, job: Sweep, now: dt.datetime = NOW, found=None,
        **kw) -> tuple[RunPlanner, list[Step]]:
    """One whole run; `found(step)` gives each step's results (default: nothing found)."""
    planner = RunPlanner(state, job, now, **kw)
    steps = []
    while (step := planner.next_step()) is not None:
        steps.append(step)
        assert len(steps) < 1000, "a run never ends"
        planner.record(step, found(step) if found else [])
    return planner, steps


def chunks(steps: list[Step], kind: str) -> list[tuple[dt.date, dt.date]]:
    return [(s.first, s.last) for s in steps if s.kind == kind]


def test_a_fresh_job_starts_at_its_start_date_one_chunk_at_a_time():
    job = sweep(max_studies_per_run=500)
    state = JobState.load(None, job.start)
    assert state.cursor == "20240701" and state.failed == {} and state.recheck == ""
    planner = RunPlanner(state, job, NOW)
    assert planner.next_step() == Step("sweep", D(2024, 7, 1), D(2024, 7, 7))
    assert state.runs == 1


def test_the_cursor_advances_only_past_chunks_done():
    job = sweep(max_studies_per_run=3)
    state = JobState.load(None, job.start)
    # 2 studies a chunk: the budget of 3 lets the second chunk start, not the third
    planner, steps = run(state, job, found=lambda s: [
        result(f"1.2.{s.first:%Y%m%d}.1"), result(f"1.2.{s.first:%Y%m%d}.2", "warning", 0)])
    assert chunks(steps, "sweep") == [(D(2024, 7, 1), D(2024, 7, 7)),
                                      (D(2024, 7, 8), D(2024, 7, 14))]
    assert state.cursor == "20240715"
    assert planner.stopped.startswith("the run's budget of 3 studies")
    assert planner.tally.found == 4 and planner.tally.transferred == 2
    assert planner.tally.already_present == 2 and state.transferred_total == 2
    # the next run goes on where this one stopped
    _planner, steps = run(state, job, found=lambda s: [result(f"1.3.{s.first:%Y%m%d}")])
    assert chunks(steps, "sweep")[:2] == [(D(2024, 7, 15), D(2024, 7, 21)),
                                          (D(2024, 7, 22), D(2024, 7, 28))]
    assert state.runs == 2


def test_backlog_sweeps_up_to_today_then_the_overlap_every_run():
    job = sweep("2026-06-01", chunk_days=7, overlap_days=3)
    state = JobState.load(None, job.start)
    planner, steps = run(state, job)
    assert chunks(steps, "sweep") == [
        (D(2026, 6, 1), D(2026, 6, 7)), (D(2026, 6, 8), D(2026, 6, 14)),
        (D(2026, 6, 15), D(2026, 6, 21)), (D(2026, 6, 22), D(2026, 6, 28)),
        (D(2026, 6, 29), D(2026, 6, 30))]
    assert state.cursor == "20260701" and planner.summary()["backlog_days"] == 0
    # caught up: the next run (next day) sweeps the overlap, the last 3 days and today
    _planner, steps = run(state, job, NOW + dt.timedelta(days=1))
    assert chunks(steps, "sweep") == [(D(2026, 6, 28), D(2026, 7, 1))]
    assert state.cursor == "20260702"


def test_end_date_is_the_horizon():
    job = sweep("2024-07-01", end_date="2024-07-20", chunk_days=7, overlap_days=3)
    state = JobState.load(None, job.start)
    _planner, steps = run(state, job)
    assert chunks(steps, "sweep") == [(D(2024, 7, 1), D(2024, 7, 7)),
                                      (D(2024, 7, 8), D(2024, 7, 14)),
                                      (D(2024, 7, 15), D(2024, 7, 20))]
    assert state.cursor == "20240721"
    # the history ends where the overlap (3 days before the end date) begins
    assert chunks(steps, "recheck") == [(D(2024, 7, 1), D(2024, 7, 7))]
    _planner, steps = run(state, job, NOW + dt.timedelta(days=30))
    assert chunks(steps, "sweep") == [(D(2024, 7, 17), D(2024, 7, 20))]
    assert chunks(steps, "recheck") == [(D(2024, 7, 8), D(2024, 7, 14))]
    _planner, steps = run(state, job)
    assert chunks(steps, "recheck") == [(D(2024, 7, 15), D(2024, 7, 16))]
    assert state.cursor == "20240721"


def test_recheck_goes_round_robin_and_wraps_to_the_start():
    # history 2026-05-01 .. 2026-06-26 (today 06-30 less 3 days of overlap): 57 days = 3 chunks
    job = sweep("2026-05-01", chunk_days=19, overlap_days=3, recheck_chunks=1)
    state = JobState(cursor="20260701")  # caught up
    times = [NOW + dt.timedelta(minutes=30 * i) for i in range(4)]
    seen = []
    for at in times:
        planner, steps = run(state, job, at)
        assert chunks(steps, "sweep") == [(D(2026, 6, 27), D(2026, 6, 30))]
        seen += chunks(steps, "recheck")
        if len(seen) == 1:
            assert state.recheck == "20260520" and state.recheck_cycle_started == "2026-06-30 12:00"
            assert state.recheck_cycles == 0 and state.recheck_cycle_finished == ""
    assert seen == [(D(2026, 5, 1), D(2026, 5, 19)), (D(2026, 5, 20), D(2026, 6, 7)),
                    (D(2026, 6, 8), D(2026, 6, 26)), (D(2026, 5, 1), D(2026, 5, 19))]
    assert state.recheck_cycles == 1 and state.recheck_cycle_finished == "2026-06-30 13:00"
    assert state.recheck_cycle_started == "2026-06-30 13:30"  # the second cycle's first chunk
    assert state.recheck == "20260520"
    assert planner.summary()["runs_per_recheck_cycle"] == 3


def test_recheck_chunks_per_run_never_check_a_chunk_twice():
    job = sweep("2026-05-01", chunk_days=19, recheck_chunks=5)
    state = JobState(cursor="20260701", recheck="20260520")
    _planner, steps = run(state, job)
    assert chunks(steps, "recheck") == [(D(2026, 5, 20), D(2026, 6, 7)),
                                        (D(2026, 6, 8), D(2026, 6, 26)),
                                        (D(2026, 5, 1), D(2026, 5, 19))]
    assert state.recheck_cycles == 1 and state.recheck == "20260520"


def test_no_recheck_while_the_budget_is_used_by_the_backlog():
    job = sweep("2024-07-01", max_studies_per_run=2)
    state = JobState.load(None, job.start)
    planner, steps = run(state, job, found=lambda s: [result("1.2.3"), result("1.2.4")])
    assert [s.kind for s in steps] == ["sweep"] and state.recheck == ""
    assert planner.stopped.startswith("the run's budget")


def test_closed_window_leaves_cursor_and_recheck_where_they_were():
    job = sweep("2024-07-01")
    state = JobState(cursor="20250101", recheck="20240801")
    planner = RunPlanner(state, job, NOW)
    step = planner.next_step()
    assert step == Step("sweep", D(2025, 1, 1), D(2025, 1, 7))
    planner.stop("outside the transfer window of clinical")  # the gate said no
    assert planner.next_step() is None
    assert state.cursor == "20250101" and state.recheck == "20240801"
    # a study postponed mid-chunk: the chunk is not done, the run stops
    planner = RunPlanner(state, job, NOW)
    step = planner.next_step()
    done = planner.record(step, [result("1.2.3"), result("1.2.4", "postponed", 0)])
    assert not done and planner.next_step() is None
    assert state.cursor == "20250101" and planner.tally.postponed == 1
    assert planner.stopped == "the transfer window closed"


def test_failed_studies_are_retried_first_then_forgotten_when_they_pass():
    job = sweep("2024-07-01")
    state = JobState.load({"cursor": "20250101", "failed": {
        "1.2.3": {"attempts": 2, "message": "refused", "series": ["1.2.3.1"]},
        "1.2.4": {"attempts": 1, "message": "refused", "series": []}}}, job.start)
    planner = RunPlanner(state, job, NOW)
    step = planner.next_step()
    assert step == Step("retry", retry=(StudyJob("1.2.3", ("1.2.3.1",)), StudyJob("1.2.4")))
    assert planner.record(step, [result("1.2.3", series=("1.2.3.1",)),
                                 result("1.2.4", "failure", 0, "x" * 500)])
    assert list(state.failed) == ["1.2.4"]
    assert state.failed["1.2.4"] == {"attempts": 2, "message": "x" * 200, "series": []}
    assert planner.tally.retried == 2 and planner.tally.failed == 1
    assert planner.next_step() == Step("sweep", D(2025, 1, 1), D(2025, 1, 7))


def test_failures_that_do_not_fit_in_the_state_keep_their_chunk_to_do():
    job = sweep("2024-07-01")
    state = JobState(cursor="20250101")
    planner = RunPlanner(state, job, NOW, state_limit=1000)
    step = planner.next_step()
    failures = [result(f"1.2.826.0.1.3680043.8.498.{n:040d}", "failure", 0, "refused")
                for n in range(20)]
    assert not planner.record(step, failures)
    assert state.cursor == "20250101" and state.failed == {}
    assert planner.next_step() is None and "would not fit" in planner.stopped
    # a few do fit: recorded, and the chunk is done
    planner = RunPlanner(state, job, NOW, state_limit=1000)
    step = planner.next_step()
    assert planner.record(step, failures[:3])
    assert state.cursor == "20250108" and len(state.failed) == 3
    assert len(json.dumps(state.dump(1000), separators=(",", ":"))) <= 1000


def test_dump_shortens_messages_to_fit():
    state = JobState(cursor="20250101", failed={
        f"1.2.{n}": {"attempts": 1, "message": "m" * 200, "series": []} for n in range(10)})
    assert len(json.dumps(state.dump(), separators=(",", ":"))) > 2000
    data = state.dump(1000)
    assert len(json.dumps(data, separators=(",", ":"))) <= 1000
    assert set(data["failed"]) == set(state.failed)  # no study dropped, only messages


def test_cycle_length_with_the_defaults_and_with_more_recheck_chunks():
    # defaults: 7-day chunks, 3 days of overlap, one re-check chunk per run
    state = JobState(cursor="20260701")
    two_years = sweep("2024-06-30")
    # history 2024-06-30 .. 2026-06-26: 727 days = 104 chunks of 7 days
    assert two_years.history_chunks(state, NOW.date()) == 104
    assert two_years.runs_per_cycle(state, NOW.date()) == 104  # 52 hours at */30
    assert sweep("2024-06-30", recheck_chunks=8).runs_per_cycle(state, NOW.date()) == 13
    assert sweep("2024-06-30", recheck_chunks=0).runs_per_cycle(state, NOW.date()) is None
    rows = {r["measure"]: r["value"] for r in RunPlanner(state, two_years, NOW).report_rows()}
    assert rows["runs per full re-check cycle"] == 104
    assert rows["history to re-check"] == "2024-06-30 to 2026-06-26"
    assert rows["re-check position (next chunk starts)"] == "2024-06-30"
    assert rows["swept up to"] == "2026-06-30"
    assert rows["last full re-check cycle finished"] == "not yet"


def test_report_says_when_the_history_was_last_checked():
    job = sweep("2026-05-01", chunk_days=19)
    state = JobState(cursor="20260701", recheck="20260608",
                     recheck_cycle_started="2026-06-29 08:00")
    planner, _steps = run(state, job)
    rows = {r["measure"]: r["value"] for r in planner.report_rows()}
    assert rows["last full re-check cycle finished"] == "2026-06-30 12:00"
    assert rows["full re-check cycles"] == 1
    assert rows["re-check position (next chunk starts)"] == "2026-05-01"
    planner, _steps = run(state, job, NOW + dt.timedelta(minutes=30))
    rows = {r["measure"]: r["value"] for r in planner.report_rows()}
    assert rows["re-check position (next chunk starts)"] == "2026-05-20"
    assert rows["re-check cycle under way since"] == "2026-06-30 12:30"
    assert rows["stopped because"] == "all steps done"


def test_states_saved_before_the_recheck_times_load_and_keep_their_fields():
    old = {"cursor": "20250301", "failed": {"1.2.3": {"attempts": 1, "message": "m",
                                                      "series": []}},
           "recheck": "20240901", "transferred_total": 42, "runs": 7}
    state = JobState.load(old, D(2024, 7, 1))
    assert state.recheck_cycles == 0 and state.recheck_cycle_finished == ""
    assert {k: v for k, v in state.dump().items() if k in old} == old


def test_bad_settings_and_bad_saved_state_are_refused():
    with pytest.raises(ConfigError):
        Sweep.of("2024-07-01", chunk_days=0)
    with pytest.raises(ConfigError):
        Sweep.of("2024-07-01", end_date="2024-06-01")
    with pytest.raises(InvalidInput):
        Sweep.of("July 2024")
    with pytest.raises(InvalidInput):
        RunPlanner(JobState(cursor="garbage"), sweep(), NOW)
