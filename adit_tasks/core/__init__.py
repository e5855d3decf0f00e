"""The Prefect-free core of ADIT: DICOM protocol, pseudonymization, destinations, batch files,
windows and planners, as plain Python. It never imports Prefect (enforced by the import
contract in pyproject.toml, checked by `make test`).
"""
