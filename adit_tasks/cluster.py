"""A cluster that heals itself: runs whose machine died are marked Crashed and run again.

Prefect's means, created on the server once by the set-up (`ensure_automations`, idempotent):

* Every flow run of the cluster deployments (tag `adit-cluster`, prefect.yaml) sends a
  heartbeat event every HEARTBEAT_SECONDS (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, set in the
  deployments' job variables, so whatever starts the worker).
* "crash runs without heartbeats": Prefect's documented zombie-run automation. After a
  heartbeat, the next heartbeat or a final state must follow within CRASH_AFTER_SECONDS (three
  missed heartbeats), else the run is set Crashed. A machine that dies mid-run (worker and
  flow-run processes, as when a VM is lost) leaves its runs Running for good without it.
  "crash runs that never sent a heartbeat" does the same from the start of a run: a machine
  that died between the run's start and its first heartbeat reaching the server (measured:
  a few seconds) leaves no heartbeat to wait after.
* "re-run crashed runs": a run that crashed after it had started (run count 1 to MAX_RUNS - 1)
  is set AwaitingRetry, a scheduled state of the same run, with its parameters; any worker of
  the pool takes it. The run's history shows Running -> Crashed -> AwaitingRetry -> Running ...
  with who did what. Our flows are idempotent (a re-run sends only what the destination
  lacks), so a re-run finishes the job. A run that crashes MAX_RUNS times stays Crashed for a
  person to look at. Runs that crash before they started (run count 0, e.g. a worker that
  cannot import the flow) are never re-run: that would loop.
* "re-schedule runs whose worker died before they started": a run stuck Pending (taken by a
  worker that died before the flow-run process reported Running) goes back to Scheduled after
  PENDING_SECONDS, for another worker.

Why not Prefect's own retries: a deployment's `retries` re-run a flow whose code failed, in
the same process; nothing retries a run whose process is gone (Crashed is not Failed), and an
`on_crashed` hook runs in the process that died. `prefect flow-run retry` refuses a Running
run. So the server has to act, and automations are how a Prefect server acts on events.

This module talks to the Prefect server only; `deployments/cluster.py` is the command.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

CLUSTER_TAG = "adit-cluster"  # every deployment of prefect.yaml carries it
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's minimum is 30)
CRASH_AFTER_SECONDS = 90  # three missed heartbeats (Prefect's documented choice)
PENDING_SECONDS = 120  # a flow-run process reports Running ~10 s after its worker took it
MAX_RUNS = 3  # a run is started at most this often: the first run and two re-runs

_RUN = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
_OURS = ResourceSpecification({"prefect.resource.role": "tag",
                               "prefect.resource.id": f"prefect.tag.{CLUSTER_TAG}"})
_FINAL = {"prefect.flow-run.Completed", "prefect.flow-run.Failed",
          "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}


def _crash_when_silent(name: str, after: str, why: str) -> AutomationCore:
    """After `after`, a heartbeat (or a final state) must follow within CRASH_AFTER_SECONDS,
    else the run is set Crashed. Prefect's documented zombie-run automation."""
    return AutomationCore(
        name=f"{CLUSTER_TAG}: {name}",
        description=(
            f"A run of a deployment tagged {CLUSTER_TAG} sends a heartbeat every "
            f"{HEARTBEAT_SECONDS} s; {why}: its machine is gone. Mark the run Crashed "
            "(the automation 're-run crashed runs' then schedules it again)."),
        trigger=EventTrigger(
            after={after},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Cancelling",
                    "prefect.flow-run.Paused", *_FINAL},
            match=_RUN, match_related=_OURS, for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=CRASH_AFTER_SECONDS)),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {CRASH_AFTER_SECONDS} s: its worker machine stopped "
                    f"(automation '{CLUSTER_TAG}: {name}').")],
    )


def automations() -> list[AutomationCore]:
    """The automations of the cluster, as they should be on the server."""
    return [
        _crash_when_silent("crash runs without heartbeats", "prefect.flow-run.heartbeat",
                           f"when none came for {CRASH_AFTER_SECONDS} s"),
        # The first heartbeat leaves the process a moment after the run started; a machine
        # that dies in that moment leaves a Running run that never sent one.
        _crash_when_silent("crash runs that never sent a heartbeat", "prefect.flow-run.Running",
                           f"when none came within {CRASH_AFTER_SECONDS} s of the start"),
        AutomationCore(
            name=f"{CLUSTER_TAG}: re-run crashed runs",
            description=(
                f"Schedule a crashed run of a deployment tagged {CLUSTER_TAG} again (the "
                f"same run, same parameters), at most {MAX_RUNS - 1} times; a re-run sends "
                "only what is missing."),
            trigger=EventTrigger(
                expect={"prefect.flow-run.Crashed"},
                match=ResourceSpecification({
                    "prefect.resource.id": "prefect.flow-run.*",
                    "prefect.run-count": [str(n) for n in range(1, MAX_RUNS)]}),
                match_related=_OURS, for_each={"prefect.resource.id"},
                posture=Posture.Reactive, threshold=1, within=timedelta(0)),
            actions=[ChangeFlowRunState(
                state=StateType.SCHEDULED, name="AwaitingRetry",
                message="Crashed: scheduled again for any worker (automation 're-run "
                        "crashed runs'); it sends only what is missing.")],
        ),
        AutomationCore(
            name=f"{CLUSTER_TAG}: re-schedule runs whose worker died before they started",
            description=(
                f"A run of a deployment tagged {CLUSTER_TAG} still Pending after "
                f"{PENDING_SECONDS} s was taken by a worker that is gone: schedule it again."),
            trigger=EventTrigger(
                after={"prefect.flow-run.Pending"},
                expect={"prefect.flow-run.Running", "prefect.flow-run.heartbeat",
                        "prefect.flow-run.Scheduled", "prefect.flow-run.AwaitingRetry",
                        "prefect.flow-run.Cancelling", "prefect.flow-run.Paused", *_FINAL},
                match=_RUN, match_related=_OURS, for_each={"prefect.resource.id"},
                posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=PENDING_SECONDS)),
            actions=[ChangeFlowRunState(
                state=StateType.SCHEDULED, name="AwaitingRetry",
                message=f"Pending for {PENDING_SECONDS} s: its worker stopped before the run "
                        "started; scheduled again (automation 're-schedule runs whose worker "
                        "died before they started').")],
        ),
    ]


def _comparable(automation: Any) -> dict[str, Any]:
    """The fields we set, with the trigger's event sets in one order."""
    data = automation.model_dump(mode="json", include={"name", "description", "enabled",
                                                       "trigger", "actions"})
    for key in ("after", "expect", "for_each"):
        data["trigger"][key] = sorted(data["trigger"].get(key) or [])
    return data


def ensure_automations() -> list[str]:
    """Create or correct the cluster's automations (idempotent: by name; duplicates that a
    concurrent set-up made are deleted). Returns one line per automation saying what was
    done."""
    done = []
    with get_client(sync_client=True) as client:
        for wanted in automations():
            existing = client.read_automations_by_name(wanted.name)
            if not existing:
                client.create_automation(wanted)
                done.append(f"created automation '{wanted.name}'")
                continue
            first, *extra = sorted(existing, key=lambda a: str(a.id))
            for duplicate in extra:
                client.delete_automation(duplicate.id)
            if _comparable(first) != _comparable(wanted):
                client.update_automation(first.id, wanted)
                done.append(f"updated automation '{wanted.name}'")
            else:
                done.append(f"automation '{wanted.name}' is in place")
    return done
