"""The run's secrets, read once at the edge: the pseudonymization key, the archive password
and the SMTP server (with its password) of job-end e-mails.

Each comes from the settings (`ADIT_PSEUDONYM_SECRET` / `ADIT_ARCHIVE_PASSWORD` in the
environment or `.env`), else from a Prefect Secret block, but only from a Prefect server that
the configuration names (`PREFECT_API_URL` in the environment or the Prefect profile): a server
the CLI merely found answering on 127.0.0.1:4200 is never asked for secrets. Secrets are never
flow parameters (Prefect stores and shows those) and never written to the environment: the
edge passes them into the plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import SecretStr

from adit_tasks.core.config import Settings
from adit_tasks.core.options import TransferOptions

if TYPE_CHECKING:
    from prefect_email import EmailServerCredentials

logger = logging.getLogger(__name__)

PSEUDONYM_SECRET_BLOCK = "adit-pseudonym-secret"
ARCHIVE_PASSWORD_BLOCK = "adit-archive-password"
SMTP_PASSWORD_BLOCK = "adit-smtp-password"
EMAIL_BLOCK = "adit-email"  # a prefect-email EmailServerCredentials block
SMTP_TYPES = {"none": "INSECURE", "starttls": "STARTTLS", "ssl": "SSL"}


def named_server() -> bool:
    """True when the configuration (environment or profile) names the Prefect server, as
    opposed to a server found by looking or a temporary one."""
    from prefect.settings import Settings as PrefectSettings

    return bool(PrefectSettings().api.url)


@dataclass(frozen=True)
class RunSecrets:
    pseudonym_secret: str = field(default="", repr=False)
    archive_password: str = field(default="", repr=False)


def read_secrets(settings: Settings, options: TransferOptions) -> RunSecrets:
    """The secrets these options need (only those), '' where none is configured."""
    return RunSecrets(
        pseudonym_secret=_secret(settings.pseudonym_secret, PSEUDONYM_SECRET_BLOCK)
        if options.pseudonymizing else "",
        archive_password=_secret(settings.archive_password, ARCHIVE_PASSWORD_BLOCK)
        if options.archive else "",
    )


def email_credentials(settings: Settings) -> EmailServerCredentials | None:
    """The SMTP server of job-end e-mails (a prefect-email `EmailServerCredentials`), or None.

    From the nodes file's `notify` section when it names a `smtp_host` (the password from
    ADIT_SMTP_PASSWORD or the Secret block `adit-smtp-password`), else the saved block
    `adit-email` of a Prefect server the configuration names.
    """
    from prefect_email import EmailServerCredentials

    notify = settings.notify
    if notify.smtp_host:
        password = (_secret(settings.smtp_password, SMTP_PASSWORD_BLOCK)
                    if notify.username else "")
        return EmailServerCredentials(
            smtp_server=notify.smtp_host, smtp_port=notify.smtp_port,
            smtp_type=SMTP_TYPES[notify.smtp_security], username=notify.username or None,
            password=SecretStr(password))
    if not named_server():
        return None
    try:
        return EmailServerCredentials.load(EMAIL_BLOCK)
    except ValueError:  # no such block
        return None
    except Exception as exc:  # no Prefect server to ask
        logger.warning("could not read the Prefect block '%s' (%s)", EMAIL_BLOCK,
                       type(exc).__name__)
        return None


def _secret(value: SecretStr | None, block: str) -> str:
    if value is not None:
        return value.get_secret_value()
    if not named_server():
        return ""
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(block).get())
    except ValueError:  # no such block
        return ""
    except Exception as exc:  # no Prefect server to ask
        logger.warning("could not read the Prefect Secret block '%s' (%s)", block,
                       type(exc).__name__)
        return ""
