"""A run's plan, built once at the edge: everything a transfer needs, checked and typed.

The edge (a CLI command or a flow's start) reads the settings and the secrets once, looks up
the nodes and calls `transfer_plan()` with them. What comes out is frozen: the source
connection, the retriever, the sink and the destination node it talks to, the pseudonymizer,
the source's window and pacing, and the retry policy. Nothing here takes `Settings`; code
below the plan receives what it needs from it and never looks up a node name, reads settings
or the environment.

`transfer_plan()` is a context manager because a plan may own resources for the run: the C-MOVE
receiver (stopped when the run ends) and the job's archive (abandoned unless the run finished
it, so a crash never leaves a plausible-looking partial archive).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace

from adit_tasks.core.archive import ArchiveWriter
from adit_tasks.core.association import Connection, SlotFactory, SpareSlotFactory
from adit_tasks.core.config import (
    FolderNode,
    ReceiverAddress,
    RetrieveMethod,
    RetryPolicy,
    ServerNode,
)
from adit_tasks.core.errors import ConfigError, NotSupported
from adit_tasks.core.folder import safe_component, unique_component
from adit_tasks.core.manifest import Job, JobManifest
from adit_tasks.core.nifti import NiftiSink
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.pseudonymize import Pseudonymizer
from adit_tasks.core.receiver import open_receiver
from adit_tasks.core.results import StudyJob
from adit_tasks.core.retrieve import Retriever, choose_method, make_retriever
from adit_tasks.core.sinks import ArchiveSink, DicomWebSink, FolderSink, ServerSink, Sink
from adit_tasks.core.windows import OutsideWindow, TransferWindow


@dataclass(frozen=True)
class Gate:
    """How hard the source may be loaded: its transfer window and its pace.

    Checked between studies (or chunks of queries), never inside one: a study in flight when
    the window closes finishes; the next one waits for the opening.
    """

    node: str
    window: TransferWindow
    urgent: bool = False
    studies_per_minute: float | None = None
    pause_between_studies: float = 0.0

    @classmethod
    def of(cls, node: ServerNode, window: str = "", urgent: bool = False) -> Gate:
        """The node's gate; `window` (a run's own) replaces the node's window."""
        return cls(node.name, TransferWindow.parse(window or node.transfer_window), urgent,
                   node.studies_per_minute, node.pause_between_studies)

    def check(self) -> None:
        """OutsideWindow (with the opening time) when the window is closed now."""
        if not self.urgent and not self.window.is_open():
            raise OutsideWindow(self.node, self.window.next_open())


@dataclass(frozen=True)
class TransferPlan:
    """Everything one transfer run needs, resolved and checked."""

    source: Connection
    retriever: Retriever
    sink: Sink
    destination: ServerNode | None  # the destination server, when the sink is one
    pseudonymizer: Pseudonymizer | None
    gate: Gate
    retry: RetryPolicy
    archive: ArchiveWriter | None = None
    complete_archive: str = ""  # the job's archive exists already: nothing to do
    manifest: JobManifest | None = None  # a folder or archive job's (core/manifest.py)

    @property
    def nodes(self) -> tuple[ServerNode, ...]:
        """The servers a study talks to: each needs one of its slots for the study."""
        return (self.source.node,) + ((self.destination,) if self.destination else ())


