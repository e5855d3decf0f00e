"""Job-end notifications against real peers: an SMTP server (aiosmtpd in this process) and an
HTTP webhook receiver (http.server in a thread), both on free loopback ports, with real flow
runs on the session's Prefect server and lab Orthanc.

The runs move a marker patient's study; every message that leaves (the e-mail as received,
its subject and text, the webhook's JSON) is searched for the marker's name, ID, birth date
in every spelling, accession number and (the transfer pseudonymizes) original UIDs.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from adit_tasks.core.config import load_settings
from adit_tasks.core.errors import ConfigError, InvalidInput
from adit_tasks.core.notice import notice, outcome_of, recipients, status_counts
from adit_tasks.core.options import TransferOptions
from adit_tasks.lab.servers import free_port
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, write_study
from adit_tasks.secrets import email_credentials
from flows.batch import batch_query_flow
from flows.continuous import continuous_transfer_flow
from flows.transfer import transfer_flow

NAME, PATIENT_ID, BIRTH = "Notifymark^Vesper", "NOTIFYMARK-0815", "19580317"
MARKER = StudySpec(PATIENT_ID, NAME, BIRTH, "20040506", "111500", "NMACC0815",
                   "NM study", (SeriesSpec("CT", "nm axial", 1, 2, 32, 32),))
#: The marker patient in the spellings a message might use, and the study's original UIDs.
NEEDLES = ["Notifymark", "Vesper", PATIENT_ID, "NOTIFYMARK0815", BIRTH, "1958-03-17",
           "17.03.1958", "03/17/1958", "NMACC0815", MARKER.study_uid,
           MARKER.series_uid(MARKER.series[0])]
SECRET = "notify-test-secret"
STAFF = "research-ops@example.org"


class Inbox:
    """aiosmtpd handler: every message received, parsed."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 OK"


