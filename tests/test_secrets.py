"""Secrets come from the environment or .env, else from a Prefect Secret block on a server the
configuration names, never from a server that merely answered on a local port."""

from __future__ import annotations

import os

import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL, temporary_settings

from adit_tasks.core.config import load_settings
from adit_tasks.core.options import TransferOptions
from adit_tasks.secrets import PSEUDONYM_SECRET_BLOCK, read_secrets


@pytest.fixture
def secret_block(prefect_server):
    Secret(value="from-the-block").save(PSEUDONYM_SECRET_BLOCK, overwrite=True)
    yield
    Secret.delete(PSEUDONYM_SECRET_BLOCK)


def _settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env from elsewhere
    monkeypatch.delenv("ADIT_PSEUDONYM_SECRET", raising=False)
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("nodes: []\n")
    return load_settings(nodes)


def test_secret_block_is_read_from_a_named_server(secret_block, prefect_server, tmp_path,
                                                  monkeypatch) -> None:
    settings = _settings(tmp_path, monkeypatch)
    assert os.environ["PREFECT_API_URL"] == prefect_server  # named by the environment
    secrets = read_secrets(settings, TransferOptions(pseudonymize=True))
    assert secrets.pseudonym_secret == "from-the-block"


def test_secret_block_is_not_read_from_a_server_found_by_looking(secret_block, prefect_server,
                                                                 tmp_path, monkeypatch) -> None:
    settings = _settings(tmp_path, monkeypatch)
    monkeypatch.delenv("PREFECT_API_URL")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):  # as the CLI finds one
        secrets = read_secrets(settings, TransferOptions(pseudonymize=True))
    assert secrets.pseudonym_secret == ""


def test_environment_wins_and_unneeded_secrets_are_not_read(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ADIT_PSEUDONYM_SECRET=from-dotenv\n"
                                   "ADIT_ARCHIVE_PASSWORD=pw-from-dotenv\n")
    monkeypatch.delenv("ADIT_PSEUDONYM_SECRET", raising=False)
    monkeypatch.delenv("ADIT_ARCHIVE_PASSWORD", raising=False)
    (tmp_path / "nodes.yaml").write_text("nodes: []\n")
    settings = load_settings(tmp_path / "nodes.yaml")
    both = read_secrets(settings, TransferOptions(pseudonymize=True, archive=True))
    assert (both.pseudonym_secret, both.archive_password) == ("from-dotenv", "pw-from-dotenv")
    none = read_secrets(settings, TransferOptions())
    assert (none.pseudonym_secret, none.archive_password) == ("", "")
    assert "from-dotenv" not in repr(settings) and "from-dotenv" not in repr(both)
