"""The CLI's options are made from the models (StudySearch, TransferOptions): every field has
its option on every command that takes the model, values arrive as one validated instance,
and a bad value is exit code 2 with one line naming the option. No servers needed."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from adit_tasks.core.options import StudySearch, TransferOptions
from deployments.cli import app
from deployments.model_options import model_options, option_name

runner = CliRunner()

# The flags users and scripts already type: they must keep working.
TRANSFER_FLAGS = {"--pseudonymize", "--pseudonym", "--trial-id", "--trial-name", "--dates",
                  "--keep-patient-characteristics", "--keep-device-identity",
                  "--no-clean-descriptors", "--allow-burned-in", "--archive", "--compress"}
SEARCH_FLAGS = {"--patient-id", "--patient-name", "--birth-date", "--study-date",
                "--modality", "--accession", "--study-uid"}


def flags(command: str) -> set[str]:
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {flag for p in params for flag in [*p.opts, *p.secondary_opts]}


@pytest.mark.parametrize("command", ["transfer", "batch-transfer"])
def test_transfer_commands_take_every_transfer_option_and_method(command) -> None:
    have = flags(command)
    assert have >= TRANSFER_FLAGS
    for field, info in TransferOptions.model_fields.items():
        assert f"--{option_name(field, info)}" in have, field
    assert "--method" in have


def test_query_takes_every_search_field() -> None:
    have = flags("query")
    assert have >= SEARCH_FLAGS
    for field, info in StudySearch.model_fields.items():
        assert f"--{option_name(field, info)}" in have, field


def _probe() -> tuple[typer.Typer, dict[str, Any]]:
    """An app whose one command records what it received."""
    got: dict[str, Any] = {}
    probe = typer.Typer()

    @probe.command()
    @model_options("options", TransferOptions)
    def run(name: Annotated[str, typer.Argument()], options: TransferOptions,
            method: Annotated[str, typer.Option()] = "") -> None:
        got.update(name=name, options=options, method=method)

    return probe, got


def test_values_arrive_as_one_validated_model() -> None:
    probe, got = _probe()
    result = runner.invoke(probe, ["x", "--pseudonym", "P-1", "--dates", "remove",
                                   "--keep-device-identity", "--no-clean-descriptors",
                                   "--archive", "--compress", "--method", "c-get"])
    assert result.exit_code == 0, result.output
    assert got["name"] == "x" and got["method"] == "c-get"
    assert got["options"] == TransferOptions(
        pseudonym="P-1", dates="remove", retain_device_identity=True, clean_descriptors=False,
        archive=True, compress=True)
    runner.invoke(probe, ["y"])
    assert got["options"] == TransferOptions()  # the model's defaults are the options'


@pytest.mark.parametrize("args,line", [
    (["--window", "whenever"], "error: --window: transfer window 'whenever'"),
    (["--pseudonym", "P" * 65], "error: --pseudonym: String should have at most 64"),
])
def test_invalid_values_are_exit_2_with_one_line_naming_the_option(args, line) -> None:
    probe, got = _probe()
    result = runner.invoke(probe, ["x", *args])
    assert result.exit_code == 2
    assert not got  # the command did not run
    assert result.output.strip().splitlines()[0].startswith(line), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_validators_own_error_names_its_option() -> None:
    """StudySearch's validators raise InvalidInput (not a pydantic error): still the option."""
    got: dict[str, Any] = {}
    probe = typer.Typer()

    @probe.command()
    @model_options("search", StudySearch)
    def find(search: StudySearch) -> None:
        got["search"] = search

    result = runner.invoke(probe, ["--patient-id", "P1", "--study-uid", "1.2.abc"])
    assert result.exit_code == 2 and not got
    assert result.output.startswith("error: --study-uid: invalid StudyInstanceUID (7 characters")
    assert "1.2.abc" not in result.output
    ok = runner.invoke(probe, ["--patient-id", "P1", "--study-date", "2020-01-01-"])
    assert ok.exit_code == 0, ok.output
    assert got["search"] == StudySearch(patient_id="P1", study_date="2020-01-01-")
