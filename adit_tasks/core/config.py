"""Settings and the nodes file.

The nodes file (YAML; the path given, else `ADIT_NODES_FILE`, else `./nodes.yaml`) declares our
own AE title, the C-MOVE receiver and the nodes: DICOM servers (DIMSE and/or DICOMweb) and
folders. `ADIT_*` environment variables and a `.env` file override its top-level keys (a list
such as `ADIT_NODES` is given as JSON); the secrets (`ADIT_PSEUDONYM_SECRET`,
`ADIT_ARCHIVE_PASSWORD`) come only from there, never from the YAML file. `load_settings()` is
the only place that reads any of them, once, at the edge (a CLI command or a flow's start);
below the edge code gets the values it needs (a node, a connection, a plan), never `Settings`.

A bad file fails at start with one message that names the file, the node and the field.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from adit_tasks.core.errors import ConfigError, UnknownNode
from adit_tasks.core.notice import is_email, recipients
from adit_tasks.core.windows import check_window_text

DEFAULT_NODES_FILE = Path("nodes.yaml")
RetrieveMethod = Literal["c-get", "c-move", "wado-rs"]

_AE_TITLE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]+$")  # printable ASCII without backslash


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE (Application Entity) is at most 16 characters, no backslash or control
    # characters, and leading/trailing spaces are not significant.
    value = value.strip()
    if not value:
        raise ValueError("AE title must not be empty")
    if len(value) > 16:
        raise ValueError(f"AE title '{value}' is longer than 16 characters")
    if not _AE_TITLE_CHARS.match(value):
        raise ValueError(f"AE title '{value}' may only contain printable ASCII, no backslash")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerNode(_Strict):
    """A DICOM server reached by DIMSE (AE title, host, port) and/or DICOMweb (base URL)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    dicomweb_url: str | None = None
    # Retrieval methods the server supports, in order of preference. Not listed: the fastest
    # first (measured, benchmarks/retrieve.py): wado-rs (where dicomweb_url is set), c-get,
    # c-move. Listed: that order, as given.
    retrieve: list[RetrieveMethod] = Field(default_factory=lambda: ["c-get", "c-move"])
    find: bool = True  # answers C-FIND (or QIDO-RS for DICOMweb-only nodes)
    store: bool = True  # accepts C-STORE (or STOW-RS)
    query_root: Literal["study", "patient"] = "study"
    max_associations: int = Field(default=2, ge=1, le=64)
    # When transfers may load this server, e.g. "Mon-Fri 20:00-06:00; Sat-Sun 00:00-24:00"
    # (adit_tasks/windows.py); empty: always.
    transfer_window: str = ""
    # Gentle on a busy PACS: at most this many studies per minute (Prefect rate limit, shared
    # by all runs and workers) and a pause after each study.
    studies_per_minute: float | None = Field(default=None, gt=0)
    pause_between_studies: float = Field(default=0.0, ge=0, le=3600)
    # Private creators whose blocks carry no identifying data and survive pseudonymization.
    safe_private_creators: list[str] = Field(default_factory=list)
    timeout: float = Field(default=60.0, gt=0, description="network/DIMSE timeout in seconds")
    # Where this server's C-STOREs come from when it answers our C-MOVE. Our receiver takes
    # an instance only from the AE title of the node the C-MOVE went to, connecting from one
    # of these addresses. Empty (default): the address(es) `host` resolves to. A PACS that
    # sends from other addresses (a cluster, NAT) lists them: IP addresses or networks such
    # as "10.1.2.0/24". ["any"] checks the AE title (and the Move Originator Message ID) only.
    move_sender_addresses: list[str] = Field(default_factory=list)
    # The calling AE title of those C-STOREs, for a PACS that sends under another AE title
    # than `ae_title` (default: `ae_title`).
    move_sender_ae_title: str | None = None

    @field_validator("ae_title", "move_sender_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("move_sender_addresses")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        value = [v.strip() for v in value]
        if "any" in value:
            if len(value) > 1:
                raise ValueError('"any" cannot be combined with addresses')
            return value
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"'{entry}' is not an IP address or network (or \"any\")"
                                 ) from None
        return value

    _window = field_validator("transfer_window")(check_window_text)

    @field_validator("dicomweb_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://", value):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _reachable(self) -> ServerNode:
        dimse = [self.ae_title, self.host, self.port]
        if any(v is not None for v in dimse) and not all(v is not None for v in dimse):
            raise ValueError("a DIMSE server needs ae_title, host and port together")
        if not self.has_dimse and not self.dicomweb_url:
            raise ValueError("needs ae_title/host/port (DIMSE), dicomweb_url, or path (a folder)")
        if "retrieve" not in self.model_fields_set and self.dicomweb_url:
            object.__setattr__(self, "retrieve", ["wado-rs", "c-get", "c-move"])
        if "wado-rs" in self.retrieve and not self.dicomweb_url:
            raise ValueError("retrieve lists wado-rs but dicomweb_url is not set")
        if not self.has_dimse and set(self.retrieve) - {"wado-rs"}:
            object.__setattr__(self, "retrieve", ["wado-rs"])  # DICOMweb-only node
        if not self.retrieve:
            raise ValueError("retrieve must list at least one method")
        return self

    @property
    def has_dimse(self) -> bool:
        return self.ae_title is not None

    @property
    def limit_name(self) -> str:
        """Name of the Prefect global concurrency limit that guards this node's associations."""
        return f"adit-node-{self.name}"

    @property
    def rate_limit_name(self) -> str:
        """Name of the Prefect rate limit (studies per minute) of this node."""
        return f"adit-rate-{self.name}"


