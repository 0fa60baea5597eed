"""The provider interface and the typed values it speaks.

``Offer`` and ``Instance`` follow Vast.ai's field names and units (the
marketplace comfyfleet is built for): ``gpu_ram`` in MB, ``inet_down`` in
Mb/s, ``inet_down_cost`` in $/GB, ``dph_total`` in $/h with the requested
storage included. Fields we do not model stay available through pydantic's
extra storage (``offer.model_extra``), so nothing the provider sent is lost.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class Offer(BaseModel):
    """A rentable machine (a Vast "ask"). ``id`` is what ``create`` takes."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: int
    machine_id: int = 0
    host_id: int = 0
    num_gpus: int = 1
    gpu_name: str = ""
    gpu_ram: float = 0.0  # MB per GPU
    gpu_total_ram: float = 0.0  # MB
    compute_cap: int = 0  # CUDA capability x 100
    cuda_max_good: float = 0.0
    driver_version: str | None = None
    cpu_cores_effective: float = 0.0
    cpu_ram: float = 0.0  # MB
    disk_space: float = 0.0  # GB
    disk_bw: float = 0.0  # MB/s
    inet_up: float = 0.0  # Mb/s
    inet_down: float = 0.0  # Mb/s
    inet_up_cost: float = 0.0  # $/GB
    inet_down_cost: float = 0.0  # $/GB
    direct_port_count: int = 0
    dph_base: float = 0.0  # $/h, GPU only
    dph_total: float = 0.0  # $/h, storage at the searched allocated_storage included
    storage_cost: float = 0.0  # $/GB/month
    storage_total_cost: float = 0.0  # $/h
    min_bid: float = 0.0
    reliability: float = Field(
        default=0.0, validation_alias=AliasChoices("reliability", "reliability2")
    )
    verification: str | None = None
    geolocation: str | None = None
    static_ip: bool = False
    rentable: bool = True
    rented: bool = False
    hosting_type: int | None = None
    dlperf: float | None = None

    @property
    def country_code(self) -> str:
        """The two-letter country code that ends ``geolocation`` ("Oregon, US" -> "US")."""
        if not self.geolocation:
            return ""
        return self.geolocation.rsplit(",", 1)[-1].strip().upper()

    @property
    def vram_gb(self) -> float:
        return self.gpu_ram / 1000.0

    @property
    def verified(self) -> bool:
        return self.verification == "verified"


class Instance(BaseModel):
    """A rented machine (a Vast "contract"). ``id`` is the contract id."""

    model_config = ConfigDict(extra="allow")

    id: int
    machine_id: int = 0
    host_id: int = 0
    actual_status: str | None = None
    intended_status: str | None = None
    cur_state: str | None = None
    next_state: str | None = None
    status_msg: str | None = None
    label: str | None = None
    image_uuid: str | None = None
    image_runtype: str | None = None
    onstart: str | None = None
    extra_env: list[list[str]] = Field(default_factory=list)
    public_ipaddr: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    direct_port_start: int | None = None
    direct_port_end: int | None = None
    direct_port_count: int | None = None
    ports: dict[str, list[dict[str, str]]] | None = None
    num_gpus: int = 0
    gpu_name: str | None = None
    gpu_ram: float | None = None
    disk_space: float | None = None
    inet_up: float | None = None
    inet_down: float | None = None
    inet_down_cost: float | None = None
    dph_base: float | None = None
    dph_total: float | None = None
    reliability2: float | None = None
    geolocation: str | None = None
    start_date: float | None = None
    end_date: float | None = None
    uptime_mins: float | None = None

    def host_port(self, container_port: int, proto: str = "tcp") -> int | None:
        """The public host port mapped to ``container_port``, or None while unmapped."""
        if not self.ports:
            return None
        mapping = self.ports.get(f"{container_port}/{proto}")
        if not mapping:
            return None
        try:
            return int(mapping[0]["HostPort"])
        except (KeyError, ValueError, IndexError):
            return None

    def env(self) -> dict[str, str]:
        """``extra_env`` (a list of pairs on the wire) as a dict."""
        return {pair[0]: pair[1] for pair in self.extra_env if len(pair) == 2}


class CreateRequest(BaseModel):
    """What to run on a rented offer (the body of Vast's ``PUT /asks/{id}/``)."""

    image: str
    disk_gb: float
    label: str
    env: dict[str, str] = Field(default_factory=dict)
    onstart: str | None = None
    runtype: str = "ssh_direc ssh_proxy"
    args: list[str] | None = None
    price: float | None = None  # set: an interruptible bid in $/h; None: on-demand


class UserInfo(BaseModel):
    """The account behind the API key."""

    model_config = ConfigDict(extra="allow")

    id: int
    email: str | None = None
    username: str | None = None
    credit: float = 0.0
    balance: float | None = None


class Provider(Protocol):
    """The few operations comfyfleet needs from a GPU marketplace.

    Each provider keeps its quirks inside its own module (as SkyPilot's
    provisioners do); callers see only these calls and ``comfyfleet.errors``.
    """

    async def search_offers(
        self, query: dict[str, Any], *, allocated_storage_gb: float, limit: int | None = None
    ) -> list[Offer]: ...

    async def create_instance(self, offer_id: int, request: CreateRequest) -> int: ...

    async def get_instance(self, instance_id: int) -> Instance: ...

    async def list_instances(self) -> list[Instance]: ...

    async def destroy_instance(self, instance_id: int) -> None: ...

    async def instance_logs(self, instance_id: int, *, tail: int | None = None) -> str: ...

    async def current_user(self) -> UserInfo: ...
