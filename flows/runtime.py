"""Process set-up shared by the CLI and the flows: offline Prefect, and the server to talk to."""

from __future__ import annotations

import os
import urllib.request

LOCAL_API_URL = "http://127.0.0.1:4200/api"


def prepare_environment() -> None:
    """Switch off telemetry (no internet here, and none wanted in a hospital)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def use_running_server() -> str | None:
    """Point Prefect at a running local server when there is one, else leave ephemeral mode.

    A flow run against a running server starts in ~3 s; ephemeral mode starts a temporary
    server per process (~10 s) and loses late events when it stops.
    """
    prepare_environment()
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    try:
        with urllib.request.urlopen(f"{LOCAL_API_URL}/health", timeout=0.5) as rsp:
            if rsp.status == 200:
                os.environ["PREFECT_API_URL"] = LOCAL_API_URL
                return LOCAL_API_URL
    except OSError:
        pass
    return None
