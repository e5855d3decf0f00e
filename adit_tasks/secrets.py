"""The run's secrets, read once at the edge: the pseudonymization key and the archive password.

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

from pydantic import SecretStr

from adit_tasks.core.config import Settings
from adit_tasks.core.options import TransferOptions

logger = logging.getLogger(__name__)

PSEUDONYM_SECRET_BLOCK = "adit-pseudonym-secret"
ARCHIVE_PASSWORD_BLOCK = "adit-archive-password"


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
