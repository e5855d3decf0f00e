"""Transfer windows with a controllable clock: crossing midnight, weekends, the study in
flight at window end, urgent runs; associations counted on the server side."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks import runs as runs_module
from adit_tasks.core import windows
from adit_tasks.core.config import Settings
from adit_tasks.core.errors import InvalidInput
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.results import StudyJob, StudyResult
from adit_tasks.core.windows import TransferWindow
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, make_study
from adit_tasks.runs import transfer_jobs
from flows.transfer import transfer_flow
from tests.scp import MisbehavingSCP

NIGHTS = "Mon-Fri 20:00-06:00; Sat-Sun 00:00-24:00"
MONDAY = dt.date(2026, 11, 23)  # a Monday


def at(day_offset: int, hhmm: str) -> dt.datetime:
    h, m = (int(x) for x in hhmm.split(":"))
    return dt.datetime.combine(MONDAY + dt.timedelta(days=day_offset), dt.time(h, m))


@pytest.mark.parametrize("when,open_", [
    (at(0, "12:00"), False),  # Monday noon
    (at(0, "19:59"), False),
    (at(0, "20:00"), True),
    (at(1, "05:59"), True),  # Tuesday early: Monday night's window crosses midnight
    (at(1, "06:00"), False),
    (at(4, "23:00"), True),  # Friday night
    (at(5, "03:00"), True),  # Saturday: weekend rule (and Friday's night)
    (at(5, "14:00"), True),
    (at(6, "23:59"), True),  # Sunday
    (at(7, "05:00"), False),  # Monday early: no Sunday-night rule crosses into Monday
])
def test_window_crossing_midnight_and_weekends(when, open_) -> None:
    assert TransferWindow.parse(NIGHTS).is_open(when) is open_


def test_next_opening_and_closing() -> None:
    window = TransferWindow.parse(NIGHTS)
    assert window.next_open(at(0, "12:00")) == at(0, "20:00")
    assert window.next_open(at(7, "06:30")) == at(7, "20:00")
    assert window.closes(at(0, "21:00")) == at(1, "06:00")
    assert TransferWindow.parse("").is_open(at(0, "12:00"))
    assert TransferWindow.parse("Fri-Mon 22:00-23:00").is_open(at(6, "22:30"))  # wraps week


@pytest.mark.parametrize("text", ["Mon-Fri 25:00-06:00", "Someday 10:00-11:00", "weekdays",
                                  "Mon 10:00"])
def test_bad_windows_are_invalid_input(text) -> None:
    with pytest.raises(InvalidInput):
        TransferWindow.parse(text)


def test_bad_window_in_the_nodes_file_names_the_node(tmp_path) -> None:
    from adit_tasks.core.config import load_settings
    from adit_tasks.core.errors import ConfigError

    path = tmp_path / "nodes.yaml"
    path.write_text("nodes:\n  - name: pacs\n    ae_title: P\n    host: h\n    port: 1\n"
                    "    transfer_window: 'Mon-Fri 20:00-30:00'\n")
    with pytest.raises(ConfigError, match=r"node 'pacs'.*transfer_window"):
        load_settings(path)


def studies(n: int) -> tuple[list[str], list]:
    uids, datasets = [], []
    for i in range(n):
        spec = StudySpec(f"WIN{i}", "Window^Test", "19700101", "20240101", "120000",
                         f"ACCW{i}", "CT", (SeriesSpec("CT", "ax", 1, 2, 16, 16),))
        uids.append(spec.study_uid)
        datasets += list(make_study(spec))
    return uids, datasets


class FakeClock:
    def __init__(self, *times: dt.datetime) -> None:
        self.times = list(times)

    def __call__(self) -> dt.datetime:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


def run(scp, uids, tmp_path, options, monkeypatch, clock, prefect_server) -> list[StudyResult]:
    monkeypatch.setattr(windows, "clock", clock)
    settings = Settings(nodes=[
        {"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port,
         "transfer_window": NIGHTS, "max_associations": 1, "timeout": 10},
        {"name": "out", "path": str(tmp_path)}])
    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def harness() -> list[StudyResult]:
        return transfer_jobs(settings, "pacs", "out", [StudyJob(uid) for uid in uids],
                             options, continue_postponed=False)

    return harness()


def test_closed_window_opens_no_association(prefect_server, tmp_path, monkeypatch) -> None:
    uids, datasets = studies(2)
    with MisbehavingSCP(datasets) as scp:
        rows = run(scp, uids, tmp_path, TransferOptions(), monkeypatch,
                   FakeClock(at(0, "12:00")), prefect_server)
        assert [r.status for r in rows] == ["postponed", "postponed"]
        assert "opens at 2026-11-23 20:00" in rows[0].message
        assert scp.established == 0


def test_urgent_run_ignores_the_window(prefect_server, tmp_path, monkeypatch) -> None:
    uids, datasets = studies(2)
    with MisbehavingSCP(datasets) as scp:
        rows = run(scp, uids, tmp_path, TransferOptions(urgent=True), monkeypatch,
                   FakeClock(at(0, "12:00")), prefect_server)
        assert [r.status for r in rows] == ["success", "success"]
        assert scp.established > 0


def test_study_in_flight_finishes_and_the_next_waits(prefect_server, tmp_path,
                                                     monkeypatch) -> None:
    uids, datasets = studies(2)
    with MisbehavingSCP(datasets) as scp:
        # Open when the first study starts; 06:00 (closed) from then on.
        rows = run(scp, uids, tmp_path, TransferOptions(), monkeypatch,
                   FakeClock(at(1, "05:59"), at(1, "06:00")), prefect_server)
        assert [r.status for r in rows] == ["success", "postponed"]
        assert len(list(tmp_path.rglob("*.dcm"))) == 2  # the first study, complete


def test_override_window_for_one_run(prefect_server, tmp_path, monkeypatch) -> None:
    uids, datasets = studies(1)
    with MisbehavingSCP(datasets) as scp:
        rows = run(scp, uids, tmp_path, TransferOptions(window="daily 11:00-13:00"),
                   monkeypatch, FakeClock(at(0, "12:00")), prefect_server)
        assert [r.status for r in rows] == ["success"]


def test_run_started_by_hand_waits_for_the_window_then_transfers(prefect_server, tmp_path,
                                                                  monkeypatch) -> None:
    uids, datasets = studies(2)
    now = {"t": at(0, "12:00")}
    monkeypatch.setattr(windows, "clock", lambda: now["t"])
    waited = []

    def fake_sleep_until(when: dt.datetime) -> None:  # the clock jumps to the opening
        waited.append(when)
        now["t"] = when

    monkeypatch.setattr(runs_module, "sleep_until", fake_sleep_until)
    with MisbehavingSCP(datasets) as scp:
        nodes = tmp_path / "nodes.yaml"
        nodes.write_text(yaml.safe_dump({"nodes": [
            {"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port,
             "transfer_window": NIGHTS},
            {"name": "out", "path": str(tmp_path / "out")}]}))
        rows = transfer_flow("pacs", "out", uids, nodes_file=str(nodes),
                             return_state=True).result()
    assert waited == [at(0, "20:00")]
    assert [r.status for r in rows] == ["success", "success"]


def test_rate_limit_takes_one_slot_per_study(prefect_server, tmp_path, monkeypatch) -> None:
    """studies_per_minute is a Prefect rate limit shared by every run: each study takes a
    slot that decays at the allowed rate (3/min: a slot frees every 20 s)."""
    from prefect.client.orchestration import get_client

    uids, datasets = studies(3)
    with MisbehavingSCP(datasets) as scp:
        settings = Settings(nodes=[
            {"name": "gentle", "ae_title": scp.ae_title, "host": "127.0.0.1",
             "port": scp.port, "studies_per_minute": 3},
            {"name": "out", "path": str(tmp_path)}])

        @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
        def harness() -> list[StudyResult]:
            return transfer_jobs(settings, "gentle", "out", [StudyJob(uid) for uid in uids],
                                 TransferOptions())

        rows = harness()
    assert [r.status for r in rows] == ["success"] * 3
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("adit-rate-gentle")
    assert limit.limit == 3 and limit.slot_decay_per_second == pytest.approx(0.05)
    assert limit.active_slots == 3
