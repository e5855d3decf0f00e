"""Transfer options shared by every flow that moves studies, and their setup.

One pydantic model, so the Prefect UI shows the same form section in every deployment and the
CLI, the batch flows and the study picker validate options in one place. Secrets are not
options: they come from the environment or Prefect Secret blocks (see `read_secret`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adit_tasks.core.archive import ArchiveWriter
from adit_tasks.core.config import FolderNode, SecretSettings, ServerNode, Settings
from adit_tasks.core.errors import ConfigError
from adit_tasks.core.folder import safe_component
from adit_tasks.core.pseudonymize import PseudonymizationOptions, Pseudonymizer
from adit_tasks.core.windows import check_window_text

PSEUDONYM_SECRET_BLOCK = "adit-pseudonym-secret"
ARCHIVE_PASSWORD_BLOCK = "adit-archive-password"


class TransferOptions(BaseModel):
    """How studies are transferred: pseudonymization, trial, archive."""

    model_config = ConfigDict(extra="forbid")

    pseudonymize: bool = Field(False, description="Apply the PS3.15 basic profile "
                               "(implied by a pseudonym or a trial).")
    pseudonym: str = Field("", max_length=64, description="Pseudonym for PatientID/Name; "
                           "empty: derived from the PatientID and the secret.")
    trial_id: str = Field("", max_length=64, description="ClinicalTrialProtocolID")
    trial_name: str = Field("", max_length=64, description="ClinicalTrialProtocolName")
    dates: Literal["shift", "keep", "remove"] = Field(
        "shift", description="Dates when pseudonymizing: shifted per patient, kept, removed.")
    retain_patient_characteristics: bool = Field(False, description="Keep sex, age, size, "
                                                 "weight.")
    retain_device_identity: bool = Field(False, description="Keep device identity.")
    clean_descriptors: bool = Field(True, description="Clean descriptions instead of "
                                    "removing them.")
    allow_burned_in: bool = Field(False, description="Also send images flagged with burned-in "
                                  "annotation.")
    archive: bool = Field(False, description="Write one AES-256 7-Zip archive into the "
                          "destination folder.")
    compress: bool = Field(False, description="LZMA2 inside the archive (slower, smaller).")
    window: str = Field("", description="Transfer window for this run, e.g. 'Mon-Fri "
                        "20:00-06:00; Sat-Sun 00:00-24:00'; empty: the source node's.")
    urgent: bool = Field(False, description="Ignore the transfer window.")

    _window = field_validator("window")(check_window_text)

    @property
    def pseudonymizing(self) -> bool:
        return bool(self.pseudonymize or self.pseudonym or self.trial_id or self.trial_name)


def read_secret(value: Any, block: str) -> str:
    """A secret from the environment (`.env`), else from a Prefect Secret block, else ''."""
    if value is not None:
        return value.get_secret_value()
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(block).get())
    except Exception:  # no such block, or no Prefect server to ask
        return ""


def make_pseudonymizer(options: TransferOptions, source: ServerNode) -> Pseudonymizer | None:
    """The pseudonymizer the options ask for, or None; ConfigError without a secret."""
    if not options.pseudonymizing:
        return None
    secret = read_secret(SecretSettings().pseudonym_secret, PSEUDONYM_SECRET_BLOCK)
    if not secret:
        raise ConfigError("pseudonymization needs a secret: set ADIT_PSEUDONYM_SECRET or "
                          f"the Prefect Secret block '{PSEUDONYM_SECRET_BLOCK}'")
    return Pseudonymizer(secret, PseudonymizationOptions(
        dates=options.dates,
        retain_patient_characteristics=options.retain_patient_characteristics,
        retain_device_identity=options.retain_device_identity,
        clean_descriptors=options.clean_descriptors,
        allow_burned_in=options.allow_burned_in,
        safe_private_creators=frozenset(source.safe_private_creators),
        trial_protocol_id=options.trial_id,
        trial_protocol_name=options.trial_name,
    ))


def archive_name(options: TransferOptions, job: Any) -> str:
    """`<trial or adit>-<job hash>.7z`: the same job always gets the same name (re-runs skip
    it), and the name reveals nothing about the patients."""
    digest = hashlib.sha256(json.dumps([job, options.model_dump()], sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    return f"{safe_component(options.trial_id, 'adit')}-{digest}.7z"


def open_archive(settings: Settings, destination: str, options: TransferOptions,
                 job: Any) -> ArchiveWriter | str | None:
    """The archive writer for this job; the name of its archive if it is already complete;
    None when no archive is wanted."""
    if not options.archive:
        return None
    folder = settings.node(destination)
    if not isinstance(folder, FolderNode):
        raise ConfigError(f"archives are written to folder nodes; '{destination}' is not")
    path = folder.path / archive_name(options, job)
    if path.exists():
        return path.name
    password = read_secret(SecretSettings().archive_password, ARCHIVE_PASSWORD_BLOCK)
    if not password:
        raise ConfigError("archives need a password: set ADIT_ARCHIVE_PASSWORD or the "
                          f"Prefect Secret block '{ARCHIVE_PASSWORD_BLOCK}'")
    return ArchiveWriter(path, password, compress=options.compress)