@contextlib.contextmanager
def transfer_plan(
    source_node: ServerNode,
    target: ServerNode | FolderNode,
    options: TransferOptions,
    jobs: list[StudyJob],
    *,
    calling_ae: str,
    receiver: ReceiverAddress,
    retry: RetryPolicy,
    method: RetrieveMethod | None = None,
    pseudonym_secret: str = "",
    archive_password: str = "",
    slot: SlotFactory,
    spare: SpareSlotFactory | None = None,
    manifest_key: str | None = None,
) -> Iterator[TransferPlan]:
    """The plan of one transfer run from `source_node` to `target`; ConfigError for anything
    that cannot work, before any DICOM work starts. `slot` limits the plan's associations (see
    adit_tasks.core.association); `receiver` is where a C-MOVE run listens. `manifest_key`:
    a standing job's run's folder manifest (`standing_job_key`), else the job's own key."""
    destination = target.name
    chosen = choose_method(source_node, method)
    pseudonymizer = None
    if options.pseudonymizing:
        if not pseudonym_secret:
            raise ConfigError("pseudonymization needs a secret: set ADIT_PSEUDONYM_SECRET "
                              "(environment or .env) or the Prefect Secret block "
                              "'adit-pseudonym-secret'")
        pseudonymizer = Pseudonymizer(pseudonym_secret, options.pseudonymization(
            frozenset(source_node.safe_private_creators)))
    if options.nifti != "no" and not isinstance(target, FolderNode):
        raise ConfigError(f"NIfTI output is written to folder nodes (files or an archive); "
                          f"'{destination}' is not one")

    def with_nifti(sink: FolderSink | ArchiveSink) -> FolderSink | ArchiveSink | NiftiSink:
        if options.nifti == "no":
            return sink
        return NiftiSink(sink, options.nifti, pseudonymizer.options if pseudonymizer else None)

    conn = Connection(source_node, calling_ae, slot, spare)  # spare: parallel associations
    job = Job(job_key(options, jobs), source_node.name, destination,
              options.model_dump(mode="json"),
              tuple(pseudonymizer.rules.method_codes()) if pseudonymizer else ())
    common = dict(source=conn, pseudonymizer=pseudonymizer,
                  gate=Gate.of(source_node, options.window, options.urgent), retry=retry)
    with contextlib.ExitStack() as stack:
        listening = None
        if chosen == "c-move":
            listening = stack.enter_context(open_receiver(receiver.ae_title, receiver.host,
                                                          receiver.port))
        retriever = make_retriever(conn, chosen, listening)
        if options.archive:
            if not isinstance(target, FolderNode):
                raise ConfigError(f"archives are written to folder nodes; '{destination}' "
                                  "is not one")
            path = target.path / f"{job.key}.7z"
            if path.exists():
                yield TransferPlan(retriever=retriever, sink=FolderSink(target.path),
                                   destination=None, complete_archive=path.name, **common)
                return
            if not archive_password:
                raise ConfigError("archives need a password: set ADIT_ARCHIVE_PASSWORD "
                                  "(environment or .env) or the Prefect Secret block "
                                  "'adit-archive-password'")
            archive = ArchiveWriter(path, archive_password, compress=options.compress)
            stack.callback(archive.abandon)  # a no-op once the run finished it
            manifest = JobManifest(job)
            yield TransferPlan(retriever=retriever, sink=with_nifti(ArchiveSink(archive, manifest)),
                               destination=None, archive=archive, manifest=manifest,
                               **common)
            return
        if isinstance(target, FolderNode):
            manifest = JobManifest(replace(job, key=manifest_key) if manifest_key else job,
                                   target.path)
            yield TransferPlan(retriever=retriever,
                               sink=with_nifti(FolderSink(target.path, manifest)),
                               destination=None, manifest=manifest, **common)
            return
        if not target.store:
            raise NotSupported(f"node '{destination}' does not accept instances (store: false)")
        dest_conn = Connection(target, calling_ae, slot)
        sink = ServerSink(dest_conn) if target.has_dimse else DicomWebSink(dest_conn)
        yield TransferPlan(retriever=retriever, sink=sink, destination=target, **common)


def standing_job_key(name: str, run: str) -> str:
    """The folder manifest of one run of a standing job (a continuous job, by its name):
    `continuous-<job>/<run>`, one small manifest per run in the job's own folder of
    `manifests/`, so no run rewrites the job's history and two runs never write one file."""
    return f"continuous-{unique_component(name, 'job')}/{safe_component(run, 'run')}"


def job_key(options: TransferOptions, jobs: list[StudyJob]) -> str:
    """`<trial or adit>-<job hash>`, the name of a job's archive (`.7z`) and manifest: the
    same job (studies, series, pseudonyms, options) always gets the same key, so re-runs find
    their archive and manifest, and the key reveals nothing about the patients."""
    job = [(j.study_uid, list(j.series_uids), j.pseudonym) for j in jobs]
    # What shapes the output only: not when it may run (window, urgent); options at their
    # defaults left out, so that a new option does not rename every existing job.
    output = options.model_dump(exclude_defaults=True, exclude={"window", "urgent"})
    digest = hashlib.sha256(json.dumps([job, output], sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    return f"{safe_component(options.trial_id, 'adit')}-{digest}"
