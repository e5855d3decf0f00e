"""Guarantees about what a peer sends and where it lands (README, "Guarantees").

- Nothing is written outside a destination, whatever UID a peer sends.
- A broken instance is put aside with its reason; the study fails, nothing else is lost.
- A file at the destination counts as present only when it is a DICOM file.
- A study keeps its folder when it grows, and a re-run sends only its new instances.
- Different patients and different studies never share a folder.
- Write errors that will repeat (disk full, too large, no permission) fail at once and leave
  no temporary file.

Peers are in-process pynetdicom SCPs (tests/scp.py) and a small in-process DICOMweb server
that send what we craft; no PACS is mocked.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from adit_tasks.core.association import Connection
from adit_tasks.core.config import RetryPolicy, ServerNode
from adit_tasks.core.errors import IncompleteRetrieval, InvalidData, PermanentError
from adit_tasks.core.find import Study
from adit_tasks.core.folder import unique_component
from adit_tasks.core.plan import Gate, TransferPlan
from adit_tasks.core.results import StudyJob
from adit_tasks.core.retrieve import make_retriever
from adit_tasks.core.sinks import FolderSink
from adit_tasks.core.transfer import study_target, transfer_study
from adit_tasks.lab.servers import free_port
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, make_study
from tests.dicom_builders import to_bytes
from tests.scp import LOOPBACK, MisbehavingSCP

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

HOSTILE_UIDS = ["../../../../outside/x", "/tmp/adit-absolute-escape", "1.2.3/../../escape"]


def _study(tag: str, *series: tuple[str, int]) -> list[Dataset]:
    spec = StudySpec(f"ARRIVE{tag}", "Arrival^Test", "19700101", "20240101", "120000",
                     f"ACC{tag}", "arrival checks",
                     tuple(SeriesSpec(mod, f"series {i}", i + 1, n, rows=16, columns=16)
                           for i, (mod, n) in enumerate(series)))
    return list(make_study(spec))


def _node(port: int, **extra: object) -> ServerNode:
    return ServerNode(name="peer", ae_title="MISBEHAVE", host=LOOPBACK, port=port, timeout=10,
                      **extra)


def _transfer(node: ServerNode, study_uid: str, root: Path, method: str = "c-get") -> object:
    conn = Connection(node, "ADIT")
    plan = TransferPlan(source=conn, retriever=make_retriever(conn, method),
                        sink=FolderSink(root), destination=None, pseudonymizer=None,
                        gate=Gate.of(node), retry=RetryPolicy(0, 0.0))
    return transfer_study(plan, StudyJob(study_uid))


def _files_outside(tmp_path: Path, root: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(root)]


@contextmanager
def _dicomweb(parts: list[bytes]) -> Iterator[str]:
    """A DICOMweb server that answers any WADO-RS request with these multipart parts."""
    boundary = uuid.uuid4().hex

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom"
                            b"\r\n\r\n" + part + b"\r\n" for part in parts)
            body += b"--" + boundary.encode() + b"--\r\n"
            self.send_response(200)
            self.send_header("Content-Type", f'multipart/related; type="application/dicom"; '
                                             f"boundary={boundary}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- nothing outside the destination -------------------------------------------------------


@pytest.mark.parametrize("hostile", HOSTILE_UIDS)
def test_hostile_uid_from_c_get_never_leaves_the_destination(tmp_path, hostile) -> None:
    datasets = _study(f"G{HOSTILE_UIDS.index(hostile)}", ("CT", 3))
    datasets[1].SOPInstanceUID = hostile
    root = tmp_path / "dest"
    with MisbehavingSCP(datasets) as scp, pytest.raises((InvalidData, IncompleteRetrieval)):
        _transfer(_node(scp.port), datasets[0].StudyInstanceUID, root)
    assert _files_outside(tmp_path, root) == []
    assert not Path("/tmp/adit-absolute-escape").exists()
    written = {p.stem for p in root.rglob("*.dcm")}
    assert written == {datasets[0].SOPInstanceUID, datasets[2].SOPInstanceUID}


@pytest.mark.parametrize("hostile", HOSTILE_UIDS)
def test_hostile_uid_from_wado_rs_never_leaves_the_destination(tmp_path, hostile) -> None:
    datasets = _study(f"W{HOSTILE_UIDS.index(hostile)}", ("CT", 3))
    good = [to_bytes(ds) for ds in datasets]
    datasets[1].SOPInstanceUID = hostile
    parts = [good[0], to_bytes(datasets[1]), good[2]]
    root = tmp_path / "dest"
    with MisbehavingSCP(_study(f"W{HOSTILE_UIDS.index(hostile)}", ("CT", 3))) as scp, \
            _dicomweb(parts) as url, pytest.raises(InvalidData, match="SOPInstanceUID"):
        _transfer(_node(scp.port, dicomweb_url=url, retrieve=["wado-rs"]),
                  datasets[0].StudyInstanceUID, root, "wado-rs")
    assert _files_outside(tmp_path, root) == []
    assert len(list(root.rglob("*.dcm"))) == 2  # the good instances arrived, nothing is lost


def test_wado_rs_instance_of_another_study_is_put_aside(tmp_path) -> None:
    ours, other = _study("WS1", ("CT", 2)), _study("WS2", ("CT", 1))
    root = tmp_path / "dest"
    with MisbehavingSCP(ours) as scp, \
            _dicomweb([to_bytes(ours[0]), to_bytes(other[0]), to_bytes(ours[1])]) as url, \
            pytest.raises(InvalidData, match="another study"):
        _transfer(_node(scp.port, dicomweb_url=url, retrieve=["wado-rs"]),
                  ours[0].StudyInstanceUID, root, "wado-rs")
    assert {p.stem for p in root.rglob("*.dcm")} == {ds.SOPInstanceUID for ds in ours}


# --- broken instances ----------------------------------------------------------------------


def test_truncated_pixel_data_is_put_aside_and_the_study_fails(tmp_path) -> None:
    datasets = _study("TR", ("CT", 3))
    datasets[2].PixelData = datasets[2].PixelData[:100]
    root = tmp_path / "dest"
    with MisbehavingSCP(datasets) as scp:
        with pytest.raises(PermanentError, match="PixelData"):
            _transfer(_node(scp.port), datasets[0].StudyInstanceUID, root)
        written = {p.stem for p in root.rglob("*.dcm")}
        assert written == {datasets[0].SOPInstanceUID, datasets[1].SOPInstanceUID}
        # A re-run asks only for what is missing and fails the same way: nothing duplicated.
        with pytest.raises(PermanentError, match="PixelData"):
            _transfer(_node(scp.port), datasets[0].StudyInstanceUID, root)
    assert len(list(root.rglob("*.dcm"))) == 2


def test_empty_file_at_the_destination_is_not_present(tmp_path) -> None:
    datasets = _study("ZB", ("CT", 3))
    root = tmp_path / "dest"
    with MisbehavingSCP(datasets) as scp:
        first = _transfer(_node(scp.port), datasets[0].StudyInstanceUID, root)
        victim = sorted(root.rglob("*.dcm"))[0]
        victim.write_bytes(b"")
        again = _transfer(_node(scp.port), datasets[0].StudyInstanceUID, root)
    assert first.transferred == 3
    assert again.transferred == 1 and again.skipped == 2
    assert pydicom.dcmread(victim).SOPInstanceUID == victim.stem


# --- stable, unique layout -----------------------------------------------------------------


def test_study_that_grows_keeps_its_folder_and_sends_only_new_instances(tmp_path) -> None:
    datasets = _study("GR", ("CT", 3), ("MR", 2))
    ct_only = [ds for ds in datasets if ds.Modality == "CT"]
    root = tmp_path / "dest"
    with MisbehavingSCP(ct_only) as scp:
        first = _transfer(_node(scp.port), datasets[0].StudyInstanceUID, root)
        scp.datasets = datasets  # an MR series (a new modality) is added to the study
        again = _transfer(_node(scp.port), datasets[0].StudyInstanceUID, root)
    assert (first.transferred, again.transferred, again.skipped) == (3, 2, 3)
    study_folders = {p.parent.parent for p in root.rglob("*.dcm")}
    assert len(study_folders) == 1, study_folders


def _study_row(patient_id: str, uid: str, time: str = "") -> Study:
    return Study(patient_id, "Doe^Jane", "19700101", "20240101", time, "CT", "", "", 1, uid)


def test_different_patients_never_share_a_folder() -> None:
    ids = ["12/34", "12 34", "12_34", "12\\34", "ÄÖÜ", "ßß", "..", ""]
    folders = {study_target(_study_row(pid, "1.2.3"), None)[0].folder.parts[0] for pid in ids}
    assert len(folders) == len(ids)
    assert unique_component("12_34") == "12_34"  # readable when nothing had to change
    assert all("/" not in f and f not in (".", "..") for f in folders)


def test_two_studies_of_a_patient_on_one_day_without_time_get_their_own_folders() -> None:
    a = study_target(_study_row("P1", "1.2.3.1"), None)[0].folder
    b = study_target(_study_row("P1", "1.2.3.2"), None)[0].folder
    assert a != b and a.parent == b.parent


# --- write errors --------------------------------------------------------------------------


_WRITE_TOO_LARGE = """
import resource, signal, sys
from pathlib import Path
from adit_tasks.core.folder import write_atomically
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
root = Path(sys.argv[1])
try:
    write_atomically(root, Path("p/s/1.2.3.dcm"), b"x" * 5000)
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_write_error_that_repeats_is_permanent_and_leaves_no_temporary_file(tmp_path) -> None:
    """A real OS refusal (the file size limit: EFBIG, like a full disk ENOSPC) in a child
    process: the error is permanent, its reason is in the message, no .part file stays."""
    out = subprocess.run([sys.executable, "-c", _WRITE_TOO_LARGE, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("DestinationUnwritable"), out.stdout + out.stderr
    assert "File too large" in out.stdout
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
