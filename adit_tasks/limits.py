"""Per-node limits on the Prefect server, so they hold across runs, workers and machines.

Each server node has a global concurrency limit (`adit-node-<name>`, size `max_associations`)
and, where set, a rate limit (`adit-rate-<name>`, studies per minute). `ensure_node_limits()`
creates or resizes them (idempotent: runs starting at once on a fresh server race safely).

A study (or a chunk of batch queries) holds one slot of each node it talks to for its whole
duration, in one lease for all its nodes (`node_slots`); the connections it uses are built
with `slot_held_by_caller`, so its associations take nothing more. A retrieval that can use
parallel associations takes spare slots of the source on top, only those free at that moment
(`spare_node_slot`, one lease each, never waiting) and only while it runs. Studies of one process
queue on a local semaphore first, so only contention between processes reaches the server.

Hand-over within a run: while a run's studies are being run (`reusing_leases`, entered by the
run loop), a study that ends parks its lease instead of giving it back, and the run's next
study with the same nodes takes it over: no server call between two studies of a batch, where
there were two (plus the SQLite retries) per study. A parked lease counts on the server as
held, is renewed like any other, and goes back at the end of the scope, or when no study of
the run took it within IDLE_SECONDS. So `max_associations` holds as before (the lease is never
held by two studies: the next one takes it only after taking its local slots), and a dead
process loses parked leases as it loses held ones, by expiry. Other processes see no change
either: before, the next study of the run took the freed slot within milliseconds, ahead of
any other process that was polling (every ~2 s); now it takes it without the round trip.

Leases are taken through the Prefect REST API with a plain httpx client: Prefect's own client
waits ~2 s before it tries a `503` again, and on SQLite the server answers 503
(SQLITE_BUSY_SNAPSHOT) whenever another write lands between its read and its update; we try
again after milliseconds (19 small studies: 20 s -> 2 s).

A dead holder (its process or machine gone) gives its slots back when its lease expires: a
lease lasts LEASE_SECONDS (60 s, the shortest the server accepts) and is renewed every
RENEW_SECONDS (10 s) while held, so a holder keeps its slots through up to five missed
renewals (a server restart of up to ~50 s) and a dead one loses them 60 s after its last
renewal, plus the server's expiry sweep (`PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS`).
Leases live in the server's lease storage: run the server with the filesystem storage
(`PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem`,
see deployments/systemd/) so a restart loses none; with the in-memory default a slot held
over a restart stays taken for good. Each lease names its holder (the flow run), which the
lease storage records. Should a lease be gone all the same when it is renewed (the server was
away longer than a lease), the renewer takes the slots again as soon as they are free, so the
count on the server is right again.
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
from prefect.runtime import flow_run, task_run
from prefect.settings import get_current_settings

from adit_tasks.core.association import local_slot, try_local_slot
from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import ConfigError

logger = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # the shortest lease the Prefect server grants
RENEW_SECONDS = 10.0  # renewal interval: five renewals may fail before a lease expires
RENEW_TIMEOUT = 5.0  # one slow answer must not hold up the renewal of every lease
MAX_POLL_SECONDS = 2.0  # longest wait between tries while a limit is full
IDLE_SECONDS = 1.0  # a parked lease no study of its run took is given back after this


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


class _Lease:
    """Slots of some limits held by one holder; `lease_id` is the server's current lease."""

    def __init__(self, names: list[str], holder: dict[str, str] | None, lease_id: str) -> None:
        self.names = names
        self.holder = holder
        self.lease_id = lease_id
        self.lost = False  # the server revoked it while held; taken again when slots free


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
        self._leases: set[_Lease] = set()  # held or parked: the renewer renews them all
        self._parked: dict[_Lease, float] = {}  # lease -> when parked (monotonic)
        self._reusing: dict[str, int] = {}  # holder key -> open `reusing_leases` scopes
        self._lock = threading.Lock()
        self._parked_changed = threading.Condition(self._lock)
        for target, name in ((self._renew_forever, "adit-lease-renewer"),
                             (self._give_back_idle, "adit-lease-idle")):
            threading.Thread(target=target, daemon=True, name=name).start()

    def acquire(self, names: list[str]) -> _Lease:
        """One lease on a slot of each named limit (all or nothing): a lease of the same
        holder and limits parked by its previous study, else a new one from the server."""
        holder = _holder()
        with self._lock:
            for lease in self._parked:
                if lease.names == names and lease.holder == holder:
                    del self._parked[lease]
                    return lease
        lease_id = str(self.take("v2/concurrency_limits/increment-with-lease", names,
                                 self._lease_body(names, holder))["lease_id"])
        lease = _Lease(names, holder, lease_id)
        with self._lock:
            self._leases.add(lease)
        return lease

    def free_slots(self, name: str) -> int:
        """How many slots of a limit are free now (0 if it cannot be read)."""
        for attempt in range(20):
            try:
                response = self._http.get(f"v2/concurrency_limits/{name}")
            except httpx.TransportError:
                return 0
            if response.status_code != 503:
                break
            time.sleep(0.01 * (attempt + 1))
        if response.status_code != 200:
            return 0
        data = response.json()
        return int(data.get("limit", 0)) - int(data.get("active_slots", 0))

    def try_acquire(self, names: list[str]) -> _Lease | None:
        """Like `acquire`, but None at once when a limit is full (no waiting)."""
        holder = _holder()
        response = self._post("v2/concurrency_limits/increment-with-lease",
                              self._lease_body(names, holder))
        if response.status_code == 423:
            return None
        lease = _Lease(names, holder, str(self._granted(response, names)["lease_id"]))
        with self._lock:
            self._leases.add(lease)
        return lease

    def release(self, lease: _Lease, *, park: bool = False) -> None:
        """Give the slots back; with `park`, keep the lease for the holder's next study
        instead while the holder is in a `reusing_leases` scope."""
        with self._lock:
            if (park and not lease.lost and lease in self._leases
                    and _key(lease.holder) in self._reusing):
                self._parked[lease] = time.monotonic()
                self._parked_changed.notify()
                return
            self._leases.discard(lease)
            if lease.lost:
                return  # the server gave the slots back already
        self._decrement(lease)

    @contextlib.contextmanager
    def reusing(self) -> Iterator[None]:
        key = _key(_holder())
        with self._lock:
            self._reusing[key] = self._reusing.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._reusing[key] -= 1
                done = not self._reusing[key]
                if done:
                    del self._reusing[key]
            if done:
                self._give_back(lambda lease, _: _key(lease.holder) == key)

    def _give_back(self, which: Any) -> None:
        """Give back the parked leases for which `which(lease, parked_at)` holds."""
        with self._lock:
            leases = [lease for lease, at in self._parked.items() if which(lease, at)]
            for lease in leases:
                del self._parked[lease]
                self._leases.discard(lease)
        for lease in leases:
            if not lease.lost:
                self._decrement(lease)

    def _give_back_idle(self) -> None:
        """Give back the leases that stayed parked IDLE_SECONDS (no study of the run wanted
        them: the run's tail, or studies with other nodes)."""
        while True:
            with self._lock:
                while not self._parked:
                    self._parked_changed.wait()
                first = min(self._parked.values())
            time.sleep(max(0.0, first + IDLE_SECONDS - time.monotonic()))
            with contextlib.suppress(Exception):  # else it expires by itself
                self._give_back(
                    lambda _, at: time.monotonic() - at >= IDLE_SECONDS)

    def _decrement(self, lease: _Lease) -> None:
        response = self._post("v2/concurrency_limits/decrement-with-lease",
                              {"lease_id": lease.lease_id})
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
            return self._granted(response, names)

    @staticmethod
    def _granted(response: httpx.Response, names: list[str]) -> Any:
        response.raise_for_status()
        data = response.json()
        limits = data.get("limits") if isinstance(data, dict) else data
        if not limits or len(limits) < len(names):
            raise ConfigError(f"Prefect limit(s) {', '.join(names)} missing "
                              "(ensure_node_limits creates them when a flow starts)")
        return data

    @staticmethod
    def _lease_body(names: list[str], holder: dict[str, str] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"names": names, "slots": 1, "mode": "concurrency",
                                "lease_duration": LEASE_SECONDS}
        if holder:
            body["holder"] = holder
        return body

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None,
              tries: int = 200) -> httpx.Response:
        """POST, trying again after milliseconds on 503 and on a dropped connection."""
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        for attempt in range(tries):
            try:
                response = self._http.post(path, json=body, **kwargs)
            except httpx.TransportError:
                if attempt >= min(5, tries - 1):
                    raise
                time.sleep(0.1)
                continue
            if response.status_code != 503 or attempt == tries - 1:
                return response
            time.sleep(min(0.01 * (attempt + 1), 0.25))
        raise AssertionError("unreachable")

    def _renew_forever(self) -> None:
        while True:
            time.sleep(RENEW_SECONDS)
            with self._lock:
                leases = list(self._leases)
            for lease in leases:
                with contextlib.suppress(Exception):  # the next round, or expiry, settles it
                    self._renew(lease)

    def _renew(self, lease: _Lease) -> None:
        """Renew one lease; when the server has revoked it while its holder still works (it
        was unreachable for longer than a lease), take the slots again once they are free."""
        if not lease.lost:
            response = self._post(f"v2/concurrency_limits/leases/{lease.lease_id}/renew",
                                  {"lease_duration": LEASE_SECONDS}, timeout=RENEW_TIMEOUT,
                                  tries=3)
            if response.status_code not in (404, 410):
                return
            with self._lock:
                if lease not in self._leases:
                    return  # released while this renewal was under way
                lease.lost = True
                if self._parked.pop(lease, None) is not None:
                    self._leases.discard(lease)
                    return  # parked: nobody needs its slots again
            logger.warning("the Prefect server revoked a concurrency lease of %s that is "
                           "still in use; taking the slots again as soon as they are free",
                           ", ".join(lease.names))
        response = self._post("v2/concurrency_limits/increment-with-lease",
                              self._lease_body(lease.names, lease.holder),
                              timeout=RENEW_TIMEOUT, tries=3)
        if response.status_code == 423:
            return  # full: the next round tries again
        lease_id = str(self._granted(response, lease.names)["lease_id"])
        with self._lock:
            if lease in self._leases:
                lease.lease_id, lease.lost = lease_id, False
                return
        # released meanwhile: give the new slots straight back
        self._post("v2/concurrency_limits/decrement-with-lease", {"lease_id": lease_id},
                   timeout=RENEW_TIMEOUT, tries=3)


