"""The CLI's local Prefect server (flows/runtime.py): the first command that runs a flow with
no server named starts it, later commands reuse it, `adit server stop` stops it and nothing
else, and a PID file naming another process is refused. Every command here runs with its own
Prefect home and port, never the user's (`~/.prefect`, 4200)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adit_tasks.lab.servers import free_port, port_open
from flows.runtime import STATE_FILE, local_server, server_healthy, stop_local_server


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """An isolated Prefect home; whatever server was recorded in it is stopped after."""
    home = tmp_path / "prefect-home"
    try:
        yield home
    finally:
        stop_local_server(home)


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    """Some other process in a session of its own (a PID file may come to name it)."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def adit(home: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`adit ARGS` as a user runs it, with no server named (no PREFECT_API_URL, which the
    session's prefect_server fixture may have set), its own Prefect home and port."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ADIT_") and k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": str(port),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], env=env,
                          capture_output=True, text=True, timeout=240)


def test_first_command_starts_the_server_the_next_reuses_it_stop_stops_only_it(
        lab, home, decoy, tmp_path) -> None:
    port = free_port()
    nodes = lab.nodes_file_in(tmp_path)
    spec = lab.demo[0]
    transfer = ("transfer", "--source", "orthanc1", "--destination", "downloads",
                "--study", spec.study_uid, "--nodes-file", nodes)

    first = adit(home, port, *transfer)
    assert first.returncode == 0, first.stderr
    assert "success" in first.stdout
    assert len(list((tmp_path / "downloads").rglob("*.dcm"))) == spec.instance_count
    server = local_server(home)
    assert server is not None and server.port == port
    assert os.getpgid(server.pid) == server.pid  # its own process group, outliving the command
    assert server_healthy(server.api_url)

    second = adit(home, port, *transfer)
    assert second.returncode == 0, second.stderr
    assert "already complete" in second.stdout
    assert local_server(home) == server  # the same process: no second server
    assert (home / "adit-server.log").read_text().count("Check out the dashboard") == 1

    status = adit(home, port, "server", "status")
    assert status.returncode == 0 and f"pid {server.pid}" in status.stdout

    stop = adit(home, port, "server", "stop")
    assert stop.returncode == 0, stop.stderr
    assert f"pid {server.pid}" in stop.stdout
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)  # the whole group is gone
    assert not port_open("127.0.0.1", port)
    assert not (home / STATE_FILE).exists()
    assert decoy.poll() is None  # nothing else was signalled
    assert adit(home, port, "server", "status").returncode == 1


def test_a_pid_file_naming_another_process_is_refused(home, decoy) -> None:
    port = free_port()
    home.mkdir()
    (home / STATE_FILE).write_text(json.dumps({"pid": decoy.pid, "port": port}))
    assert local_server(home) is None  # not taken for a server, so a command starts its own

    stop = adit(home, port, "server", "stop")
    assert stop.returncode == 1
    assert f"process {decoy.pid} is not the local Prefect server" in stop.stderr
    assert decoy.poll() is None  # never signalled
    assert not (home / STATE_FILE).exists()  # the stale file is gone
