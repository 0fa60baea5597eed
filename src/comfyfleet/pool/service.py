"""The warm pool inside ``comfyfleet serve``: one reconciler per provider, one admin handle.

A fleet file's profiles each name a provider (``vast`` or ``local``). ``PoolService``
builds one ``Reconciler`` per provider in use, each over its own profiles, its own
rows of the store and its own database lease (``lease_name_for``): two ``serve``
processes on one PostgreSQL elect one leader per provider. ``PoolRouter`` is the
``PoolControl`` the admin API drives: it sends each action to the reconciler of the
profile's (or the instance's) provider. ``run`` runs every reconcile loop until its
stop event is set, then closes the providers.

``prepare_profiles`` replaces each profile's placeholder download size with its
manifest's real total (``manifest check``, which asks the sources for the sizes the
manifest leaves out), so that offers are ranked on what an instance will download;
``agent_profiles`` is what the agents of each profile are told when they register.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from comfyfleet.api.control import (
    OnStartJob,
    OnStartRental,
    PoolActionRefused,
    PoolControl,
    UnknownProfile,
)
from comfyfleet.errors import ConfigError
from comfyfleet.pool.reconciler import Reconciler, ReconcilerSettings, lease_name_for
from comfyfleet.pool.runner import ReconcilerLoop
from comfyfleet.profiles import Fleet, Profile
from comfyfleet.providers.base import Provider
from comfyfleet.store.instances import get_instance

if TYPE_CHECKING:
    from comfyfleet.api.settings import AgentProfile
    from comfyfleet.clock import Clock
    from comfyfleet.manifest import Manifest
    from comfyfleet.pool.reconciler import PoolMetricsLike
    from comfyfleet.store.db import Store

__all__ = [
    "PoolRouter",
    "PoolService",
    "ProviderFactory",
    "agent_profiles",
    "default_provider_factory",
    "prepare_profiles",
]

log = logging.getLogger("comfyfleet.pool")

#: Opens the provider called by the name given (``vast``, ``local``); closed with ``aclose``.
ProviderFactory = Callable[[str], Provider]


def default_provider_factory(name: str) -> Provider:
    """The production providers: Vast.ai from the environment (``VAST_API_KEY``,
    ``VAST_URL``), or this machine."""
    if name == "vast":
        from comfyfleet.providers.vast import VastClient

        return VastClient.from_env()
    if name == "local":
        from comfyfleet.providers.local import LocalProvider

        return LocalProvider.from_env()
    raise ConfigError(f"unknown provider {name!r}; expected vast or local")


def load_manifests(fleet: Fleet) -> dict[str, Manifest]:
    """Each profile's manifest (those that name one), validated; a bad one is a ``ConfigError``."""
    from comfyfleet.manifest import load_manifest

    manifests = {}
    for name, profile in fleet.profiles.items():
        path = fleet.manifest_path(profile)
        if path is not None:
            # Inline: the agents, on other machines, cannot read the files beside it.
            manifests[name] = load_manifest(path).inlined()
    return manifests


async def prepare_profiles(
    profiles: Mapping[str, Profile],
    manifests: Mapping[str, Manifest],
    *,
    timeout_s: float = 60.0,
) -> dict[str, Profile]:
    """``profiles`` with ``manifest_bytes`` set to each manifest's real total.

    A manifest whose sources cannot all be asked in ``timeout_s`` keeps the sizes it
    declares (and the profile's own figure when it declares none); the reason is logged.
    """
    from comfyfleet.agent.provision import check_manifest

    out = dict(profiles)
    for name, manifest in manifests.items():
        profile = profiles.get(name)
        if profile is None or not manifest.models:
            continue
        try:
            result = await asyncio.wait_for(check_manifest(manifest), timeout_s)
        except Exception as error:  # a source down must not stop the control plane
            log.warning("profile %s: could not size its manifest (%s)", name, error)
            declared = sum(m.size or 0 for m in manifest.models)
            if declared:
                out[name] = profile.model_copy(
                    update={"manifest_bytes": declared, "manifest_gb": None}
                )
            continue
        unknown = len(result.unknown_sizes)
        if unknown:
            log.warning("profile %s: %d model sizes unknown; ranked without them", name, unknown)
        out[name] = profile.model_copy(
            update={"manifest_bytes": result.total_bytes, "manifest_gb": None}
        )
        log.info(
            "profile %s: the manifest downloads %.2f GB (ranking uses it)",
            name,
            result.total_bytes / 1e9,
        )
    return out


