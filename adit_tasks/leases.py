"""Per-node limits held on the Prefect server, so they hold across runs, workers and machines.

Every association holds a slot of its node's global concurrency limit (`adit-node-<name>`).
A study (or a chunk of batch queries) takes one slot per node for its whole duration, in one
lease for all its nodes; its associations, opened one after the other per node, see the slot
held (a context variable) and take no other. Studies of one process queue on a local
semaphore first, so only contention between processes reaches the server.

Leases are taken through the server's API directly, with one client per process and one
thread renewing every lease held: Prefect's `concurrency()` cost ~2 s per acquisition inside a
task run here (3.9.1). On SQLite the server answers 503 (SQLITE_BUSY_SNAPSHOT) whenever another
write lands between its read and its update, and Prefect's client then waits 2 s before trying
again; `_post` tries again after milliseconds. A crashed holder's slots come back when its
lease expires (LEASE_SECONDS).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from adit_tasks.core.association import local_slot
from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import ConfigError

logger = logging.getLogger(__name__)

LEASE_SECONDS = 300.0
MAX_POLL_SECONDS = 2.0  # longest wait between tries while a limit is full

_held: ContextVar[frozenset[str]] = ContextVar("adit_held_slots", default=frozenset())


class _LeaseClient:
    """One Prefect API client per process (and API URL) for every lease call."""

    def __init__(self) -> None:
        self._client = get_client(sync_client=True).__enter__()
        self._leases: set[str] = set()
        self._lock = threading.Lock()
        self._renewer = threading.Thread(target=self._renew_forever, daemon=True,
                                         name="adit-lease-renewer")
        self._renewer.start()

    def acquire(self, names: list[str]) -> str:
        """One lease on a slot of each named limit (all or nothing)."""
        body = {"names": names, "slots": 1, "mode": "concurrency",
                "lease_duration": LEASE_SECONDS}
        lease_id = str(self.take("/v2/concurrency_limits/increment-with-lease", names,
                                 body)["lease_id"])
        with self._lock:
            self._leases.add(lease_id)
        return lease_id

    def release(self, lease_id: str) -> None:
        with self._lock:
            self._leases.discard(lease_id)
        response = self._post("/v2/concurrency_limits/decrement-with-lease",
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
        http = self._client._client  # Prefect's httpx client: base URL and auth headers
        for attempt in range(200):
            try:  # plain httpx send: Prefect's own retries wait seconds
                response = httpx.Client.send(http, http.build_request("POST", path, json=body))
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
                    self._post(f"/v2/concurrency_limits/leases/{lease_id}/renew",
                               {"lease_duration": LEASE_SECONDS})


_clients: dict[str, _LeaseClient] = {}
_clients_lock = threading.Lock()


def lease_client() -> _LeaseClient:
    url = str(PREFECT_API_URL.value())
    with _clients_lock:
        if url not in _clients:
            _clients[url] = _LeaseClient()
        return _clients[url]


@contextlib.contextmanager
def node_slots(*nodes: ServerNode | None) -> Iterator[None]:
    """One slot of each node's limit (those not already held here), in one lease."""
    wanted = sorted({n.limit_name: n for n in nodes
                     if n is not None and n.limit_name not in _held.get()}.values(),
                    key=lambda n: n.limit_name)  # one order everywhere: no deadlock
    if not wanted:
        yield
        return
    with contextlib.ExitStack() as stack:
        for node in wanted:
            stack.enter_context(local_slot(node))
        client = lease_client()
        lease_id = client.acquire([n.limit_name for n in wanted])
        stack.callback(client.release, lease_id)
        token = _held.set(_held.get() | {n.limit_name for n in wanted})
        stack.callback(_held.reset, token)
        yield


def prefect_slot(node: ServerNode) -> contextlib.AbstractContextManager[None]:
    """The SlotFactory of Prefect-run connections (see adit_tasks.core.association)."""
    return node_slots(node)


def take_rate_slot(node: ServerNode) -> None:
    """Wait for a slot of the node's rate limit (studies per minute)."""
    name = node.rate_limit_name
    lease_client().take("/v2/concurrency_limits/increment", [name],
                        {"names": [name], "slots": 1, "mode": "rate_limit"})
