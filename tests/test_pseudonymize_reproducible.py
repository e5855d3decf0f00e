"""Declared and reproducible: the same secret gives the same pseudonyms, UIDs, date shifts and
bytes in every Pseudonymizer, every process and for the same data in another encoding."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.pseudonymize import PseudonymizationOptions, Pseudonymizer
from tests.dicom_builders import encoded, identifying_datasets, small_ct_spec, to_bytes

SECRET = "test-secret-of-the-project"
ROOT = Path(__file__).parents[1]


def _study() -> list[Dataset]:
    datasets = list(identifying_datasets(small_ct_spec(instances=2)))
    for ds in datasets:
        ds.OperatorsName = ["Wu^Li", "Nowak^Piotr"]
        ds.ImageComments = "Li Wu, 7 Nov 1962, prior 1.2.826.0.1.3680043.8.498.99.1"
    return datasets


def test_two_pseudonymizers_with_the_same_secret_write_the_same_bytes():
    for options in (PseudonymizationOptions(), PseudonymizationOptions(dates="remove")):
        first, second = Pseudonymizer(SECRET, options), Pseudonymizer(SECRET.encode(), options)
        for ds in _study():
            data = to_bytes(ds)
            a = first.pseudonymize(DicomInstance.from_bytes(data)).data
            b = second.pseudonymize(DicomInstance.from_bytes(data)).data
            assert a == b


def _values(data: bytes) -> list[tuple[str, str]]:
    ds = dcmread(io.BytesIO(data))
    return [(e.keyword or str(e.tag), str(e.value)) for e in ds.iterall()
            if e.VR not in ("SQ", "OB", "OW")]


def _top(data: bytes, keyword: str) -> str:
    return str(dcmread(io.BytesIO(data))[keyword].value)


def test_the_same_data_in_implicit_vr_gives_the_same_pseudonyms_uids_dates_and_text():
    p = Pseudonymizer(SECRET)
    for ds in _study():
        explicit = p.pseudonymize(DicomInstance.from_bytes(encoded(ds, ExplicitVRLittleEndian)))
        implicit = p.pseudonymize(DicomInstance.from_bytes(encoded(ds, ImplicitVRLittleEndian)))
        assert implicit.transfer_syntax_uid == ImplicitVRLittleEndian
        assert _values(explicit.data) == _values(implicit.data)
        assert _top(implicit.data, "PatientID") == p.pseudonym_for(ds.PatientID)
        assert _top(implicit.data, "StudyInstanceUID") == p.uid(ds.StudyInstanceUID)
        assert explicit.sop_instance_uid == implicit.sop_instance_uid == p.uid(ds.SOPInstanceUID)
        assert "Li" not in _top(implicit.data, "ImageComments")


def test_padding_and_case_of_the_input_do_not_change_the_output_identity():
    """A PACS that pads UIDs with NUL and IDs with spaces is the same patient and study."""
    p = Pseudonymizer(SECRET)
    ds = _study()[0]
    plain = p.pseudonymize(DicomInstance.from_bytes(to_bytes(ds)))
    ds.PatientID = ds.PatientID + " "
    padded = p.pseudonymize(DicomInstance.from_bytes(to_bytes(ds)))
    assert _top(plain.data, "PatientID") == _top(padded.data, "PatientID")
    assert plain.study_uid == padded.study_uid


_CHILD = """
import hashlib, sys
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.pseudonymize import Pseudonymizer
p = Pseudonymizer(sys.argv[1])
digest = hashlib.sha256()
for path in sys.argv[2:]:
    digest.update(p.pseudonymize(DicomInstance.from_bytes(open(path, "rb").read())).data)
print(digest.hexdigest())
"""


def test_every_process_writes_the_same_bytes_whatever_its_hash_seed(tmp_path):
    paths = []
    for i, ds in enumerate(_study()):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(to_bytes(ds))
        paths.append(str(path))
    here = hashlib.sha256()
    p = Pseudonymizer(SECRET)
    for path in paths:
        here.update(p.pseudonymize(DicomInstance.from_bytes(Path(path).read_bytes())).data)
    digests = set()
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", _CHILD, SECRET, *paths], env=env,
                             capture_output=True, text=True, check=True, cwd=ROOT)
        digests.add(out.stdout.strip())
    assert digests == {here.hexdigest()}