def agent_profiles(
    profiles: Mapping[str, Profile], manifests: Mapping[str, Manifest]
) -> dict[str, AgentProfile]:
    """What the agents of each profile are told at registration: manifest and ComfyUI."""
    from comfyfleet.api.settings import AgentProfile, ComfySpec

    out = {}
    for name, profile in profiles.items():
        manifest = manifests.get(name)
        out[name] = AgentProfile(
            manifest=manifest.model_dump(mode="json") if manifest is not None else None,
            comfy=ComfySpec(attach_url=profile.comfy_url, command=profile.comfy_command),
        )
    return out


class PoolRouter:
    """The admin API's ``PoolControl`` over one reconciler per provider."""

    def __init__(self, store: Store, reconcilers: Mapping[str, Reconciler]) -> None:
        self.store = store
        self.reconcilers = dict(reconcilers)

    def _for_profile(self, profile: str) -> Reconciler:
        for reconciler in self.reconcilers.values():
            if profile in reconciler.profiles:
                return reconciler
        known = [name for r in self.reconcilers.values() for name in r.profiles]
        raise UnknownProfile(profile, known)

    async def _for_instance(self, instance_id: int) -> Reconciler:
        provider = await self.store.run(lambda s: get_instance(s, instance_id).provider)
        reconciler = self.reconcilers.get(provider)
        if reconciler is None:
            raise PoolActionRefused(
                f"instance {instance_id} runs on {provider}, which no profile of this "
                "control plane uses"
            )
        return reconciler

    async def prewarm(self, profile: str, count: int, *, actor: str) -> list[int]:
        return await self._for_profile(profile).prewarm(profile, count, actor=actor)

    async def reprovision(
        self, *, instance_id: int | None, profile: str | None, actor: str
    ) -> list[int]:
        if profile is not None and instance_id is None:
            reconciler = self._for_profile(profile)
        elif instance_id is not None and profile is None:
            reconciler = await self._for_instance(instance_id)
        else:
            raise PoolActionRefused("name exactly one of an instance id and a profile")
        return await reconciler.reprovision(instance_id=instance_id, profile=profile, actor=actor)

    async def terminate(self, instance_id: int, *, reason: str, actor: str) -> None:
        reconciler = await self._for_instance(instance_id)
        await reconciler.terminate(instance_id, reason=reason, actor=actor)

    async def rent_for_job(self, profile: str, job: OnStartJob, *, actor: str) -> OnStartRental:
        return await self._for_profile(profile).rent_for_job(profile, job, actor=actor)


