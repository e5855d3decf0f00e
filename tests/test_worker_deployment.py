"""The scale-out path: `prefect deploy --all` from prefect.yaml, a process worker, a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client

from flows.runtime import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _reset_sigint() -> None:
    # A background process from a non-interactive shell ignores SIGINT, and Prefect's worker
    # turns SIGTERM into SIGINT: restore the default so the worker stops when told.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_deploy_all_then_a_worker_runs_a_query(lab, prefect_server, tmp_path) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    subprocess.run([PREFECT, "work-pool", "create", "adit", "--type", "process",
                    "--overwrite"], env=env, cwd=ROOT, check=True, capture_output=True)
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    with get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        assert {"pick-studies", "transfer", "query", "batch-query", "batch-transfer",
                "continuous-ct-thorax"} <= names
        deployment = client.read_deployment_by_name("query/query")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={
            "source": "orthanc1", "search": {"patient_id": lab.ct.patient_id},
            "nodes_file": str(lab.nodes_file)})
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "adit"], env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, preexec_fn=_reset_sigint,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                state = client.read_flow_run(run.id).state
                if state and state.is_final():
                    break
                time.sleep(1)
        assert state is not None and state.is_completed(), state
    finally:
        stop_process_group(worker, timeout=30)
