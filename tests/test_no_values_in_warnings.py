"""Leak 8 of the privacy review: library warnings must not print values (patient data).

pydicom quotes an invalid value in its warnings ("Invalid value for VR IS: '<value>'"); a
Patient ID stored in an IS attribute then reached the command's output and log. A fresh
process imports the core as every ADIT process does, reads such an instance through the paths
ADIT uses, and prints nothing that holds the value."""

from __future__ import annotations

import subprocess
import sys
import textwrap

MARKER = "ZYXPID9931"

SCRIPT = textwrap.dedent(f"""
    import io, logging, warnings
    logging.basicConfig(level=logging.DEBUG)
    warnings.simplefilter("always")
    import adit_tasks.core  # the process-wide setting lives here
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from adit_tasks.core.instances import DicomInstance
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    ds = dcmread(io.BytesIO(data))
    ds.add_new(0x00200011, "IS", "0")           # SeriesNumber, rewritten raw below
    ds.add_new(0x00180088, "DS", "0")           # SpacingBetweenSlices
    out = io.BytesIO(); ds.save_as(out, enforce_file_format=True)
    raw = out.getvalue().replace(b"IS\\x02\\x000 ", b"IS\\x0a\\x00{MARKER}")
    instance = DicomInstance.from_bytes(raw)
    full = instance.dataset
    print("series", len(str(full.get("SeriesNumber", ""))))
""")


def test_invalid_values_are_never_printed_by_pydicom() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "series" in out.stdout
    assert MARKER not in out.stdout + out.stderr