class FolderNode(_Strict):
    """A folder on this machine (or a mounted share) that studies are written to."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path


class ContinuousJob(_Strict):
    """A continuous transfer job that `adit serve` runs on a cron schedule (see the
    continuous_transfer flow for the meaning of each field)."""

    job: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    source: str
    destination: str
    start_date: str
    end_date: str = ""
    cron: str = "*/30 * * * *"
    modality: str = ""
    study_description: str = ""
    series_description: str = ""
    institution_name: str = ""
    min_instances: int = Field(default=0, ge=0)
    chunk_days: int = Field(default=7, ge=1)
    overlap_days: int = Field(default=3, ge=0)
    max_studies_per_run: int = Field(default=500, ge=1)
    find_limit: int = Field(default=0, ge=0)
    recheck_chunks: int = Field(default=1, ge=0)  # history chunks re-checked per run
    # Told when a run has failures (e-mail addresses, http(s) webhook URLs), besides
    # notify.recipients.
    notify: list[str] = Field(default_factory=list)
    # Transfer options (pseudonymize, pseudonym, trial_id, trial_name, dates, archive, window,
    # urgent, ...), as in flows/options.py TransferOptions.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("notify")
    @classmethod
    def _notify(cls, value: list[str]) -> list[str]:
        recipients(value)  # InvalidInput (a ValueError) names the bad entry
        return [v.strip() for v in value]


class NotifySettings(_Strict):
    """Where job-end notifications go (README, "Notifications"): the SMTP server of the
    e-mails and the recipients every job notifies. The SMTP password is a secret:
    `ADIT_SMTP_PASSWORD` (environment or .env), never this file."""

    smtp_host: str = ""  # empty: the Prefect block `adit-email`, if any
    smtp_port: int | None = Field(default=None, ge=1, le=65535)  # default: by security
    smtp_security: Literal["none", "starttls", "ssl"] = "starttls"
    sender: str = ""  # the From address (default: username)
    username: str = ""  # empty: no SMTP login
    # How long the SMTP server may take to greet; a silent one is given up (the job ends).
    smtp_timeout: float = Field(default=30.0, gt=0, le=600)
    # Notified at the end of every job, besides a job's own `notify` list: e-mail addresses
    # and http(s) webhook URLs.
    recipients: list[str] = Field(default_factory=list)

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        recipients(value, "recipients")  # InvalidInput (a ValueError) names the bad entry
        return [v.strip() for v in value]

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        value = value.strip()
        if value and not is_email(value):
            raise ValueError("must be an e-mail address")
        return value


def _node_kind(raw: Any) -> str:
    if isinstance(raw, dict):
        return "folder" if "path" in raw else "server"
    return "folder" if isinstance(raw, FolderNode) else "server"


Node = Annotated[
    Annotated[ServerNode, Tag("server")] | Annotated[FolderNode, Tag("folder")],
    Discriminator(_node_kind),
]


class Settings(BaseSettings):
    """Everything ADIT is configured with; see the README for each key."""

    # extra="ignore": a .env file shared with other tools (PREFECT_API_URL, ...) is fine;
    # unknown keys of ours are reported by load_settings (_unknown_keys) instead.
    model_config = SettingsConfigDict(
        env_prefix="ADIT_", env_file=".env", extra="ignore", frozen=True
    )

    nodes_file: Path = DEFAULT_NODES_FILE
    ae_title: str = "ADIT"  # our calling AE title, also the C-MOVE destination AE
    receiver_port: int = Field(default=11150, ge=1, le=65535)
    receiver_host: str = "127.0.0.1"  # where the C-MOVE storage SCP binds
    nodes: list[Node] = Field(default_factory=list)
    retries: int = Field(default=3, ge=0, le=20)  # retries of a retriable study failure
    retry_delay_seconds: float = Field(default=10.0, ge=0)  # first delay; doubles each retry
    continuous: list[ContinuousJob] = Field(default_factory=list)  # jobs `adit serve` schedules
    notify: NotifySettings = Field(default_factory=NotifySettings)  # job-end notifications
    # Secrets: from the environment or .env only (load_settings refuses them in the YAML file).
    pseudonym_secret: SecretStr | None = None
    archive_password: SecretStr | None = None
    smtp_password: SecretStr | None = None  # of notify.username

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"duplicate node name '{node.name}'")
            seen.add(node.name)
        jobs = [j.job for j in self.continuous]
        for job in self.continuous:
            if jobs.count(job.job) > 1:
                raise ValueError(f"duplicate continuous job '{job.job}'")
            for name in (job.source, job.destination):
                if name not in seen:
                    raise ValueError(f"continuous job '{job.job}': unknown node '{name}'")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats .env beats the YAML file, which load_settings() passes as init data
        # with the lowest priority.
        return env_settings, dotenv_settings, init_settings

    def node(self, name: str) -> ServerNode | FolderNode:
        """The node called `name`, or UnknownNode listing the names there are."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise UnknownNode(f"unknown node '{name}' (nodes in {self.nodes_file}: {known})")

    def server(self, name: str) -> ServerNode:
        """The DICOM server called `name`; a folder node is an error here."""
        node = self.node(name)
        if not isinstance(node, ServerNode):
            raise ConfigError(f"node '{name}' is a folder, not a DICOM server")
        return node

    @property
    def servers(self) -> list[ServerNode]:
        return [n for n in self.nodes if isinstance(n, ServerNode)]

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.retry_delay_seconds)

    @property
    def receiver(self) -> ReceiverAddress:
        """Where our C-MOVE storage SCP listens, as PACS know it."""
        return ReceiverAddress(self.ae_title, self.receiver_host, self.receiver_port)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a task that failed for a passing reason is tried again (doubling delays)."""

    retries: int
    first_delay: float

    def delays(self) -> list[float]:
        return [self.first_delay * 2**i for i in range(self.retries)]


@dataclass(frozen=True)
class ReceiverAddress:
    """Where our C-MOVE storage SCP listens, and the AE title PACS send to."""

    ae_title: str
    host: str
    port: int


SECRET_KEYS = ("pseudonym_secret", "archive_password", "smtp_password")


def nodes_file_path(explicit: Path | str | None = None) -> Path:
    """Where the nodes file is: the argument, else `ADIT_NODES_FILE`, else `./nodes.yaml`."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("ADIT_NODES_FILE") or DEFAULT_NODES_FILE)


