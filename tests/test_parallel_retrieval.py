"""One study over parallel associations: complete, byte-exact, and never above the node's
`max_associations`; the choice of retrieval method; background flushes of folder writes."""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from adit_tasks.core import find, get
from adit_tasks.core.association import Connection, local_slot, slot_held_by_caller
from adit_tasks.core.config import ServerNode
from adit_tasks.core.dicomweb import iter_multipart
from adit_tasks.core.errors import InvalidInstance
from adit_tasks.core.folder import FolderWriter
from adit_tasks.core.get import get_study
from adit_tasks.core.retrieve import choose_method
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, make_study
from tests.scp import LOOPBACK, MisbehavingSCP

_names = itertools.count()


def _node(port: int, ae_title: str, max_associations: int, **extra: object) -> ServerNode:
    """A node with a name of its own, so its own process-local slots."""
    return ServerNode(name=f"parallel-{next(_names)}", ae_title=ae_title, host=LOOPBACK,
                      port=port, max_associations=max_associations, timeout=20, **extra)


def _instances(conn: Connection, study_uid: str) -> tuple[dict[str, str], set[str]]:
    listed = find.manifest(conn, study_uid)
    return ({uid: i.SeriesInstanceUID for uid, i in listed.instances.items()},
            listed.sop_classes)


@pytest.mark.parametrize("server", ["orthanc1", "dcmqrscp"])
def test_a_study_over_two_associations_arrives_complete_and_byte_exact(lab, server,
                                                                        caplog) -> None:
    """The lab's 150-instance CT series, cut into image-level lists over two associations:
    every instance once, its Part 10 data set bytes exactly as stored."""
    node = lab.settings().server(server).model_copy(update={"max_associations": 2,
                                                            "name": f"{server}-two"})
    conn = Connection(node, "ADIT")
    instances, classes = _instances(conn, lab.ct.study_uid)
    originals = [_data_set(p.read_bytes()) for p in lab.ct_files]
    with caplog.at_level(logging.INFO, logger="adit_tasks.core.get"):
        with get_study(conn, lab.ct.study_uid, sop_classes=classes,
                       instances=instances) as stream:
            got = {i.sop_instance_uid: _data_set(i.data) for i in stream}
        assert not stream.rejected
    assert "C-GET over 2 associations" in caplog.text
    assert set(got) == set(instances) and len(got) == 150
    assert sorted(got.values()) == sorted(originals)


def _data_set(part10: bytes) -> bytes:
    """The bytes after the file meta, whose group length is its first element (PS3.10 7.1):
    the PACS writes its own file meta, never another data set."""
    return part10[144 + int.from_bytes(part10[140:144], "little"):]