@dataclass
class PoolService:
    """The reconcilers of a control plane, their loops, and the router over them."""

    store: Store
    reconcilers: dict[str, Reconciler]
    providers: dict[str, Provider]
    interval_s: float | None = None
    loops: dict[str, ReconcilerLoop] = field(default_factory=dict)
    #: Reads the fleet file again (``comfyfleet serve``): run on SIGHUP while ``run`` runs.
    reloader: Callable[[], Awaitable[Mapping[str, Profile]]] | None = None
    _reloads: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(
        cls,
        store: Store,
        profiles: Mapping[str, Profile],
        settings: ReconcilerSettings,
        *,
        clock: Clock | None = None,
        metrics: PoolMetricsLike | None = None,
        providers: ProviderFactory = default_provider_factory,
        holder: str | None = None,
    ) -> PoolService:
        """One reconciler per provider named by ``profiles``; ``settings`` is shared, with
        each provider's name and lease. A provider that cannot be opened is an error."""
        by_provider: dict[str, dict[str, Profile]] = {}
        for name, profile in profiles.items():
            by_provider.setdefault(profile.provider, {})[name] = profile
        opened: dict[str, Provider] = {}
        reconcilers: dict[str, Reconciler] = {}
        for provider_name, own in sorted(by_provider.items()):
            provider = providers(provider_name)
            opened[provider_name] = provider
            own_settings = _with_provider(settings, provider_name)
            reconcilers[provider_name] = Reconciler(
                store, provider, own, own_settings, clock=clock, metrics=metrics, holder=holder
            )
        return cls(store=store, reconcilers=reconcilers, providers=opened)

    @property
    def control(self) -> PoolControl:
        return PoolRouter(self.store, self.reconcilers)

    @property
    def profiles(self) -> dict[str, Profile]:
        return {name: p for rec in self.reconcilers.values() for name, p in rec.profiles.items()}

    def update_profiles(self, profiles: Mapping[str, Profile]) -> list[str]:
        """Take a new version of the fleet's profiles (a reload of the fleet file): each
        reconciler's next pass plans with them. Returns what changed, as lines to log.

        A profile whose provider no reconciler runs is refused (``ConfigError``): a new
        provider needs a restart. A profile that is gone rents nothing more; its
        instances run on, still watched by the failure policy, until terminated.
        """
        missing = sorted(
            f"{name} ({p.provider})"
            for name, p in profiles.items()
            if p.provider not in self.reconcilers
        )
        if missing:
            raise ConfigError(
                f"profiles on a provider this control plane does not run: {', '.join(missing)}; "
                "restart `comfyfleet serve` to add a provider"
            )
        before = self.profiles
        changes = []
        for name in sorted(set(before) | set(profiles)):
            old, new = before.get(name), profiles.get(name)
            if old == new:
                continue
            if old is None:
                changes.append(f"profile {name} added")
            elif new is None:
                changes.append(f"profile {name} removed")
            else:
                fields = sorted(
                    k for k in type(new).model_fields if getattr(old, k) != getattr(new, k)
                )
                changes.append(f"profile {name}: {', '.join(fields)} changed")
        for provider, reconciler in self.reconcilers.items():
            reconciler.profiles = {n: p for n, p in profiles.items() if p.provider == provider}
            reconciler.wake()
        return changes

    async def run(self, stop: asyncio.Event) -> None:
        """Every reconcile loop until ``stop``; then the leases are released and the
        providers closed."""
        self.loops = {
            name: ReconcilerLoop(rec, interval_s=self.interval_s)
            for name, rec in self.reconcilers.items()
        }
        tasks = [
            asyncio.create_task(loop.run(stop), name=f"reconciler-{name}")
            for name, loop in self.loops.items()
        ]
        hangup = self._on_sighup()
        try:
            await asyncio.gather(*tasks)
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.aclose()

    async def reload(self) -> list[str]:
        """Read the fleet file again (``reloader``) and plan with its profiles from now on."""
        if self.reloader is None:
            return []
        changes = self.update_profiles(await self.reloader())
        for line in changes or ["fleet file reloaded: nothing changed"]:
            log.info("%s", line)
        return changes

    def _on_sighup(self) -> bool:
        """Reload on SIGHUP, where this loop can take signals (the main thread)."""
        if self.reloader is None or not hasattr(signal, "SIGHUP"):
            return False
        loop = asyncio.get_running_loop()

        async def reload_logged() -> None:
            try:
                await self.reload()
            except Exception as error:  # a bad edit must not stop the pool
                log.error("fleet file not reloaded, the pool keeps its profiles: %s", error)

        def hangup() -> None:
            task = loop.create_task(reload_logged())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

        try:
            loop.add_signal_handler(signal.SIGHUP, hangup)
        except (RuntimeError, ValueError, NotImplementedError):
            return False  # not the main thread
        return True

    async def aclose(self) -> None:
        for provider in self.providers.values():
            close: Callable[[], Awaitable[Any]] | None = getattr(provider, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


def _with_provider(settings: ReconcilerSettings, provider: str) -> ReconcilerSettings:
    import dataclasses

    return dataclasses.replace(
        settings, provider_name=provider, lease_name=lease_name_for(provider)
    )
