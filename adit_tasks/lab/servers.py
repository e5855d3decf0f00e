"""Real local PACS servers (Orthanc, DCMTK dcmqrscp) for tests, the demo and benchmarks.

Each server gets its own work directory (config, storage, log) and free loopback ports, is
started with ``subprocess.Popen(start_new_session=True)`` and stopped by that PID only.

Quirks found (Orthanc 1.10.1, DCMTK 3.6.7 as packaged by Debian):

* Orthanc 1.10.1 has no bind-address option: HTTP and DICOM listen on all interfaces.
  ``RemoteAccessAllowed: false`` makes the HTTP server refuse non-loopback clients; the DICOM
  port cannot be restricted. Clients here only ever use 127.0.0.1.
* Orthanc is very slow on loopback without ``TcpNoDelay: true`` (set here).
* Orthanc's C-FIND/C-GET/C-MOVE by unknown AEs needs ``DicomAlwaysAllow{Find,Get,Move}``
  (default false); all exist in 1.10.1 (``DicomAlwaysAllowFindWorklist`` too).
  C-MOVE destinations must be in ``DicomModalities`` (config) or be added at runtime with
  ``PUT /modalities/{name}`` (kept in memory as ``DicomModalitiesInDatabase`` is false).
* Orthanc C-GET/C-STORE SCP accepts every transfer syntax in ``AcceptedTransferSyntaxes``
  (set to all ``1.2.840.10008.1.*``); as C-GET/C-MOVE SCP it sends instances as stored when
  the peer accepts that syntax and transcodes otherwise (``TranscodeDicomProtocol``, default
  true; target ``DicomScuPreferredTransferSyntax`` = Explicit VR Little Endian).
* dcmqrscp has no bind-address option either (listens on all interfaces) and no "accept all
  transfer syntaxes" switch in 3.6.7 (no ``+xa``). To accept compressed C-STOREs and to allow
  C-GET (needs SCP/SCU role selection when a profile is used), an association-negotiation
  profile file (``-xf``) is written: storage classes with any transfer syntax (incoming), and
  for C-MOVE sub-associations (outgoing) one presentation context per transfer syntax so that
  compressed files can be sent as stored.
* dcmqrscp 3.6.7 (Debian build) crashes with SIGSEGV in ``DUL_DropAssociation`` after the
  first association when run with ``--single-process``. It is therefore run in its default
  mode (one forked child per association, in the server's own session) and stopped by
  signalling its process group, whose id is the PID we started (children die with it).
* dcmqrscp answers study-level C-FIND without NumberOfStudyRelatedInstances /
  ModalitiesInStudy (not supported keys).
* dcmqrscp sends every C-GET/C-MOVE sub-operation on the *first* accepted presentation context
  of the SOP class and cannot transcode (no codecs registered): compressed files fail
  (0xA702) unless that context has the stored syntax, and a C-GET SCU proposing a compressed
  syntax first gets failures for uncompressed files. Keep data in dcmqrscp uncompressed (the
  synthetic data is Explicit VR Little Endian) or propose Explicit VR Little Endian first.
  Orthanc picks the context matching the stored syntax (or transcodes) - no such problem.
* The readiness probe (bare TCP connect) makes dcmqrscp log one harmless
  "Association Reject Failed ... state 1 event 7" error.
* dcmqrscp quota: at most 500 studies per AE and 1 GB per study (DCMTK limits); when the
  study limit is reached the oldest study is deleted.
* dcmqridx only registers files in ``index.dat``; it does not copy them. :meth:`load` copies
  files into the storage directory first. Indexing works while the server runs (file locks).
* dcmqrscp converts C-FIND answers to the request's character set; with ``+U8`` answers to
  requests without SpecificCharacterSet come as UTF-8 (``ISO_IR 192``), so umlauts survive.
  Orthanc answers in the stored character set (``ISO_IR 100`` for the synthetic data).
* dcmqrscp's C-MOVE destinations (peers) are read from its config at start; adding one means
  restarting it (``stop()``, append to ``peers``, ``start()``; storage and index are kept).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DCMQRSCP_BIN = "dcmqrscp"
DCMQRIDX_BIN = "dcmqridx"


def free_port() -> int:
    """A free TCP port on 127.0.0.1, assigned by the OS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connect to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Peer:
    """Another AE a server must know (C-MOVE destination / allowed caller)."""

    ae_title: str
    host: str
    port: int


