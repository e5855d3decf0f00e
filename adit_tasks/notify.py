"""Job-end notifications: an e-mail (prefect-email) and/or a webhook POST when a job ends.

Every flow does the same two things: at its start (the edge) `notifier_for(settings, notify)`
checks the job's `notify` entries, adds the nodes file's default recipients and, when an
e-mail is wanted, finds the SMTP server (`secrets.email_credentials`), so a job that cannot
notify fails before any work; at its end `notify_end(notifier, kind, counts)` sends what
`core.notice` makes from the counts: no patient data, a link to the run in the Prefect UI.

E-mail goes through prefect-email's `email_send_message` task (a task run `notify-email` of
the job's run, one retry); a webhook gets a POST of the notice's JSON (httpx, 10 s, no
redirects followed). A notification that fails is logged (recipients by count, webhooks by
host: a URL may carry a token) and never changes the run's final state.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from adit_tasks.core.config import Settings
from adit_tasks.core.errors import ConfigError
from adit_tasks.core.notice import Notice, Outcome, Recipients, is_email, notice, recipients
from adit_tasks.secrets import email_credentials

if TYPE_CHECKING:
    from prefect_email import EmailServerCredentials

WEBHOOK_TIMEOUT = 10.0  # seconds; a webhook that hangs must not hold the run


@dataclass(frozen=True)
class Notifier:
    """Who hears about the job's end, and the SMTP server and sender for e-mails."""

    recipients: Recipients = field(default_factory=Recipients)
    sender: str = ""
    credentials: EmailServerCredentials | None = field(default=None, repr=False)
    smtp_timeout: float = 30.0


def notifier_for(settings: Settings, notify: list[str] | None) -> Notifier:
    """The edge: the job's `notify` entries (InvalidInput names a bad one) and the nodes
    file's default recipients; ConfigError when e-mail is wanted but no SMTP server or sender
    is configured."""
    wanted = recipients(notify or []) + recipients(settings.notify.recipients, "recipients")
    if not wanted.emails:
        return Notifier(wanted)
    credentials = email_credentials(settings)
    if credentials is None:
        raise ConfigError("e-mail notification needs an SMTP server: set notify.smtp_host in "
                          "the nodes file (or save an EmailServerCredentials block "
                          "'adit-email' on the Prefect server)")
    sender = settings.notify.sender or credentials.username or ""
    if not is_email(sender):
        raise ConfigError("e-mail notification needs a sender: set notify.sender (an e-mail "
                          "address) in the nodes file")
    return Notifier(wanted, sender, credentials, settings.notify.smtp_timeout)


def notify_end(notifier: Notifier, kind: str, counts: Mapping[str, int], *,
               unit: str = "studies", outcome: Outcome | None = None,
               stopped: bool = False) -> None:
    """Tell the recipients that this run ended (inside the flow run, after its result is
    known): `counts` by status (`core.notice.status_counts`), `outcome` when the counts are
    not statuses, `stopped` when it raised instead. Failures are logged, never raised."""
    if not notifier.recipients:
        return
    run_id = str(flow_run.id)
    message = notice(kind, flow_run.name or "", run_id, counts, unit=unit,
                     link=run_link(run_id), outcome=outcome, stopped=stopped)
    if notifier.recipients.emails:
        _guarded(_email, notifier, message, what="e-mail")
    for url in notifier.recipients.webhooks:
        _guarded(_post, url, message, what=f"webhook to {urlsplit(url).hostname}")


def _guarded(send: Callable[..., None], *args: object, what: str) -> None:
    """One channel: whatever goes wrong (a URL httpx refuses, the Prefect API gone while the
    e-mail task is submitted) is a warning naming its type, never the run's error."""
    try:
        send(*args)
    except Exception as exc:
        get_run_logger().warning("job-end %s not sent: %s", what, type(exc).__name__)


@contextlib.contextmanager
def notified_if_raising(notifier: Notifier, kind: str, unit: str = "studies") -> Iterator[None]:
    """The flow's work after its notifier is known: if it raises (every association refused,
    the Prefect API gone, a bug), the recipients still hear that the run failed. Prefect's
    pause and cancel signals are not errors and pass untold."""
    try:
        yield
    except Exception:
        with contextlib.suppress(Exception):  # the run's own error is the one to see
            notify_end(notifier, kind, {}, unit=unit, stopped=True)
        raise


def run_link(run_id: str) -> str | None:
    """The run's page in the Prefect UI, or None when the UI's address is unknown (a
    temporary server: the link would be dead once the run ends)."""
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if ui else None


def _email(notifier: Notifier, message: Notice) -> None:
    from prefect_email import email_send_message

    logger = get_run_logger()
    emails = list(notifier.recipients.emails)
    if notifier.credentials is not None and _silent(notifier.credentials, notifier.smtp_timeout):
        logger.warning("job-end e-mail to %d recipient(s) not sent: the SMTP server accepted "
                       "the connection but did not greet within %.0f s", len(emails),
                       notifier.smtp_timeout)
        return
    send = email_send_message.with_options(
        name="notify-email", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
        persist_result=False)
    # An async task: submitted (a sync flow cannot call it directly) and waited for.
    future = send.submit(subject=message.subject, msg="", msg_plain=message.text,
                         email_server_credentials=notifier.credentials,
                         email_from=notifier.sender, email_to=emails)
    result = future.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        code = getattr(result, "smtp_code", None)
        logger.warning("job-end e-mail to %d recipient(s) not sent: %s%s", len(emails),
                       type(result).__name__, f" (SMTP {code})" if code else "")
    else:
        logger.info("job-end e-mail sent to %d recipient(s)", len(emails))


def _silent(credentials: EmailServerCredentials, timeout: float) -> bool:
    """Whether the SMTP server takes connections but says nothing within `timeout`.

    prefect-email opens its connection without a timeout, so such a server would hold the
    end of the run for ever; a server that refuses the connection fails fast there and is
    left to it (and its retry). Only the server's liveness is probed here: the send itself
    checks its certificate."""
    from prefect_email import SMTPType

    server = credentials.smtp_server
    host = str(getattr(server, "value", server))
    port = credentials.smtp_port or SMTPType(credentials.smtp_type).value
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            conn = sock
            if SMTPType(credentials.smtp_type) == SMTPType.SSL:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                conn = context.wrap_socket(sock, server_hostname=host)
            conn.makefile("rb").readline(512)
            with contextlib.suppress(OSError):
                conn.sendall(b"QUIT\r\n")
    except TimeoutError:
        return True
    except OSError:
        return False
    return False


def _post(url: str, message: Notice) -> None:
    logger = get_run_logger()
    host = urlsplit(url).hostname
    try:
        response = httpx.post(url, json=message.payload, timeout=WEBHOOK_TIMEOUT,
                              follow_redirects=False)
    except httpx.HTTPError as exc:
        logger.warning("job-end webhook to %s not sent: %s", host, type(exc).__name__)
        return
    if response.is_success:
        logger.info("job-end webhook to %s: HTTP %d", host, response.status_code)
    else:  # the answer's body is the peer's text: not repeated
        logger.warning("job-end webhook to %s refused it: HTTP %d", host,
                       response.status_code)
