"""`max_associations` held by Prefect global concurrency limits, across separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from adit_tasks.core.config import Settings
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, make_study
from adit_tasks.limits import ensure_node_limits
from tests.scp import MisbehavingSCP

RETRIEVE = textwrap.dedent("""
    import sys
    from adit_tasks.core.association import Connection
    from adit_tasks.core.config import ServerNode
    from adit_tasks.core.get import get_study
    from adit_tasks.limits import association_slot
    node = ServerNode.model_validate_json(sys.argv[1])
    conn = Connection(node, "ADIT", slot=association_slot)
    print(sum(1 for _ in get_study(conn, sys.argv[2])))
""")


@pytest.mark.parametrize("limit", [1, 2])
def test_two_worker_processes_share_one_limit(prefect_server, limit) -> None:
    spec = StudySpec("LIMITPAT", "Limit^Test", "19700101", "20240101", "120000", "LIM1",
                     "CT", (SeriesSpec("CT", "axial", 1, 6, rows=32, columns=32),))
    datasets = list(make_study(spec))
    with MisbehavingSCP(datasets, delay_per_instance=0.5) as scp:
        settings = Settings(nodes=[{"name": f"limited{limit}", "ae_title": scp.ae_title,
                                    "host": "127.0.0.1", "port": scp.port,
                                    "max_associations": limit, "timeout": 30}])
        ensure_node_limits(settings.servers)
        node_json = settings.servers[0].model_dump_json()
        env = {**os.environ, "PREFECT_API_URL": prefect_server}
        workers = [subprocess.Popen([sys.executable, "-c", RETRIEVE, node_json, spec.study_uid],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env) for _ in range(2)]
        outputs = [w.communicate(timeout=120) for w in workers]
        for worker, (out, err) in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, err
            assert out.strip() == str(len(datasets))
        assert scp.established == 2
        assert scp.max_concurrent == limit
