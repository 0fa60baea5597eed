"""Reading environment variables the one way comfyfleet does: stripped, blank is unset.

Dependency-free, so that the agent, the store and the clients can all use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

__all__ = ["env_value", "environ_set"]


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


@contextlib.contextmanager
def environ_set(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block, then as they were before
    (the demo and the tests point the control plane's source resolution at simulators)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
