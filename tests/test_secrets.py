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


def test_cli_uses_only_a_prefect_3_server_it_finds(prefect_server) -> None:
    """Something else answering /health on the local port is not taken for a Prefect server
    (the CLI would run flows and read Secret blocks there)."""
    import http.server
    import threading

    from adit_tasks.lab.servers import free_port
    from flows.runtime import server_healthy

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'"2.0.0"' if self.path.endswith("/admin/version") else b"true"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert not server_healthy(f"http://127.0.0.1:{server.server_address[1]}/api")
    finally:
        server.shutdown()
        server.server_close()
    assert server_healthy(prefect_server)
