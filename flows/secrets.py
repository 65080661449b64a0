"""Credentials from Prefect Secret blocks, for flows whose worker does not have them in its env.

A flow's ``secrets`` parameter maps environment variable names to Secret block names, e.g.
``{"AWS_SECRET_ACCESS_KEY": "prolong-s3-secret", "OPENAI_API_KEY": "prolong-judge-key"}``. Values are
read at run time and put into this flow run's process environment, which is where the store, the
judge and every submitted job (local torchrun, or sbatch with ``--export=ALL``) read credentials
from. Only the names travel as parameters; the values never enter a parameter, log, artifact,
manifest, job script or recipe.
"""

from __future__ import annotations

import os
import re

from prolong.errors import ConfigError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def load_secrets(secrets: dict[str, str] | None) -> list[str]:
    """Export each Secret block's value as its environment variable; returns the variable names."""
    if not secrets:
        return []
    from prefect.blocks.system import Secret

    for var, block in secrets.items():
        if not _ENV_NAME.match(var):
            raise ConfigError(f"secrets: {var!r} is not an environment variable name")
        try:
            value = Secret.load(block).get()
        except ValueError as e:  # Prefect: "Unable to find block document named ..."
            raise ConfigError(f"secrets.{var}: no Prefect Secret block named {block!r} ({e})") from None
        if not isinstance(value, str):
            raise ConfigError(f"secrets.{var}: Secret block {block!r} holds a {type(value).__name__}, not a string")
        os.environ[var] = value
    return list(secrets)
