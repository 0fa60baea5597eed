"""Reading environment variables the one way comfyfleet does: stripped, blank is unset.

Dependency-free, so that the agent, the store and the clients can all use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["env_value"]


def env_value(env: Mapping[str, str] | None, *names: str) -> str | None:
    """The first of the variables ``names`` that holds more than white space, stripped.

    ``env`` defaults to ``os.environ``; ``None`` when none of them is set.
    """
    env = os.environ if env is None else env
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None
