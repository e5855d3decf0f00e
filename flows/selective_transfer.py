"""The `selective_transfer` flow: search a PACS, let a person tick studies in the Prefect UI,
transfer the ticked ones.

The run queries the source, then pauses with a form (Prefect's `pause_flow_run` with
`wait_for_input`): the form's description is a table of the studies found, its fields a
multi-select of those studies, the destination and the transfer options. "Resume" in the run's
menu (⋮) opens it. A form nobody answers ends the run cleanly after `timeout_minutes`.

The form is the result table of a search the user asked to see: one of the two places where
patient data may appear in Prefect's records (README, "Privacy"). Its table shows no name, ID
or birth date, only dates, modalities, descriptions, sizes and accession numbers.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Completed, Running, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field, create_model

from adit_tasks.core import find
from adit_tasks.core.association import Connection, slot_held_by_caller
from adit_tasks.core.config import ServerNode, load_settings
from adit_tasks.core.notice import status_counts
from adit_tasks.core.options import StudySearch, TransferOptions
from adit_tasks.core.results import StudyJob
from adit_tasks.limits import ensure_node_limits
from adit_tasks.notify import notified_if_raising, notifier_for, notify_end
from adit_tasks.runs import publish, run_task, transfer_jobs
from adit_tasks.tasks import find_task


def study_label(number: int, study: find.Study) -> str:
    """How a study appears in the multi-select: number, date, modalities, description, size."""
    date = study.StudyDate
    date = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date or "no date"
    size = study.NumberOfStudyRelatedInstances
    return (f"{number}. {date} {study.ModalitiesInStudy or '?'} "
            f"{study.StudyDescription or '(no description)'} ({size} images)")[:120]


def studies_table(studies: list[find.Study]) -> str:
    """The studies found, as the markdown table shown above the form."""
    lines = ["| # | Date | Time | Modalities | Description | Images | Accession |",
             "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(studies, start=1):
        cells = [str(i), s.StudyDate, s.StudyTime[:6], s.ModalitiesInStudy,
                 s.StudyDescription, str(s.NumberOfStudyRelatedInstances), s.AccessionNumber]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def selection_form(studies: list[find.Study], destinations: list[str],
                   destination: str) -> type[RunInput]:
    """The form: which studies, where to, and how (TransferOptions' fields, flattened)."""
    labels = tuple(study_label(i, s) for i, s in enumerate(studies, start=1))
    fields: dict[str, Any] = {
        "studies": (list[Literal[labels]],  # type: ignore[valid-type]
                    Field(default_factory=list, description="Studies to transfer")),
        "destination": (Literal[tuple(destinations)],  # type: ignore[valid-type]
                        Field(destination, description="Where the studies go")),
    }
    for name, info in TransferOptions.model_fields.items():
        fields[name] = (info.annotation, Field(info.default, description=info.description))
    return create_model("StudySelection", __base__=RunInput, **fields)


@flow(name="selective-transfer", flow_run_name="selective-transfer-{source}",
      task_runner=ThreadPoolTaskRunner(max_workers=4), persist_result=False)
def selective_transfer_flow(
    source: str,
    destination: str,
    search: StudySearch | None = None,
    limit: int = 50,
    timeout_minutes: float = 60,
    nodes_file: str | None = None,
    notify: list[str] | None = None,
) -> State:
    """Search `source`, wait for a person to pick studies in the UI, transfer them.

    `search`: the search fields (DICOM wildcards * ?; dates as YYYY-MM-DD or FROM-UNTIL).
    At most `limit` studies are offered; more results end the run with a request to narrow
    the search. The destination and options are chosen in the form (default `destination`).
    `notify`: e-mail addresses and http(s) webhook URLs told when the transfer ends.
    """
    logger = get_run_logger()
    settings = load_settings(nodes_file)
    notifier = notifier_for(settings, notify)
    with notified_if_raising(notifier, "selective transfer"):
        node = settings.server(source)
        settings.node(destination)
        ensure_node_limits([node])
        query = (search or StudySearch()).query("study", limit=limit + 1)
        conn = Connection(node, settings.ae_title, slot_held_by_caller)
        studies = run_task(find_task, settings.retry)(conn, query)
        if not studies:
            return Completed(message="No studies match the search; nothing to transfer.")
        if len(studies) > limit:
            return Completed(message=f"More than {limit} studies match: narrow the search "
                                     "(patient, dates, modality) or raise the limit.")
        destinations = [n.name for n in settings.nodes
                        if not isinstance(n, ServerNode) or n.store]
        form = selection_form(studies, destinations, destination)
        description = (f"**{len(studies)} studies found on {source}.** Tick the ones to "
                       f"transfer, choose the destination and options, then submit.\n\n"
                       + studies_table(studies))
        try:
            choice = pause_flow_run(wait_for_input=form.with_initial_data(description=description),
                                    timeout=max(1, round(timeout_minutes * 60)),
                                    poll_interval=2)
        except FlowPauseTimeout:
            # The run is still Paused on the server, which refuses Paused -> Completed: move it
            # back to Running so the run can end as Completed with this message.
            run_id = get_run_context().flow_run.id
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run_id, Running(), force=True)
            return Completed(message=f"Nobody chose studies within {timeout_minutes:g} minutes; "
                                     "nothing was transferred.")
        picked = [studies[int(label.split(".", 1)[0]) - 1] for label in choice.studies]
        if not picked:
            return Completed(message="No study was selected; nothing was transferred.")
        options = TransferOptions(**{name: getattr(choice, name)
                                     for name in TransferOptions.model_fields})
        logger.info("%d of %d studies selected", len(picked), len(studies))
        jobs = [StudyJob(s.StudyInstanceUID, (), options.pseudonym) for s in picked]
        results = transfer_jobs(settings, source, choice.destination, jobs, options)
        state = publish(results, pseudonymizing=options.pseudonymizing)
        notify_end(notifier, "selective transfer", status_counts(r.status for r in results))
        return state