class _Process:
    """A server process in its own session, stopped by PID only."""

    #: signal the whole process group (== our PID, own session) to stop forked children too
    stop_group = False

    def __init__(self, name: str, workdir: Path, log_name: str) -> None:
        self.name = name
        self.workdir = Path(workdir).resolve()
        self.log_path = self.workdir / log_name
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} already running (pid {self.proc.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        logger.info("starting %s: %s", self.name, " ".join(cmd))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )

    def _check_alive(self) -> None:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(
                f"{self.name} exited with code {code} during start; log {self.log_path}:\n"
                f"{_log_tail(self.log_path)}"
            )

    def _wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if ready():
                # a port that answers may belong to someone else (port race); make sure our
                # process did not die right after binding failed
                time.sleep(0.1)
                self._check_alive()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"{self.name} not ready after {timeout:.0f}s; log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """Terminate the process by PID, wait, kill if needed."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        logger.info("stopping %s (pid %d)", self.name, proc.pid)
        self._signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not stop, killing", self.name, proc.pid)
            self._signal(proc, signal.SIGKILL)
            proc.wait(timeout=timeout)
        if self.stop_group:  # forked children that outlived the parent
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _signal(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        if self.stop_group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # pgid == pid thanks to start_new_session=True
        else:
            proc.send_signal(sig)


class OrthancServer(_Process):
    """An Orthanc instance with its own storage, on free loopback ports, without auth."""

    host = LOOPBACK

    def __init__(
        self,
        workdir: Path,
        ae_title: str = "ORTHANC",
        dicomweb: bool = True,
        peers: Iterable[Peer] = (),
        name: str = "orthanc",
    ) -> None:
        super().__init__(name, workdir, "orthanc.log")
        self.ae_title = ae_title
        self.dicomweb = dicomweb
        self.peers: list[Peer] = list(peers)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root, e.g. ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.url}/dicom-web"

    @property
    def client(self) -> httpx.Client:
        """A keep-alive HTTP client for the REST API."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60, trust_env=False)
        return self._client

    def config(self) -> dict:
        """The Orthanc configuration written at start."""
        cfg: dict = {
            "Name": self.name,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "WebDavEnabled": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowFindWorklist": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {p.ae_title: [p.ae_title, p.host, p.port] for p in self.peers},
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "MaximumPduLength": 65536,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "UnknownSopClassAccepted": True,
            "TranscodeDicomProtocol": True,
            "DicomScuPreferredTransferSyntax": "1.2.840.10008.1.2.1",
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "StableAge": 2,
            "SaveJobs": False,
            "DefaultEncoding": "Latin1",
        }
        if self.dicomweb:
            cfg["Plugins"] = [DICOMWEB_PLUGIN]
            cfg["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
        return cfg

    def start(self, timeout: float = 30) -> Self:
        """Write the config, start Orthanc and wait until HTTP and DICOM answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        # "TcpNoDelay" covers Orthanc's HTTP side only; its DICOM side is DCMTK, which reads
        # TCP_NODELAY from the environment (without it every C-STORE into Orthanc waits ~40 ms:
        # 6.7 s instead of 0.44 s for 150 instances, benchmarks/transfer.py).
        self._spawn([ORTHANC_BIN, str(config_path)], env={**os.environ, "TCP_NODELAY": "1"})

        def ready() -> bool:
            try:
                ok = self.client.get("/system", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
            return ok and port_open(self.host, self.dicom_port)

        self._wait_ready(ready, timeout)
        logger.info("%s ready: DICOM %s@%s:%d, HTTP %s", self.name, self.ae_title,
                    self.host, self.dicom_port, self.url)
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop Orthanc (by PID) and close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None
        super().stop(timeout)

    def _upload_one(self, path: Path) -> bool:
        resp = self.client.post("/instances", content=Path(path).read_bytes(),
                                headers={"Content-Type": "application/dicom"})
        if resp.status_code != 200:
            logger.warning("upload of %s failed: %s %s", path, resp.status_code, resp.text)
            return False
        return True

    def upload(self, paths: Iterable[Path], workers: int = 4) -> int:
        """Store files via REST ``POST /instances``; returns the number accepted."""
        paths = list(paths)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return sum(pool.map(self._upload_one, paths))

    def add_peer(self, peer: Peer) -> None:
        """Register a DICOM modality at runtime (``PUT /modalities/{ae_title}``)."""
        body = {"AET": peer.ae_title, "Host": peer.host, "Port": peer.port}
        name = urllib.parse.quote(peer.ae_title, safe="")
        self.client.put(f"/modalities/{name}", json=body).raise_for_status()
        self.peers = [p for p in self.peers if p.ae_title != peer.ae_title] + [peer]

    def instance_count(self) -> int:
        """Number of stored instances (from ``/statistics``)."""
        resp = self.client.get("/statistics")
        resp.raise_for_status()
        return int(resp.json()["CountInstances"])

    def clear(self) -> None:
        """Delete all patients."""
        resp = self.client.get("/patients")
        resp.raise_for_status()
        for pid in resp.json():
            self.client.delete(f"/patients/{pid}").raise_for_status()

    def __enter__(self) -> Self:
        return self.start() if not self.running else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# Storage SOP classes handled by the dcmqrscp association profile (DCMTK dictionary names).
_STORAGE_CLASSES = [
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForPresentation", "UltrasoundImageStorage",
    "UltrasoundMultiframeImageStorage", "SecondaryCaptureImageStorage",
    "PositronEmissionTomographyImageStorage", "NuclearMedicineImageStorage",
    "XRayAngiographicImageStorage", "RTImageStorage", "RTDoseStorage",
    "RTStructureSetStorage", "RTPlanStorage", "GrayscaleSoftcopyPresentationStateStorage",
    "BasicTextSRStorage", "EnhancedSRStorage", "ComprehensiveSRStorage",
    "KeyObjectSelectionDocumentStorage", "EncapsulatedPDFStorage",
]
# Transfer syntaxes (DCMTK names): compressed ones first, uncompressed last.
_TRANSFER_SYNTAXES = [
    "JPEGLossless:Non-hierarchical-1stOrderPrediction", "JPEGBaseline",
    "JPEGExtended:Process2+4", "JPEG2000LosslessOnly", "JPEG2000", "JPEGLSLossless",
    "JPEGLSLossy", "RLELossless", "DeflatedLittleEndianExplicit",
    "LocalEndianExplicit", "OppositeEndianExplicit", "LittleEndianImplicit",
]
_UNCOMPRESSED = ["LocalEndianExplicit", "OppositeEndianExplicit", "LittleEndianImplicit"]


def _association_profiles() -> str:
    """DCMTK association negotiation config: 'Incoming' and 'Outgoing' profiles."""
    lines = ["[[TransferSyntaxes]]", "[Any]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(_TRANSFER_SYNTAXES, 1)]
    lines += ["[Uncompressed]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(_UNCOMPRESSED, 1)]
    for i, ts in enumerate(_TRANSFER_SYNTAXES[: -len(_UNCOMPRESSED)], 1):
        lines += [f"[Single{i}]", f"TransferSyntax1 = {ts}"]
    # the profile replaces dcmqrscp's storage contexts *and* Verification (FIND/GET/MOVE stay)
    lines += ["", "[[PresentationContexts]]", "[IncomingContexts]",
              "PresentationContext1 = VerificationSOPClass\\Uncompressed"]
    for n, sop in enumerate(_STORAGE_CLASSES, 2):
        lines.append(f"PresentationContext{n} = {sop}\\Any")
    # Outgoing (C-MOVE sub-association): max 128 contexts; one uncompressed context per
    # class plus one per compressed syntax for CT and MR (the classes used here).
    lines += ["[OutgoingContexts]"]
    n = 0
    for sop in _STORAGE_CLASSES:
        n += 1
        lines.append(f"PresentationContext{n} = {sop}\\Uncompressed")
    for sop in ("CTImageStorage", "MRImageStorage"):
        for i in range(1, len(_TRANSFER_SYNTAXES) - len(_UNCOMPRESSED) + 1):
            n += 1
            lines.append(f"PresentationContext{n} = {sop}\\Single{i}")
    lines += ["", "[[SCPSCURoleSelection]]", "[GetRoles]"]
    lines += [f"Role{i} = {sop}\\BOTH" for i, sop in enumerate(_STORAGE_CLASSES, 1)]
    lines += [
        "", "[[Profiles]]",
        "[Incoming]", "PresentationContexts = IncomingContexts", "SCPSCURoleSelection = GetRoles",
        "[Outgoing]", "PresentationContexts = OutgoingContexts",
    ]
    return "\n".join(lines) + "\n"


class DcmqrscpServer(_Process):
    """A DCMTK dcmqrscp archive (forking per association) with its own storage and index."""

    host = LOOPBACK
    stop_group = True

    def __init__(
        self,
        workdir: Path,
        ae_title: str = "DCMQRSCP",
        peers: Iterable[Peer] = (),
        name: str = "dcmqrscp",
        log_level: str = "warn",
    ) -> None:
        super().__init__(name, workdir, "dcmqrscp.log")
        self.ae_title = ae_title
        self.peers: list[Peer] = list(peers)
        self.port = free_port()
        self.log_level = log_level
        self.storage_dir = self.workdir / "storage"

    def config(self) -> str:
        """The dcmqrscp configuration file text."""
        hosts = [f"peer{i} = ({p.ae_title}, {p.host}, {p.port})"
                 for i, p in enumerate(self.peers, 1)]
        return "\n".join([
            f"NetworkTCPPort = {self.port}",
            "MaxPDUSize = 65536",
            "MaxAssociations = 16",
            "HostTable BEGIN", *hosts, "HostTable END",
            "VendorTable BEGIN", "VendorTable END",
            "AETable BEGIN",
            f"{self.ae_title} {self.storage_dir} RW (500, 1024mb) ANY",
            "AETable END",
        ]) + "\n"

    def _write_config(self) -> Path:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "assoc.cfg").write_text(_association_profiles())
        path = self.workdir / "dcmqrscp.cfg"
        path.write_text(self.config())
        return path

    def start(self, timeout: float = 30) -> Self:
        """Write config and profiles, start dcmqrscp and wait until its port accepts."""
        config_path = self._write_config()
        cmd = [
            DCMQRSCP_BIN, "-c", str(config_path),
            "-xf", str(self.workdir / "assoc.cfg"), "Incoming", "Outgoing",
            "--disable-host-lookup", "+U8", "-ll", self.log_level,
        ]
        self._spawn(cmd, env={**os.environ, "TCP_NODELAY": "1"})
        self._wait_ready(lambda: port_open(self.host, self.port), timeout)
        logger.info("%s ready: %s@%s:%d", self.name, self.ae_title, self.host, self.port)
        return self

    def load(self, paths: Iterable[Path]) -> int:
        """Copy files into the storage directory and index them with dcmqridx."""
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        copied: list[str] = []
        for path in paths:
            target = self.storage_dir / Path(path).name
            if target.exists():
                continue
            shutil.copyfile(path, target)
            copied.append(str(target))
        for i in range(0, len(copied), 500):  # stay well below ARG_MAX
            subprocess.run([DCMQRIDX_BIN, str(self.storage_dir), *copied[i:i + 500]],
                           check=True, capture_output=True, stdin=subprocess.DEVNULL)
        return len(copied)

    def __enter__(self) -> Self:
        return self.start() if not self.running else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
