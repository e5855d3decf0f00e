"""A run's studies pass their node lease on (limits.reusing_leases), and no slot outlives the
run: observed in the limit's active slots on a real Prefect server."""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks.core.config import ServerNode
from adit_tasks.limits import ensure_node_limits, node_slots, reusing_leases
from adit_tasks.runs import results_in_order


def _node(name: str) -> ServerNode:
    node = ServerNode(name=name, ae_title="NOBODY", host="127.0.0.1", port=1,
                      max_associations=2)
    ensure_node_limits([node])
    return node


def _active(node: ServerNode) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(node.limit_name).active_slots


def test_a_lease_passes_to_the_next_study_and_goes_back_with_the_scope(prefect_server) -> None:
    node = _node("handover")
    with reusing_leases():
        with node_slots((node,)):
            assert _active(node) == 1
        assert _active(node) == 1  # parked for the run's next study
        with node_slots((node,)):
            assert _active(node) == 1  # that one, not a second slot (the limit is 2)
    assert _active(node) == 0  # the end of the scope gives it back
    with node_slots((node,)):
        assert _active(node) == 1
    assert _active(node) == 0  # outside a run: back at once


def test_a_parked_lease_no_study_wants_goes_back_by_itself(prefect_server) -> None:
    node = _node("handover-idle")
    with reusing_leases():
        with node_slots((node,)):
            pass
        assert _active(node) == 1
        deadline = time.monotonic() + 30
        while _active(node) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _active(node) == 0  # given back while the scope is still open


@task(cache_policy=NO_CACHE)
def _study(node: ServerNode) -> int:
    with node_slots((node,)):
        return _active(node)


@flow(task_runner=ThreadPoolTaskRunner(max_workers=2), persist_result=False)
def _run(node: ServerNode) -> tuple[list[int], int]:
    held = list(results_in_order(_study, [(f"study-{i}", (node,)) for i in range(4)]))
    return held, _active(node)


def test_no_slot_of_a_run_is_left_taken_when_its_studies_are_done(prefect_server) -> None:
    node = _node("handover-flow")
    held, after = _run(node)
    assert all(1 <= h <= 2 for h in held)  # each study held a slot, never more than 2
    assert after == 0  # the next command on the node does not wait for parked leases
