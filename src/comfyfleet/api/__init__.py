"""The control plane's HTTP API (FastAPI): agents dial home here, admins drive the pool.

    app = create_app(store, ApiSettings.from_env(), clock=SystemClock(), pool=reconciler)

- agent routes, ``/api/agent/*``: docs/agent-protocol.md (``api/agent.py``);
- admin routes, ``/api/admin/*`` and ``/api/instances/{id}/events``, behind the
  admin key (``api/admin.py``, ``api/auth.py``), acting through a ``PoolControl``
  (``api/control.py``);
- ``/metrics`` for Prometheus (``api/metrics.py``), ``/api/health``.
"""

from comfyfleet.api.app import create_app
from comfyfleet.api.control import PoolActionError, PoolActionRefused, PoolControl, UnknownProfile
from comfyfleet.api.metrics import PoolMetrics
from comfyfleet.api.server import RunningServer, is_loopback
from comfyfleet.api.settings import AgentProfile, ApiSettings, ComfySpec
from comfyfleet.api.wheel import SHA256_HEADER, AgentWheel, onstart_script

__all__ = [
    "SHA256_HEADER",
    "AgentProfile",
    "AgentWheel",
    "ApiSettings",
    "ComfySpec",
    "PoolActionError",
    "PoolActionRefused",
    "PoolControl",
    "PoolMetrics",
    "RunningServer",
    "UnknownProfile",
    "create_app",
    "is_loopback",
    "onstart_script",
]
