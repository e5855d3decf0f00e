"""The test lab: real Orthanc and DCMTK servers on free loopback ports, one Prefect server.

Everything here is session-scoped and started once: two Orthanc servers (the source with the
DICOMweb plugin), one dcmqrscp, loaded with one 150-instance CT study, a few small demo
patients and pydicom's sample files in several transfer syntaxes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from adit_tasks.core.association import Connection
from adit_tasks.core.config import RetrieveMethod, Settings, load_settings
from adit_tasks.core.receiver import Receiver, open_receiver
from adit_tasks.core.retrieve import Retriever, make_retriever
from adit_tasks.lab.servers import DcmqrscpServer, OrthancServer, Peer, free_port
from adit_tasks.lab.synthetic import (
    SeriesSpec,
    StudySpec,
    ct_study_spec,
    demo_specs,
    make_study,
    uid_for,
    write_study,
)

# pydicom sample files in compressed transfer syntaxes (shipped with pydicom, no download).
SAMPLE_FILES = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "CT_small.dcm"]


@dataclass
class Lab:
    root: Path
    receiver_port: int
    orthanc1: OrthancServer
    orthanc2: OrthancServer
    dcmqrscp: DcmqrscpServer
    ct: StudySpec
    ct_files: list[Path]
    demo: list[StudySpec]
    samples: list[Path]
    burned_in: StudySpec  # one of its instances is flagged BurnedInAnnotation = YES
    nodes_file: Path

    def settings(self, **overrides: object) -> Settings:
        return load_settings(self.nodes_file).model_copy(update=overrides)

    def nodes_file_in(self, tmp_path: Path, *extra_nodes: dict) -> str:
        """A copy of the lab's nodes file whose `downloads` folder is tmp_path/downloads,
        with `extra_nodes` added; its path."""
        config = yaml.safe_load(self.nodes_file.read_text())
        for node in config["nodes"]:
            if node["name"] == "downloads":
                node["path"] = str(tmp_path / "downloads")
        config["nodes"] += list(extra_nodes)
        path = tmp_path / "nodes.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def connection(self, name: str, settings: Settings | None = None) -> Connection:
        settings = settings or self.settings()
        return Connection(settings.server(name), settings.ae_title)

    @contextlib.contextmanager
    def retriever(self, name: str, method: RetrieveMethod,
                  settings: Settings | None = None) -> Iterator[Retriever]:
        """A retriever of the node by `method`; for C-MOVE with a receiver for the block."""
        settings = settings or self.settings()
        with contextlib.ExitStack() as stack:
            receiver = stack.enter_context(open_receiver(
                settings.ae_title, settings.receiver_host, settings.receiver_port,
            )) if method == "c-move" else None
            yield make_retriever(self.connection(name, settings), method, receiver)


def write_nodes_file(path: Path, receiver_port: int, o1: OrthancServer, o2: OrthancServer,
                     dq: DcmqrscpServer, folder: Path) -> None:
    config = {
        "ae_title": "ADIT",
        "receiver_port": receiver_port,
        "retry_delay_seconds": 0.2,
        "retries": 2,
        "nodes": [
            {"name": "orthanc1", "ae_title": o1.ae_title, "host": "127.0.0.1",
             "port": o1.dicom_port, "dicomweb_url": o1.dicomweb_url,
             "retrieve": ["c-get", "c-move", "wado-rs"], "max_associations": 4, "timeout": 20},
            {"name": "orthanc2", "ae_title": o2.ae_title, "host": "127.0.0.1",
             "port": o2.dicom_port, "max_associations": 4, "timeout": 20},
            {"name": "dcmqrscp", "ae_title": dq.ae_title, "host": "127.0.0.1", "port": dq.port,
             "retrieve": ["c-get", "c-move"], "max_associations": 4, "timeout": 20},
            {"name": "downloads", "path": str(folder)},
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab")
    receiver_port = free_port()
    adit = Peer("ADIT", "127.0.0.1", receiver_port)
    ct = ct_study_spec(150)
    ct_files = write_study(ct, root / "ct")
    demo = demo_specs(n_patients=3, seed=7)
    demo_files = [p for spec in demo for p in write_study(spec, root / "demo")]
    samples = []
    (root / "samples").mkdir()
    for name in SAMPLE_FILES:
        # Several samples share UIDs; give each its own study so the PACS keeps them all.
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = uid_for("sample-study", name)
        ds.SeriesInstanceUID = uid_for("sample-series", name)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid_for("sample", name)
        target = root / "samples" / name
        ds.save_as(target, enforce_file_format=True)
        samples.append(target)
    burned_in = StudySpec("BURN0001", "Brenner^Anna", "19800101", "20230101", "090000",
                          "ACCBURN1", "US Abdomen", (SeriesSpec("CT", "screens", 1, 4, 32, 32),))
    burned_files = []
    for i, ds in enumerate(make_study(burned_in)):
        ds.BurnedInAnnotation = "YES" if i == 0 else "NO"
        path = root / "burned" / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        burned_files.append(path)
    o1 = OrthancServer(root / "orthanc1", ae_title="ORTHANC1", dicomweb=True, peers=[adit])
    o2 = OrthancServer(root / "orthanc2", ae_title="ORTHANC2", dicomweb=False, peers=[adit])
    dq = DcmqrscpServer(root / "dcmqrscp", ae_title="DCMQR", peers=[adit])
    started = []
    try:
        for server in (o1, o2, dq):
            server.start()
            started.append(server)
        o1.upload([*ct_files, *demo_files, *samples, *burned_files])
        dq.load([*ct_files, *demo_files])  # dcmqrscp cannot serve compressed files (see lab)
        nodes_file = root / "nodes.yaml"
        write_nodes_file(nodes_file, receiver_port, o1, o2, dq, root / "downloads")
        yield Lab(root, receiver_port, o1, o2, dq, ct, ct_files, demo, samples, burned_in,
                  nodes_file)
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server (SQLite) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A C-MOVE receiver of our own on a free loopback port, stopped after the test."""
    rcv = Receiver("ADIT", "127.0.0.1", free_port()).start()
    try:
        yield rcv
    finally:
        rcv.stop()


def read_pixels(path_or_bytes: Path | bytes) -> bytes:
    import io

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return pydicom.dcmread(src).PixelData