@dataclass
class Hooks:
    """What the webhook receiver got: (path, body) per POST; /fail answers 500."""

    url: str
    posts: list[tuple[str, bytes]] = field(default_factory=list)


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[int, Inbox]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    received = Hooks("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.posts.append((self.path, body))
            self.send_response(500 if self.path == "/fail" else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def marker(lab, tmp_path_factory) -> StudySpec:
    lab.orthanc1.upload(write_study(MARKER, tmp_path_factory.mktemp("notify-marker")))
    return MARKER


def nodes_file(lab, tmp_path: Path, smtp_port: int, **notify: Any) -> str:
    """The lab's nodes file with a `notify` section for the test's SMTP server."""
    path = Path(lab.nodes_file_in(tmp_path))
    config = yaml.safe_load(path.read_text())
    config["notify"] = {"smtp_host": "127.0.0.1", "smtp_port": smtp_port,
                        "smtp_security": "none", "sender": "adit@example.org", **notify}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def mails_since(inbox: Inbox, before: int) -> list[tuple[list[str], email.message.Message]]:
    return [(to, email.message_from_bytes(raw, policy=email.policy.default))
            for to, raw in inbox.messages[before:]]


def plain_text(message: email.message.Message) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return part.get_content().replace("\r\n", "\n")  # SMTP sends CRLF


def assert_no_patient_data(*texts: str | bytes) -> None:
    for text in texts:
        low = (text.decode("utf-8", "replace") if isinstance(text, bytes) else text).lower()
        found = [n for n in NEEDLES if n.lower() in low]
        assert not found, f"patient data {found} in a notification: {text!r}"


def run_link(prefect_server: str, state: Any) -> str:
    return (prefect_server.removesuffix("/api") + "/runs/flow-run/"
            + str(state.state_details.flow_run_id))


# --- real flow runs ------------------------------------------------------------------------


def test_transfer_success_mails_and_posts_counts_and_link_without_patient_data(
        lab, prefect_server, tmp_path, smtp, hooks, marker, monkeypatch):
    monkeypatch.setenv("ADIT_PSEUDONYM_SECRET", SECRET)
    port, inbox = smtp
    before, posts = len(inbox.messages), len(hooks.posts)
    nodes = nodes_file(lab, tmp_path, port, recipients=[f"{hooks.url}/default"])
    state = transfer_flow("orthanc1", "downloads", [marker.study_uid],
                          options=TransferOptions(pseudonymize=True, trial_id="NOTE"),
                          nodes_file=nodes, notify=[STAFF, f"{hooks.url}/job"],
                          return_state=True)
    assert state.is_completed()
    link = run_link(prefect_server, state)

    [(to, mail)] = mails_since(inbox, before)
    assert to == [STAFF] and mail["From"] == "adit@example.org"
    text = plain_text(mail)
    assert mail["Subject"] == ("[ADIT] transfer success: transfer-orthanc1-to-downloads "
                               "(1 success)")
    assert "Studies: 1\n  success: 1\n" in text
    assert f"Run in the Prefect UI: {link}\n" in text

    paths = sorted(path for path, _ in hooks.posts[posts:])
    assert paths == ["/default", "/job"]  # the job's own and the nodes file's recipients
    payload = json.loads(hooks.posts[posts][1])
    assert payload["outcome"] == "success" and payload["counts"] == {"success": 1}
    assert payload["url"] == link and payload["kind"] == "transfer"
    assert payload["run_id"] == str(state.state_details.flow_run_id)
    assert_no_patient_data(inbox.messages[before][1], mail["Subject"], text,
                           *(body for _, body in hooks.posts[posts:]))


def test_transfer_failure_reports_failure_counts(lab, prefect_server, tmp_path, smtp, hooks,
                                                 marker):
    port, inbox = smtp
    before, posts = len(inbox.messages), len(hooks.posts)
    state = transfer_flow("orthanc1", "downloads", ["1.2.3.4.5.6.7.404"],
                          nodes_file=nodes_file(lab, tmp_path, port),
                          notify=[STAFF, f"{hooks.url}/job"], return_state=True)
    assert state.is_failed()
    [(_, mail)] = mails_since(inbox, before)
    assert "[ADIT] transfer failure:" in mail["Subject"]
    assert "Studies: 1\n  failure: 1\n" in plain_text(mail)
    # The study's message ("... not found ...") is free text: never part of a notification.
    assert "not found" not in plain_text(mail)
    payload = json.loads(hooks.posts[posts][1])
    assert payload["outcome"] == "failure" and payload["counts"] == {"failure": 1}


def test_a_run_that_raises_still_notifies_failure(lab, prefect_server, tmp_path, smtp, hooks):
    """An error after the run knows its recipients (here a destination the nodes file does
    not have) ends the run Failed by an exception, not with results: the recipients are
    told all the same, without counts and without the error's text."""
    port, _ = smtp
    posts = len(hooks.posts)
    state = transfer_flow("orthanc1", "no-such-node", ["1.2.3.4.5.6.7.405"],
                          nodes_file=nodes_file(lab, tmp_path, port),
                          notify=[f"{hooks.url}/job"], return_state=True)
    assert state.is_failed()
    [(path, body)] = hooks.posts[posts:]
    payload = json.loads(body)
    assert path == "/job" and payload["outcome"] == "failure" and payload["stopped"] is True
    assert payload["counts"] == {} and "stopped by an error" in payload["subject"]
    assert "unknown node" not in body.decode()  # the error's text stays in the run's logs


def test_batch_query_notifies_row_counts_without_the_patient(lab, prefect_server, tmp_path,
                                                             smtp, hooks, marker):
    port, inbox = smtp
    before, posts = len(inbox.messages), len(hooks.posts)
    batch = tmp_path / "find.csv"
    batch.write_text(f"PatientName,PatientBirthDate\n{NAME},17.03.1958\n"
                     "Nobody^Here,01.01.1900\n")
    state = batch_query_flow(str(batch), "orthanc1", str(tmp_path / "found.csv"),
                             nodes_file=nodes_file(lab, tmp_path, port),
                             notify=[STAFF, f"{hooks.url}/job"], return_state=True)
    assert state.is_completed()
    [(_, mail)] = mails_since(inbox, before)
    text = plain_text(mail)
    assert mail["Subject"].startswith("[ADIT] batch query success: batch-query-orthanc1 ")
    assert "Rows: 2\n  found: 1\n  not found: 1\n" in text
    assert f"Run in the Prefect UI: {run_link(prefect_server, state)}\n" in text
    payload = json.loads(hooks.posts[posts][1])
    assert payload["counts"] == {"found": 1, "not found": 1} and payload["unit"] == "rows"
    assert_no_patient_data(inbox.messages[before][1], mail["Subject"], text,
                           hooks.posts[posts][1])


def test_dead_smtp_server_and_refusing_webhook_do_not_change_the_run(
        lab, prefect_server, tmp_path, hooks, marker):
    posts = len(hooks.posts)
    dead = free_port()  # nothing listens there
    state = transfer_flow("orthanc1", "downloads", [marker.study_uid],
                          nodes_file=nodes_file(lab, tmp_path, dead),
                          notify=[STAFF, f"{hooks.url}/fail", f"{hooks.url}/after"],
                          return_state=True)
    assert state.is_completed(), state
    assert state.result()[0].status == "success"
    # Each was tried: the e-mail task failed (with its retry), both webhooks got the POST.
    assert sorted(p for p, _ in hooks.posts[posts:]) == ["/after", "/fail"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    [mail_run] = [r for r in runs if r.name.startswith("notify-email")]
    assert mail_run.state.is_failed() and mail_run.run_count == 2


def test_smtp_server_that_never_greets_does_not_hold_the_run(lab, prefect_server, tmp_path,
                                                              hooks, marker):
    """prefect-email connects without a timeout: a server that accepts and stays silent must
    not keep the run (and the CLI, and a worker's slot) waiting for ever."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # listens, never accepts, never greets
    posts = len(hooks.posts)
    states: list[Any] = []
    try:
        run = threading.Thread(daemon=True, target=lambda: states.append(transfer_flow(
            "orthanc1", "downloads", [marker.study_uid],
            nodes_file=nodes_file(lab, tmp_path, silent.getsockname()[1], smtp_timeout=1),
            notify=[STAFF, f"{hooks.url}/after"], return_state=True)))
        run.start()
        run.join(timeout=120)
        assert not run.is_alive(), "a silent SMTP server held the end of the run"
    finally:
        silent.close()
    [state] = states
    assert state.is_completed(), state
    assert [p for p, _ in hooks.posts[posts:]] == ["/after"]  # the webhook was still told


def test_continuous_run_notifies_only_when_it_has_failures(lab, prefect_server, tmp_path,
                                                          smtp, hooks, marker):
    port, inbox = smtp
    before, posts = len(inbox.messages), len(hooks.posts)
    dead = {"name": "deadend", "ae_title": "DEADEND", "host": "127.0.0.1",
            "port": free_port(), "timeout": 2}
    path = Path(nodes_file(lab, tmp_path, port))
    config = yaml.safe_load(path.read_text())
    config["nodes"].append(dead)
    path.write_text(yaml.safe_dump(config))
    job = dict(job=f"notify-{tmp_path.name}", source="orthanc1", start_date="2004-05-01",
               end_date="2004-05-10", chunk_days=30, recheck_chunks=0, study_description="NM*",
               nodes_file=str(path), notify=[STAFF, f"{hooks.url}/job"])

    failing = continuous_transfer_flow(destination="deadend", **job, return_state=True)
    assert failing.is_failed()
    [(_, mail)] = mails_since(inbox, before)
    assert mail["Subject"].startswith("[ADIT] continuous transfer failure: continuous-notify-")
    assert "  failed: 1\n" in plain_text(mail), plain_text(mail)
    payload = json.loads(hooks.posts[posts][1])
    assert payload["outcome"] == "failure" and payload["counts"]["failed"] == 1
    assert_no_patient_data(inbox.messages[before][1], hooks.posts[posts][1])

    # The next run retries the study into a folder that takes it: no failure, no message.
    passing = continuous_transfer_flow(destination="downloads", **job, return_state=True)
    assert passing.is_completed() and passing.result()["retried"] == 1
    assert len(inbox.messages) == before + 1 and len(hooks.posts) == posts + 1


def test_a_bad_notify_entry_fails_the_run_before_any_work(lab, prefect_server, tmp_path,
                                                          smtp, marker):
    port, inbox = smtp
    before = len(inbox.messages)
    state = transfer_flow("orthanc1", "downloads", [marker.study_uid],
                          nodes_file=nodes_file(lab, tmp_path, port),
                          notify=[STAFF, "ftp://files.example.org/drop"], return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, InvalidInput) and "'ftp://files.example.org/drop'" in str(error)
    assert not (tmp_path / "downloads").exists() and len(inbox.messages) == before


# --- the edge: entries, settings, secrets (no servers) --------------------------------------


@pytest.mark.parametrize("bad", ["ops", "ops@", "javascript://x", "file:///etc/passwd",
                                 "http://", "Ops <ops@example.org>",
                                 "ops@example.org\r\nBcc: all@example.org",
                                 "https://host.example/a b", "http://127.0.0.1:abc/x",
                                 "http://127.0.0.1:99999/x"])
def test_recipients_refuse_anything_but_addresses_and_http_urls(bad):
    with pytest.raises(InvalidInput, match=r"notify entry 2 of 2"):
        recipients(["ops@example.org", bad])


def test_recipients_sort_and_deduplicate():
    got = recipients([" ops@example.org", "https://chat.example/hook?t=1", "ops@example.org",
                      "http://10.0.0.5:8080/x"])
    assert got.emails == ("ops@example.org",)
    assert got.webhooks == ("https://chat.example/hook?t=1", "http://10.0.0.5:8080/x")


def test_outcome_and_message_are_built_from_counts_only():
    assert outcome_of(status_counts(["success", "success"])) == "success"
    assert outcome_of(status_counts(["success", "failure"])) == "partial"
    assert outcome_of(status_counts(["success", "postponed"])) == "partial"
    assert outcome_of(status_counts(["failure", "failure"])) == "failure"
    assert outcome_of({"found": 2, "not found": 1}) == "success"
    renamed = notice("transfer", "Notifymark^Vesper\n19580317", "id-1", {"failure": 1},
                     unit="studies", link=None)
    assert "Notifymark^Vesper" not in renamed.text and "\n19580317" not in renamed.subject
    assert "no link, the run used a temporary Prefect server" in renamed.text
    assert renamed.payload["url"] is None


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_smtp_password_only_from_the_environment(tmp_path, monkeypatch):
    notify = {"smtp_host": "mail.example.org", "smtp_security": "ssl", "username": "adit",
              "sender": "adit@example.org", "recipients": ["ops@example.org"]}
    with pytest.raises(ConfigError, match=r"notify.password.*ADIT_SMTP_PASSWORD"):
        load_settings(_write(tmp_path, {"notify": {**notify, "password": "hunter2"}}))
    with pytest.raises(ConfigError, match=r"notify.recipients.*'ops'"):
        load_settings(_write(tmp_path, {"notify": {**notify, "recipients": ["ops"]}}))
    monkeypatch.setenv("ADIT_SMTP_PASSWORD", "from-the-env")
    credentials = email_credentials(load_settings(_write(tmp_path, {"notify": notify})))
    assert credentials.password.get_secret_value() == "from-the-env"
    assert credentials.smtp_type.name == "SSL" and credentials.username == "adit"
    assert "from-the-env" not in repr(credentials)


def test_continuous_job_notify_entries_are_checked_with_the_nodes_file(tmp_path):
    config = {"nodes": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                        {"name": "out", "path": str(tmp_path)}],
              "continuous": [{"job": "ct", "source": "pacs", "destination": "out",
                              "start_date": "2020-01-01",
                              "notify": ["ops@example.org", "mailto:ops@example.org"]}]}
    with pytest.raises(ConfigError, match=r"continuous.0.notify.*'mailto:ops@example.org'"):
        load_settings(_write(tmp_path, config))


def test_cli_refuses_a_bad_notify_entry_before_any_work(tmp_path):
    nodes = _write(tmp_path, {"nodes": [{"name": "pacs", "ae_title": "PACS",
                                         "host": "127.0.0.1", "port": free_port()}]})
    batch = tmp_path / "b.csv"
    batch.write_text("PatientID\nX1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADIT_", "PREFECT_API"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # should it get as far as a server
    done = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "batch-query", str(batch), "--source", "pacs",
         "--out", str(tmp_path / "o.csv"), "--nodes-file", str(nodes),
         "--notify", "ops@example.org", "--notify", "ops at example.org"],
        capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "notify entry 2 of 2 ('ops at example.org')" in done.stderr
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "prefect").exists()