def _study(n: int, series: int = 1) -> tuple[str, list]:
    spec = StudySpec("PARPAT01", "Parallel^Test", "19700101", "20240101", "120000", "PAR1",
                     "CT", tuple(SeriesSpec("CT", f"s{i}", i + 1, n // series, rows=8, columns=8)
                                 for i in range(series)))
    return spec.study_uid, list(make_study(spec))


def _drain(conn: Connection, study_uid: str) -> dict[str, str]:
    """The study by C-GET as transfer_study asks for it: with the classes and instances of
    its image-level C-FIND."""
    instances, classes = _instances(conn, study_uid)
    with get_study(conn, study_uid, sop_classes=classes, instances=instances) as stream:
        got = {i.sop_instance_uid: i.transfer_syntax_uid for i in stream}
    assert not stream.rejected
    return got


@pytest.fixture
def small_shares(monkeypatch) -> None:
    """Parallel associations from 4 instances each, so that small studies show them."""
    monkeypatch.setattr(get, "MIN_PER_ASSOCIATION", 4)


@pytest.mark.parametrize("limit", [1, 2])
def test_the_node_limit_holds_inside_one_study(limit, small_shares) -> None:
    """12 instances of one series: with max_associations 2 the study takes a second
    association (image-level lists); with 1 it never has two at once."""
    study_uid, datasets = _study(12)
    with MisbehavingSCP(datasets, delay_per_instance=0.02) as scp:
        conn = Connection(_node(scp.port, scp.ae_title, limit), "ADIT")
        got = _drain(conn, study_uid)
        assert got == {str(ds.SOPInstanceUID): ExplicitVRLittleEndian for ds in datasets}
        assert scp.max_concurrent == limit
        levels = {str(r.QueryRetrieveLevel) for r in scp.get_requests}
        assert levels == ({"IMAGE"} if limit == 2 else {"STUDY"})


def test_slots_held_elsewhere_are_not_taken(small_shares) -> None:
    """Another study of the process holds one of the node's two slots: this one runs on one
    association, and spare slots are never taken from a caller-held connection without a
    factory that knows the caller's limits."""
    study_uid, datasets = _study(12, series=2)
    with MisbehavingSCP(datasets, delay_per_instance=0.02) as scp:
        node = _node(scp.port, scp.ae_title, 2)
        with local_slot(node):  # the other study
            assert len(_drain(Connection(node, "ADIT"), study_uid)) == 12
        assert scp.max_concurrent == 1
        held = Connection(node, "ADIT", slot_held_by_caller)
        assert len(_drain(held, study_uid)) == 12
        assert scp.max_concurrent == 1


def test_spare_slots_on_the_prefect_server_are_only_taken_when_free(prefect_server) -> None:
    """`limits.spare_node_slot`: a slot held by another machine (a lease without this
    process's semaphore) counts; a spare is taken only while one more stays free for others
    (the leases of a killed study outlive it)."""
    from adit_tasks.limits import _lease_client, ensure_node_limits, node_slots, spare_node_slot

    node = ServerNode(name=f"spare-{next(_names)}", ae_title="X", host=LOOPBACK, port=1,
                      max_associations=3)
    ensure_node_limits([node])
    other_machine = _lease_client().acquire([node.limit_name])
    with node_slots((node,)):
        with spare_node_slot(node) as taken:
            assert taken is False  # 2 of 3 held: the last one stays free
        _lease_client().release(other_machine)
        with spare_node_slot(node) as taken:
            assert taken is True
            with spare_node_slot(node) as third:
                assert third is False
            with node_slots((node,)):  # another study still gets its slot
                pass


@pytest.mark.parametrize("listed,dicomweb,expected", [
    (None, True, "wado-rs"),
    (None, False, "c-get"),
    (["c-move", "wado-rs"], True, "c-move"),
    (["c-get", "wado-rs"], True, "c-get"),
])
def test_the_fastest_method_unless_the_nodes_file_says(listed, dicomweb, expected) -> None:
    fields: dict[str, object] = {"dicomweb_url": "http://127.0.0.1:1/dicom-web"} if dicomweb else {}
    if listed is not None:
        fields["retrieve"] = listed
    node = _node(1, "PACS", 1, **fields)
    assert choose_method(node, None) == expected
    assert choose_method(node, node.retrieve[-1]) == node.retrieve[-1]  # named: that one


def test_folder_writer_writes_every_file_whole_and_hashes_it(tmp_path) -> None:
    writer = FolderWriter(tmp_path)
    writer.MAX_PENDING_BYTES = 5000  # a slow disk: the writer waits instead of queueing
    relatives = [Path("s") / f"{i}.dcm" for i in range(30)]
    for i, relative in enumerate(relatives):
        writer.write(relative, bytes([i]) * 1000)
    digests = writer.finish()
    paths = sorted((tmp_path / "s").iterdir())
    assert [p.name for p in paths] == sorted(r.name for r in relatives)  # no .part left
    assert all(p.read_bytes() == bytes([int(p.stem)]) * 1000 for p in paths)
    assert digests == {r: hashlib.sha256(bytes([int(r.stem)]) * 1000).hexdigest()
                       for r in relatives}


def test_folder_writer_refuses_paths_out_of_its_root(tmp_path) -> None:
    root, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "link").symlink_to(outside)
    writer = FolderWriter(root)
    for relative in (Path("../x.dcm"), Path("a/../../x.dcm"), Path("/tmp/x.dcm"),
                     Path("link/x.dcm"), Path("link/new/deeper/x.dcm")):
        with pytest.raises(ValueError, match="outside the destination"):
            writer.write(relative, b"data")
    assert writer.finish() == {}
    assert list(outside.iterdir()) == []  # not even a folder was created there


def test_folder_writer_same_name_twice_keeps_the_later_bytes_and_their_digest(tmp_path) -> None:
    for _ in range(20):
        writer = FolderWriter(tmp_path)
        for i in range(5):  # the first the largest: its write would finish last
            writer.write(Path("s/x.dcm"), bytes([i]) * (4_000_000 // (i + 1)))
        digests = writer.finish()
        data = (tmp_path / "s" / "x.dcm").read_bytes()
        assert data == bytes([4]) * 800_000
        assert digests == {Path("s/x.dcm"): hashlib.sha256(data).hexdigest()}


def test_multipart_parts_come_out_whole_however_the_stream_is_cut() -> None:
    """WADO-RS answers are parsed as a stream: a delimiter split over two chunks, or a body
    that nearly contains the delimiter, is still found exactly."""
    boundary = b"adit-b0undary"
    rng = random.Random(13)
    parts = [rng.randbytes(rng.randint(0, 3000)) + b"\r\n--adit-b0undar" for _ in range(12)]
    body = b"".join(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p
                    + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(0, 40)))
        chunks = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert list(iter_multipart(iter(chunks), boundary)) == parts


def test_a_part_without_its_delimiter_cannot_fill_the_memory() -> None:
    """A hostile DICOMweb server that starts a part and never ends it: the parser stops at
    the bound, having held at most one bound's worth of the endless stream."""
    boundary = b"adit-b0undary"
    fed = 0

    def endless() -> Iterator[bytes]:
        nonlocal fed
        yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
        while True:
            fed += 4096
            yield b"\0" * 4096

    with pytest.raises(InvalidInstance, match="exceeds 65536 bytes"):
        list(iter_multipart(endless(), boundary, max_part=65536))
    assert fed <= 65536 + 2 * 4096
