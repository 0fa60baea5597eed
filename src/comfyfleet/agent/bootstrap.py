"""How a rented instance starts the agent: its environment and the onstart script.

The contract is ``docs/agent-protocol.md``. The provider's ``extra_env`` is visible to
anyone who can list the instance, so it carries only the five variables of
``instance_env`` (no other secret: the agent fetches its manifest and source tokens
from the control plane with its own token). The onstart script reads them, fetches
the agent wheel from the control plane, checks its sha256 against the
``X-Comfyfleet-Sha256`` header, installs it in a venv under the workspace and runs
``comfyfleet agent connect``.

Simulators and the ``local`` provider, which run the real agent on this machine,
set ``COMFYFLEET_AGENT_PYTHON`` (the interpreter comfyfleet is installed in) when they
run the script: it then skips the download and the install and runs the agent with
that interpreter, with the same environment.

Stdlib only: the agent side imports it without the server's dependencies.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

from comfyfleet import __version__
from comfyfleet.errors import ConfigError

__all__ = [
    "AGENT_PYTHON_VAR",
    "DEFAULT_WORKSPACE",
    "INSTANCE_ENV_VARS",
    "SHA256_HEADER",
    "check_control_url",
    "instance_env",
    "onstart_script",
    "redact_env",
    "wheel_filename",
]

#: The only variables an instance's environment holds (docs/agent-protocol.md).
INSTANCE_ENV_VARS: Final = (
    "COMFYFLEET_URL",
    "COMFYFLEET_TOKEN",
    "DM_INSTANCE_ID",
    "SERVER_TYPE",
    "WORKSPACE",
)
DEFAULT_WORKSPACE: Final = "/workspace"
SHA256_HEADER: Final = "X-Comfyfleet-Sha256"
#: Set by a simulator that runs the agent locally: the interpreter to run it with.
AGENT_PYTHON_VAR: Final = "COMFYFLEET_AGENT_PYTHON"
_SECRET_VARS: Final = frozenset({"COMFYFLEET_TOKEN"})
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


def check_control_url(url: str) -> str:
    """``url`` without a trailing slash if it can be an instance's ``COMFYFLEET_URL``.

    It must end in ``/api`` and use https, or plain http on loopback only (the wheel
    and the token travel over it). A ``ConfigError`` says what is wrong otherwise.
    """
    cleaned = url.strip().rstrip("/")
    parts = urlsplit(cleaned)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"expected an http(s) URL ending in /api, got {cleaned!r}", source="COMFYFLEET_URL"
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"plain http:// is allowed only on loopback; use https:// for {parts.hostname}",
            source="COMFYFLEET_URL",
        )
    if not parts.path.endswith("/api"):
        raise ConfigError(
            f"expected the control plane's API base, ending in /api, got {cleaned!r}",
            source="COMFYFLEET_URL",
        )
    return cleaned


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def instance_env(
    *,
    control_url: str,
    token: str,
    instance_id: int,
    profile: str,
    workspace: str = DEFAULT_WORKSPACE,
) -> dict[str, str]:
    """The environment an instance is created with: exactly ``INSTANCE_ENV_VARS``."""
    return {
        "COMFYFLEET_URL": check_control_url(control_url),
        "COMFYFLEET_TOKEN": token,
        "DM_INSTANCE_ID": str(int(instance_id)),
        "SERVER_TYPE": profile,
        "WORKSPACE": workspace,
    }


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` fit to show: the token is ``***`` (everything comfyfleet prints goes through it)."""
    return {key: "***" if key in _SECRET_VARS else value for key, value in env.items()}


def wheel_filename(version: str = __version__) -> str:
    """The agent wheel's file name; pip refuses a wheel whose name does not say what it is."""
    return f"comfyfleet-{version}-py3-none-any.whl"


def onstart_script(wheel: str | None = None) -> str:
    """The instance's onstart: fetch the agent wheel, check its sha256, install it, connect.

    ``wheel`` is the wheel's file name (default: this comfyfleet's own version). The
    script holds no secret: the token comes from the environment and is handed to
    curl on its standard input, never on a command line. Plain ``http://`` is refused
    unless the control plane is on loopback. With ``COMFYFLEET_AGENT_PYTHON`` set (a
    simulator running the agent locally) it runs the agent with that interpreter
    instead of installing one.
    """
    name = shlex.quote(wheel or wheel_filename())
    header = SHA256_HEADER.lower()
    run_local = (
        f'exec "${AGENT_PYTHON_VAR}" -c '
        "'import sys; from comfyfleet.cli import main; sys.argv[0] = \"comfyfleet\"; main()' "
        "agent connect"
    )
    lines = [
        "set -eu",
        'URL="${COMFYFLEET_URL:-${FCS_API_BASE_URL:-}}"',
        'WS="${WORKSPACE:-' + DEFAULT_WORKSPACE + '}"',
        'export COMFYFLEET_URL="$URL" WORKSPACE="$WS"',
        f'if [ -n "${{{AGENT_PYTHON_VAR}:-}}" ]; then',
        f"  {run_local}",
        "fi",
        'case "$URL" in',
        "  https://*|http://127.0.0.1|http://127.0.0.1[:/]*|http://localhost|http://localhost[:/]*"
        "|http://\\[::1\\]*) ;;",
        '  *) echo "comfyfleet: COMFYFLEET_URL must be https:// (plain http only on loopback)"'
        " >&2; exit 1 ;;",
        "esac",
        'DIR="$(mktemp -d)"',
        f'WHEEL="$DIR"/{name}',
        # printf is a shell builtin: the token reaches curl on stdin, never in argv.
        'printf \'header = "Authorization: Bearer %s"\\n\' "$COMFYFLEET_TOKEN" | '
        'curl -fsS --retry 5 -K - -D "$DIR/headers" -o "$WHEEL" "$URL/agent/wheel"',
        'WANT="$(tr -d \'\\r\' < "$DIR/headers" | '
        f'awk \'tolower($1) == "{header}:" {{v = $2}} END {{print v}}\')"',
        'if [ -z "$WANT" ]; then',
        f'  echo "comfyfleet: the control plane sent no {SHA256_HEADER} header" >&2',
        '  rm -rf "$DIR"; exit 1',
        "fi",
        'if ! echo "$WANT  $WHEEL" | sha256sum -c --status -; then',
        '  echo "comfyfleet: the agent wheel does not match its sha256; not installed" >&2',
        '  rm -rf "$DIR"; exit 1',
        "fi",
        'python3 -m venv "$WS/.comfyfleet" 2>/dev/null || true',
        '"$WS/.comfyfleet/bin/pip" install --quiet "$WHEEL"',
        'rm -rf "$DIR"',
        'exec "$WS/.comfyfleet/bin/comfyfleet" agent connect',
        "",
    ]
    return "\n".join(lines)
