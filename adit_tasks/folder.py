"""Writing instances into a folder: one file per instance in a readable tree, atomically.

Each file is written under a temporary name in its final folder and renamed when complete,
so a crash never leaves a half-written file under a name that looks finished.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread

from adit_tasks.instances import DicomInstance
from adit_tasks.store import StoreResult

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str, fallback: str = "unknown", max_len: int = 64) -> str:
    """A path component with only letters, digits, dot, dash and underscore."""
    cleaned = _UNSAFE.sub("_", text.strip()).strip("._")[:max_len]
    return cleaned or fallback


def study_path(instance: DicomInstance) -> Path:
    """`<PatientID>/<StudyDate>-<StudyTime>-<Modality>/<SeriesNumber>-<SeriesDescription>/`."""
    ds = dcmread(io.BytesIO(instance.data), stop_before_pixels=True,
                 specific_tags=["PatientID", "StudyDate", "StudyTime", "Modality",
                                "SeriesNumber", "SeriesDescription"])
    study = "-".join([
        safe_component(str(ds.get("StudyDate", "")), "nodate"),
        safe_component(str(ds.get("StudyTime", "")).split(".")[0], "notime"),
        safe_component(str(ds.get("Modality", "")), "OT"),
    ])
    series = "-".join([
        safe_component(str(ds.get("SeriesNumber", "")), "0"),
        safe_component(str(ds.get("SeriesDescription", "")), "series"),
    ])
    return Path(safe_component(str(ds.get("PatientID", "")), "nopatient")) / study / series


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_instances(folder: Path, instances: Iterable[DicomInstance]) -> StoreResult:
    """Write each instance to `folder/<tree>/<SOPInstanceUID>.dcm`."""
    result = StoreResult()
    for instance in instances:
        target = folder / study_path(instance) / f"{instance.sop_instance_uid}.dcm"
        write_atomically(target, instance.data)
        result.stored.append(instance.sop_instance_uid)
    return result
