"""Where settings come from, and what a mistake in each source says (no servers needed)."""

from __future__ import annotations

import pytest

from adit_tasks.core.config import load_settings
from adit_tasks.core.errors import ConfigError

NODES = "nodes:\n  - {name: out, path: out}\n"


def test_env_file_with_secrets_is_accepted_and_hides_them(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ADIT_PSEUDONYM_SECRET=s3cret-key\n"
                                   "ADIT_ARCHIVE_PASSWORD=pw-123\nOTHER_TOOL_SETTING=1\n")
    (tmp_path / "nodes.yaml").write_text(NODES)
    settings = load_settings(tmp_path / "nodes.yaml")
    assert settings.pseudonym_secret.get_secret_value() == "s3cret-key"
    assert settings.archive_password.get_secret_value() == "pw-123"
    assert "s3cret-key" not in repr(settings) and "pw-123" not in repr(settings)


def test_unknown_key_in_env_file_names_the_environment_not_the_nodes_file(
        tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ADIT_RECIEVER_PORT=11150\nPREFECT_API_URL=x\n")  # a typo
    (tmp_path / "nodes.yaml").write_text(NODES)
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path / "nodes.yaml")
    message = str(err.value)
    assert "the environment or .env" in message and "ADIT_RECIEVER_PORT" in message
    assert "nodes.yaml" not in message


def test_secrets_in_the_nodes_file_are_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nodes.yaml").write_text(NODES + "pseudonym_secret: in-the-file\n")
    with pytest.raises(ConfigError, match="secrets are not read from the nodes file"):
        load_settings(tmp_path / "nodes.yaml")


def test_explicit_nodes_file_wins_over_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("nodes:\n  - {name: from-a, path: a}\n")
    (tmp_path / "b.yaml").write_text("nodes:\n  - {name: from-b, path: b}\n")
    monkeypatch.setenv("ADIT_NODES_FILE", str(tmp_path / "a.yaml"))
    settings = load_settings(tmp_path / "b.yaml")
    assert [n.name for n in settings.nodes] == ["from-b"]
    assert settings.nodes_file == tmp_path / "b.yaml"