def _key(holder: dict[str, str] | None) -> str:
    return f"{holder['type']}:{holder['id']}" if holder else ""


def _holder() -> dict[str, str] | None:
    """Who holds a lease, as the server's lease storage records it: the flow run (what an
    operator acts on; its task runs reach the server later, through events), else the task
    run."""
    if flow_run.id:
        return {"type": "flow_run", "id": str(flow_run.id)}
    if task_run.id:
        return {"type": "task_run", "id": str(task_run.id)}
    return None


# A documented cache: one lease client per process and Prefect API.
_clients: dict[str, _LeaseClient] = {}
_clients_lock = threading.Lock()


def _lease_client() -> _LeaseClient:
    # The configured API URL when there is one (no client built per study); Prefect's client
    # only in ephemeral mode, where it knows the temporary server's address.
    api_url = get_current_settings().api.url
    if not api_url:
        with get_client(sync_client=True) as client:
            api_url = str(client.api_url)
    with _clients_lock:
        if api_url not in _clients:
            _clients[api_url] = _LeaseClient(api_url)
        return _clients[api_url]


@contextlib.contextmanager
def node_slots(nodes: tuple[ServerNode, ...]) -> Iterator[None]:
    """One slot of each node's limit, in one lease, for as long as the block runs (in a
    `reusing_leases` scope the lease then passes to the run's next study)."""
    wanted = sorted({n.limit_name: n for n in nodes}.values(),
                    key=lambda n: n.limit_name)  # one order everywhere: no deadlock
    with contextlib.ExitStack() as stack:
        for node in wanted:
            stack.enter_context(local_slot(node))
        client = _lease_client()
        lease = client.acquire([n.limit_name for n in wanted])
        stack.callback(client.release, lease, park=True)
        yield


@contextlib.contextmanager
def reusing_leases() -> Iterator[None]:
    """While the block runs, the leases of this run's studies (`node_slots`) pass from a study
    that ends to the next one instead of going back to the server (module docstring); they go
    back at the end of the block."""
    with _lease_client().reusing():
        yield


@contextlib.contextmanager
def spare_node_slot(node: ServerNode) -> Iterator[bool]:
    """One more slot of the node's limit if one is free now, in this process and on the
    server (a `SpareSlotFactory`: a study's parallel associations, adit_tasks.core.association);
    never waits. Yields whether it was taken.

    It is taken only while another one stays free for other studies: the leases of a process
    that dies live on until they expire (a minute or more), and a study killed while holding
    every slot of the node would block all work on it until then (a re-run of that study, for
    one). A read and then a take, not one step: two studies taking at the same moment may
    leave none free, never more than `max_associations` taken."""
    with try_local_slot(node) as local:
        client = _lease_client()
        lease = (client.try_acquire([node.limit_name])
                 if local and client.free_slots(node.limit_name) >= 2 else None)
        try:
            yield lease is not None
        finally:
            if lease is not None:
                client.release(lease)


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
