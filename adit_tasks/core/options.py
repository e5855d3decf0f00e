"""What a user says about a job, declared once for the CLI, the flows and the UI forms.

`StudySearch` holds the search fields (query, study picker, CLI `query`), `TransferOptions`
how studies are moved (every flow that moves studies, CLI `transfer` and `batch-transfer`).
The Prefect UI renders each model as one form section; the CLI turns each field into an
option (its name, or the `cli` name given in the field's extra). Validation happens here,
once, whichever door the values came in by. Secrets are not options: see the settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adit_tasks.core import find
from adit_tasks.core.dates import parse_date_range
from adit_tasks.core.find import validate_uid
from adit_tasks.core.pseudonymize import DEFAULT_TRIAL_SPONSOR, PseudonymizationOptions
from adit_tasks.core.windows import check_window_text


class StudySearch(BaseModel):
    """Which studies to look for. Text fields take DICOM wildcards (* ?)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: str = Field("", max_length=64, description="PatientID (wildcards * ?)")
    patient_name: str = Field("", max_length=324, description="'Last^First' (wildcards * ?)")
    birth_date: str = Field("", description="YYYY-MM-DD, YYYYMMDD or DD.MM.YYYY")
    study_date: str = Field("", description="A date or FROM-UNTIL (open ends allowed)")
    modality: str = Field("", max_length=64, description="e.g. CT, or CT,MR")
    accession: str = Field("", max_length=64, description="AccessionNumber")
    study_uid: str = Field("", description="StudyInstanceUID")

    @field_validator("birth_date")
    @classmethod
    def _birth_date(cls, value: str) -> str:
        return parse_date_range(value, "birth date")[0] if value.strip() else ""

    @field_validator("study_date")
    @classmethod
    def _study_date(cls, value: str) -> str:
        if not value.strip():
            return ""
        start, end = parse_date_range(value, "study date")
        return f"{start}-{end}"

    @field_validator("study_uid")
    @classmethod
    def _uid(cls, value: str) -> str:
        return validate_uid(value, "StudyInstanceUID") if value.strip() else ""

    def query(self, level: Literal["study", "series"] = "study", limit: int = 0) -> find.Query:
        """The C-FIND query for these fields (all values already checked)."""
        dates = tuple(self.study_date.split("-")) if self.study_date else None
        return find.Query(level=find.Level(level.upper()), patient_id=self.patient_id,
                          patient_name=self.patient_name, birth_date=self.birth_date,
                          study_date=dates, modality=self.modality,  # type: ignore[arg-type]
                          accession=self.accession, study_uid=self.study_uid, limit=limit)


class TransferOptions(BaseModel):
    """How studies are transferred: pseudonymization, trial, archive, window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pseudonymize: bool = Field(False, description="Apply the PS3.15 basic profile "
                               "(implied by a pseudonym or a trial).")
    pseudonym: str = Field("", max_length=64, description="Pseudonym for PatientID/Name; "
                           "empty: derived from the PatientID and the secret.")
    trial_id: str = Field("", max_length=64, description="ClinicalTrialProtocolID")
    trial_name: str = Field("", max_length=64, description="ClinicalTrialProtocolName")
    trial_sponsor: str = Field(DEFAULT_TRIAL_SPONSOR, min_length=1, max_length=64,
                               description="ClinicalTrialSponsorName written with a trial "
                               "(Type 1 in the Clinical Trial Subject module).")
    dates: Literal["shift", "keep", "remove"] = Field(
        "shift", description="Dates when pseudonymizing: shifted per patient, kept, removed.")
    retain_patient_characteristics: bool = Field(
        False, description="Keep sex, age, size, weight.",
        json_schema_extra={"cli": "keep-patient-characteristics"})
    retain_device_identity: bool = Field(False, description="Keep device identity.",
                                         json_schema_extra={"cli": "keep-device-identity"})
    clean_descriptors: bool = Field(True, description="Clean descriptions instead of "
                                    "removing them.")
    allow_burned_in: bool = Field(False, description="Also send images flagged with burned-in "
                                  "annotation.")
    archive: bool = Field(False, description="Write one AES-256 7-Zip archive into the "
                          "destination folder (password: ADIT_ARCHIVE_PASSWORD).")
    compress: bool = Field(False, description="LZMA2 inside the archive (slower, smaller).")
    nifti: Literal["no", "only", "also"] = Field(
        "no", description="Each series also (or only) as NIfTI (.nii.gz + JSON sidecar, by "
        "dcm2niix), into a folder or archive.")
    window: str = Field("", description="Transfer window for this run, e.g. 'Mon-Fri "
                        "20:00-06:00; Sat-Sun 00:00-24:00'; empty: the source node's.")
    urgent: bool = Field(False, description="Ignore the transfer window.")

    _window = field_validator("window")(check_window_text)

    @property
    def pseudonymizing(self) -> bool:
        return bool(self.pseudonymize or self.pseudonym or self.trial_id or self.trial_name)

    def pseudonymization(self, safe_private_creators: frozenset[str]) -> PseudonymizationOptions:
        """The pseudonymizer's options for a source with these safe private creators."""
        return PseudonymizationOptions(
            dates=self.dates,
            retain_patient_characteristics=self.retain_patient_characteristics,
            retain_device_identity=self.retain_device_identity,
            clean_descriptors=self.clean_descriptors,
            allow_burned_in=self.allow_burned_in,
            safe_private_creators=safe_private_creators,
            trial_protocol_id=self.trial_id,
            trial_protocol_name=self.trial_name,
            trial_sponsor=self.trial_sponsor,
        )
