"""Provider labels: how a contract says which fleet and which instance record it is.

Every contract comfyfleet rents carries the label ``cf-<fleet id>-<instance id>``,
the instance id being the store's row id. The store writes it, the reconcile
planner reads it back to tell its own contracts (and orphans) from everything
else on the account. Pure: no database, no provider.
"""

from __future__ import annotations

import re
from typing import Final

from comfyfleet.errors import ConfigError

__all__ = [
    "LABEL_PREFIX",
    "check_fleet_id",
    "instance_id_from_label",
    "label_prefix",
    "make_label",
    "parse_label",
]

LABEL_PREFIX: Final = "cf-"
_FLEET_ID: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def make_label(fleet_id: str, instance_id: int) -> str:
    """The provider label of an instance: ``cf-<fleet id>-<instance id>``."""
    if not fleet_id:
        raise ValueError("expected a non-empty fleet id")
    if instance_id < 0:
        raise ValueError(f"expected an instance id >= 0, got {instance_id}")
    return f"{label_prefix(fleet_id)}{instance_id}"


def label_prefix(fleet_id: str) -> str:
    """The start of every label of this fleet (the orphan sweep touches nothing else)."""
    return f"{LABEL_PREFIX}{fleet_id}-"


def parse_label(label: str | None, fleet_id: str) -> int | None:
    """The instance id in ``label`` when it is one of this fleet's labels, else ``None``.

    ``cf-prod-eu-7`` belongs to fleet ``prod-eu``, not to fleet ``prod``; a label
    that does not end in a number after the prefix is not one of ours.
    """
    prefix = label_prefix(fleet_id)
    if not label or not label.startswith(prefix):
        return None
    rest = label[len(prefix) :]
    return int(rest) if rest.isascii() and rest.isdigit() else None


#: The store's name for ``parse_label``.
instance_id_from_label: Final = parse_label


def check_fleet_id(fleet_id: str) -> str:
    """``fleet_id`` if it can go in a label; a ``ConfigError`` otherwise."""
    if not _FLEET_ID.match(fleet_id):
        raise ConfigError(
            f"fleet id {fleet_id!r} must be 1 to 32 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit",
            field="fleet_id",
        )
    return fleet_id
