"""Per-node limits on the Prefect server, so they hold across runs, workers and machines.

Each server node has a global concurrency limit (`adit-node-<name>`, size `max_associations`)
and, where set, a rate limit (`adit-rate-<name>`, studies per minute). `ensure_node_limits()`
creates or resizes them (idempotent: runs starting at once on a fresh server race safely).

A study (or a chunk of batch queries) holds one slot of each node it talks to for its whole
duration, in one lease for all its nodes (`node_slots`); the connections it uses are built
with `slot_held_by_caller`, so its associations take nothing more. Studies of one process
queue on a local semaphore first, so only contention between processes reaches the server.

Leases are taken through the Prefect REST API with a plain httpx client: Prefect's own client
waits ~2 s before it tries a `503` again, and on SQLite the server answers 503
(SQLITE_BUSY_SNAPSHOT) whenever another write lands between its read and its update; we try
again after milliseconds (19 small studies: 20 s -> 2 s). A crashed holder's slots come back
when its lease expires (LEASE_SECONDS; renewed every LEASE_SECONDS/5 while held).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings

from adit_tasks.core.association import local_slot
from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import ConfigError

logger = logging.getLogger(__name__)

LEASE_SECONDS = 300.0
MAX_POLL_SECONDS = 2.0  # longest wait between tries while a limit is full


def ensure_node_limits(nodes: list[ServerNode]) -> None:
    """Create or resize the Prefect limits of these nodes (safe when runs start at once)."""
    with get_client(sync_client=True) as client:
        for node in nodes:
            _ensure_limit(client, node.limit_name, node.max_associations, 0.0)
            if node.studies_per_minute:
                # A slot per study, decaying at the allowed rate: bursts of at most
                # ceil(rate) studies, then one every 60/rate seconds.
                _ensure_limit(client, node.rate_limit_name,
                              max(1, math.ceil(node.studies_per_minute)),
                              node.studies_per_minute / 60.0)


def _ensure_limit(client: Any, name: str, limit: int, decay: float) -> None:
    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        # Another run may create it at the same moment: whoever loses finds it there.
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                name=name, limit=limit, slot_decay_per_second=decay))
        return
    if (existing.limit != limit or not existing.active
            or decay != (existing.slot_decay_per_second or 0.0)):
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(
            limit=limit, active=True, slot_decay_per_second=decay))


class _LeaseClient:
    """One HTTP client per process (and API URL) for every lease call, and one thread that
    renews every lease held."""

    def __init__(self, api_url: str) -> None:
        api = get_current_settings().api
        headers = {}
        if api.auth_string:
            token = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        elif api.key:
            headers["Authorization"] = f"Bearer {api.key.get_secret_value()}"
        self._http = httpx.Client(base_url=api_url.rstrip("/") + "/", headers=headers,
                                  timeout=api.request_timeout)
        self._leases: set[str] = set()
        self._lock = threading.Lock()
        self._renewer = threading.Thread(target=self._renew_forever, daemon=True,
                                         name="adit-lease-renewer")
        self._renewer.start()

    def acquire(self, names: list[str]) -> str:
        """One lease on a slot of each named limit (all or nothing)."""
        body = {"names": names, "slots": 1, "mode": "concurrency",
                "lease_duration": LEASE_SECONDS}
        lease_id = str(self.take("v2/concurrency_limits/increment-with-lease", names,
                                 body)["lease_id"])
        with self._lock:
            self._leases.add(lease_id)
        return lease_id

    def release(self, lease_id: str) -> None:
        with self._lock:
            self._leases.discard(lease_id)
        response = self._post("v2/concurrency_limits/decrement-with-lease",
                              {"lease_id": lease_id})
        if response.status_code >= 400 and response.status_code != 404:
            logger.warning("could not release a concurrency lease (HTTP %s); it expires "
                           "by itself", response.status_code)

    def take(self, path: str, names: list[str], body: dict[str, Any]) -> Any:
        """POST until the server grants the slots (423: wait as it says, within bounds)."""
        while True:
            response = self._post(path, body)
            if response.status_code == 423:
                time.sleep(min(float(response.headers.get("Retry-After", 1)),
                               MAX_POLL_SECONDS))
                continue
            response.raise_for_status()
            data = response.json()
            limits = data.get("limits") if isinstance(data, dict) else data
            if not limits or len(limits) < len(names):
                raise ConfigError(f"Prefect limit(s) {', '.join(names)} missing "
                                  "(ensure_node_limits creates them when a flow starts)")
            return data

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST, trying again after milliseconds on 503 and on a dropped connection."""
        for attempt in range(200):
            try:
                response = self._http.post(path, json=body)
            except httpx.TransportError:
                if attempt >= 5:
                    raise
                time.sleep(0.1)
                continue
            if response.status_code != 503:
                return response
            time.sleep(min(0.01 * (attempt + 1), 0.25))
        return response

    def _renew_forever(self) -> None:
        while True:
            time.sleep(LEASE_SECONDS / 5)
            with self._lock:
                leases = list(self._leases)
            for lease_id in leases:
                with contextlib.suppress(Exception):  # the next round, or expiry, settles it
                    self._post(f"v2/concurrency_limits/leases/{lease_id}/renew",
                               {"lease_duration": LEASE_SECONDS})


# A documented cache: one lease client per process and Prefect API.
_clients: dict[str, _LeaseClient] = {}
_clients_lock = threading.Lock()


def _lease_client() -> _LeaseClient:
    with get_client(sync_client=True) as client:  # resolves ephemeral mode's server too
        api_url = str(client.api_url)
    with _clients_lock:
        if api_url not in _clients:
            _clients[api_url] = _LeaseClient(api_url)
        return _clients[api_url]


@contextlib.contextmanager
def node_slots(nodes: tuple[ServerNode, ...]) -> Iterator[None]:
    """One slot of each node's limit, in one lease, for as long as the block runs."""
    wanted = sorted({n.limit_name: n for n in nodes}.values(),
                    key=lambda n: n.limit_name)  # one order everywhere: no deadlock
    with contextlib.ExitStack() as stack:
        for node in wanted:
            stack.enter_context(local_slot(node))
        client = _lease_client()
        lease_id = client.acquire([n.limit_name for n in wanted])
        stack.callback(client.release, lease_id)
        yield


@contextlib.contextmanager
def association_slot(node: ServerNode) -> Iterator[None]:
    """A SlotFactory that holds the node's slot per association (CLI queries and echoes)."""
    with node_slots((node,)):
        yield


def take_rate_slot(node: ServerNode) -> None:
    """Wait for a slot of the node's rate limit (studies per minute)."""
    name = node.rate_limit_name
    _lease_client().take("v2/concurrency_limits/increment", [name],
                         {"names": [name], "slots": 1, "mode": "rate_limit"})
