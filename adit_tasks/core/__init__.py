"""The Prefect-free core of ADIT: DICOM protocol, pseudonymization, destinations, batch files,
windows and planners, as plain Python. It never imports Prefect (enforced by the import
contract in pyproject.toml, checked by `make test`).

The one process-wide setting ADIT makes, here so that every process that uses the core (CLI,
`adit serve`, a worker's flow run, a test) has it: pydicom must not print values of the data
it reads. Its validation warnings quote the value ("Invalid value for VR IS: '<value>'", an
unknown SpecificCharacterSet), which puts patient data into logs and terminal output. ADIT
checks values itself where they enter (instances.py, find.py, raw.py), so pydicom's reading
validation is off and its value warnings are dropped.
"""

import logging as _logging
import warnings as _warnings

from pydicom import config as _pydicom_config

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
_warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
_logging.getLogger("pydicom").setLevel(_logging.ERROR)