def load_settings(nodes_file: Path | str | None = None) -> Settings:
    """Read and validate the nodes file and the `ADIT_*` overrides; ConfigError if invalid."""
    path = nodes_file_path(nodes_file)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping with keys such as ae_title and nodes")
        data = loaded or {}
    elif nodes_file is not None or "ADIT_NODES_FILE" in os.environ:
        raise ConfigError(f"{path}: nodes file not found")
    notify = data.get("notify")
    if isinstance(notify, dict) and {"password", "smtp_password"} & set(notify):
        raise ConfigError(f"{path}: field 'notify.password': secrets are not read from the "
                          "nodes file; set ADIT_SMTP_PASSWORD in the environment or .env")
    for key in SECRET_KEYS:
        if key in data:
            raise ConfigError(f"{path}: field '{key}': secrets are not read from the nodes "
                              f"file; set ADIT_{key.upper()} in the environment or .env")
    problems = _unknown_keys(path, data)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, data, exc)) from None
    # The file read is the file recorded, whatever ADIT_NODES_FILE says (an explicit
    # --nodes-file wins over the environment).
    return settings.model_copy(update={"nodes_file": path})


def _unknown_keys(path: Path, data: dict[str, Any]) -> list[str]:
    """Keys of ours that mean nothing: in the nodes file, and ADIT_* variables in the
    environment or `.env` (other variables there belong to other tools)."""
    known = set(Settings.model_fields)
    problems = [f"{path}: field '{key}': unknown key" for key in data if key not in known]
    variables = set(os.environ)
    if Path(".env").is_file():
        variables |= {k for k in dotenv_values(".env") if k}
    for name in sorted(variables):
        if name.upper().startswith("ADIT_") and name[5:].lower() not in known:
            problems.append(f"the environment or .env: variable '{name}': unknown key")
    return problems


def _describe(path: Path, data: dict[str, Any], exc: ValidationError) -> str:
    """One line per problem: file, node (by name when it has one) and field."""
    nodes = data.get("nodes") if isinstance(data.get("nodes"), list) else []
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
            raw = nodes[loc[1]] if loc[1] < len(nodes) else {}
            name = raw.get("name") if isinstance(raw, dict) else None
            where = f"node '{name}'" if name else f"node #{loc[1] + 1}"
            loc = [p for p in loc[2:] if p not in ("server", "folder")]
        field = ".".join(str(p) for p in loc)
        msg = err["msg"].removeprefix("Value error, ")
        source = str(path)
        if loc and loc[0] not in data and not where:
            source = "the environment or .env"  # the key came from ADIT_* variables
            field = f"ADIT_{field.upper()}"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts = [source] + [p for p in (where, f"field '{field}'" if field else "") if p]
        lines.append(f"{': '.join(parts)}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
