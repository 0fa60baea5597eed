"""A local Vast.ai-compatible API server, and the market model behind it.

What it is for: ``make test`` and ``comfyfleet demo`` run comfyfleet's real
Vast client (and the official ``vastai`` CLI) against this server on loopback,
with no account and no network. It follows ``shared/reference/vast-api.md``
field for field: the same paths, auth, bodies, units and quirks (the exact
``Content-Type: application/json``, ``{"instances": {...}}`` for one instance,
``extra_env`` as a list of pairs, ``ports`` only while running, 200 with
``success: false``, plain-text 429s without ``Retry-After``).

The module has four parts, top to bottom:

1. **Market model** (``generate_offers`` and the ground-truth functions
   ``realised_inet_down_mbps``, ``boot_seconds``, ``attempt_fails``, and
   ``rental_attempt`` that bills one rental with them), a seeded catalog of
   offers whose distributions are named constants with their source.
2. **Search engine**: one filter/order/price engine behind both search endpoints.
3. **State** (``SimConfig``, ``VastSim``): offers, instances, credit, faults. The
   lifecycle is derived lazily from an injectable clock on each request, under a
   lock, so there are no background tasks and a ``ManualClock`` makes tests instant.
4. **HTTP** (``create_app``, ``RunningSim``, ``serve``).

Instance lifecycle
------------------
``actual_status``: ``null`` (scheduling) → ``created`` → ``loading`` (image pull)
→ ``running``. The durations are ``SimConfig.scheduling_s``, ``created_s`` and
``loading_s``, each stretched by a seeded jitter of ±``SimConfig.jitter``. With
``SimConfig.realistic_boot`` the loading time is ``boot_seconds`` of the offer and
``attempt_fails`` decides whether the container ends in ``load_failed``.
A stop keeps the disk (storage billed); a start goes back through ``loading``.

Billing: storage (``storage_cost`` $/GB/month * disk / 730 per hour) from
creation until destroy; GPU time (``dph_base``) only while ``running``. It is
settled lazily on every request; when credit reaches 0 or less, running instances are
stopped at the moment credit hit zero (``actual_status`` and ``intended_status``
become ``stopped``, ``status_msg`` says why), as Vast's billing docs describe.

Faults
------
Configured at start with ``SimConfig.faults`` (strings, ``name`` or ``name:value``,
what ``comfyfleet sim vast --fault`` passes) or at runtime with
``POST /_sim/faults`` (same API-key rule as the API). JSON body, every key optional::

    {
      "clear": true,                 # first reset every fault
      "rate_limit": 3,               # next 3 API requests: 429, text/plain
                                     #   "API requests too frequent endpoint threshold=4.5"
      "server_errors": 2,            # next 2 API requests: 5xx (cycling 502, 503, 504)
      "server_error_status": 503,    # ... or always this status
      "delay_s": 1.5,                # every API request waits 1.5 s (real time); 0 clears
      "delay_requests": 4,           # ... only the next 4 requests (default: all)
      "offer_taken": 1,              # next create of any offer: someone else rents it
                                     #   first, the answer is 404 no_such_ask
      "next_instances": ["no_space", "ok", "vanish"]
                                     # queued: each created instance takes the next one
    }

Instance faults (for ``next_instances``; ``"ok"`` is a healthy instance):

* ``no_space``: stuck in ``loading``; ``status_msg`` is the overlayfs
  "no space left on device" error of seed 002.
* ``load_failed``: ``actual_status`` becomes ``load_failed`` instead of ``running``.
* ``no_ports``: reaches ``running`` but ``direct_port_start/end`` are -1 and
  ``ports`` never appears.
* ``vanish``: runs, then after ``SimConfig.vanish_after_s`` the host goes
  ``offline`` (GPU billing stops), and ``SimConfig.gone_after_s`` later the
  instance is gone (404 / ``{"instances": null}``).

The answer of ``POST /_sim/faults`` is the fault state after the change. Start-time
strings: ``rate_limit:N``, ``server_errors:N``, ``slow:SECONDS`` (all requests),
``offer_taken:N``, and ``no_space[:N]``, ``load_failed[:N]``, ``no_ports[:N]``,
``vanish[:N]`` (the next N created instances, default 1).

Other control endpoints: ``POST /_sim/clock/advance {"seconds": S}`` (only with a
``ManualClock``), ``GET /_sim/state`` (debugging dump).

Running the onstart
-------------------
With ``SimConfig.run_onstart`` each instance's onstart script really runs, on this
machine, as a process tree of ``comfyfleet.providers.process.LocalProcesses``: it starts
when the instance reaches ``running`` on the simulator's clock, and is killed (with
everything it started) when the instance is destroyed, stopped (by a call or by credit
running out) or goes offline; a restart runs it again. Its environment is the
instance's ``extra_env``, then ``SimConfig.host_env``, then ``COMFYFLEET_AGENT_PYTHON``
(``SimConfig.agent_python``, default this interpreter: the onstart then runs the real
agent from this installation) and ``WORKSPACE`` rewritten to
``<workspace_root>/<contract id>`` (the instance log says what it asked for). Unless one
of them names ``COMFY_PORT``, each instance gets a free port of its own (instances on
one machine share its ports). Nothing else of the simulator's environment is passed on.
Its output is appended to the instance's log. A watcher thread (``start_watcher``,
started by ``RunningSim`` and ``serve``) looks at the live instances every 50 ms, and
create, manage, destroy and ``advance`` look at once, so a destroy kills at once.
The listing endpoints do no process work.

Choices where the reference is silent
-------------------------------------
* ``allocated_storage`` absent from a search: 8 GB, the spec's server default
  (the SDK and CLI always send it, 5.0 by default).
* Insufficient credit on create: 400 ``{"success": false, "error":
  "insufficient_credit", "msg": "Insufficient credit"}`` when credit is below one
  hour of the offer's ``dph_total`` at the requested disk.
* A wrong key is 401 ``Invalid user key`` except on search and ``users/current``,
  which the spec gives 404 with the same body. No key is 403 ``This action
  requires login.`` everywhere the API needs one (all but ``gpu_names`` and log URLs).
* ``type: "bid"`` prices ``dph_total`` at ``min_bid``; ``reserved`` as on-demand.
* Offers are one per machine (no 1x/2x/4x splits of one machine). A search
  without ``limit`` returns every match. A destroyed instance's offer goes
  back on the market; an offer taken by "someone else" never does.
* ``create`` refuses a ``disk`` larger than the offer's ``disk_space``
  (400 ``invalid_args``). Renting maps at most ``min(direct_port_count, 20)``
  ports: 22 (``ssh_direc``), 8080 (``jupyter_direc``), then the ``-p`` keys.
* ``GET /instances/{id}/``: a destroyed or vanished instance is 200
  ``{"instances": null}``; an id never seen is 404 ``no_such_instance``.
  ``PUT`` on a destroyed instance is the 200 ``success: false`` quirk; a label
  over 1024 characters is 400 ``label_too_long`` (the spec's status).
* Credit exhaustion sets ``intended_status`` to ``stopped`` too, and a start
  with no credit answers 200 ``success: false`` (``missing_billing``).
  ``balance`` in ``users/current`` mirrors ``credit``; ``api_key`` is never sent.
  Bandwidth is not billed (no traffic is simulated).
* v1 list: ``limit`` defaults to 25 (max 25, <= 0 means 5); the cursor is
  base64 JSON ``{"values": {<order columns>, "id"}}`` as in the reference's
  example, read from ``after_token`` (or ``next_token``).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import math
import random
import re
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydantic_core
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from comfyfleet.clock import Clock, ManualClock, ScaledClock, SystemClock
from comfyfleet.providers.process import LocalProcesses, instance_env_here, read_tail

log = logging.getLogger("comfyfleet.sim.vast")

# ---------------------------------------------------------------------------
# 1. Market model
#
# Sources: public Vast.ai listings and price pages as of 2024-2025 (console
# search, vast.ai/pricing) and general knowledge of hosting. Numbers are round
# and honest, not tuned for any ranking: price is drawn independently of
# network speed, bandwidth cost and reliability. The only correlations are
# through ``hosting_type`` (datacenters have faster uplinks, are more often
# verified and a little more reliable), and they are modest.
#
# Each distribution below says where it comes from on a "Source:" line. None
# is fitted to a data dump of the marketplace (we have none): they are ranges
# read off public listings and pages, written down as round numbers. The
# benchmark that depends on them most (bench/ranking_savings.py) says so too.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuModel:
    """One GPU model of the catalog."""

    name: str
    gpu_ram_mb: int  # as Vast reports it, MB per GPU
    compute_cap: int  # CUDA capability x 100
    dlperf: float  # Vast's DLPerf score for one GPU (approximate)
    tflops: float  # FP32 TFLOPS for one GPU (approximate)
    price_lo: float  # $/h per GPU, on-demand: low end of the usual range
    price_hi: float  # $/h per GPU, on-demand: high end
    datacenter_share: float  # fraction of offers hosted in datacenters
    weight: float  # relative share of the catalog
    min_cuda: float  # oldest CUDA the card runs with (Blackwell needs 12.8)
    max_gpus: int  # largest rig offered


# Per-GPU on-demand prices are the usual ranges of Vast's public listings
# (2024-2025): consumer cards $0.05-1/h, RTX 4090 about $0.3-0.7, A100 $0.6-1.6,
# H100 $1.5-3. Weights approximate how often each model shows up in search
# results: many 3090/4090s, a visible H100 SXM pool, few old cards. The small
# cards (RTX 3060 12 GB, RTX 2080 Ti 11 GB, RTX 3080 10 GB) exist so that
# memory filters have something to reject.
# Source: Vast's console search and vast.ai/pricing (2024-2025), read by hand;
# DLPerf and TFLOPS from the listings' columns and NVIDIA's data sheets.
GPU_MODELS: Final[tuple[GpuModel, ...]] = (
    GpuModel("RTX 2080 Ti", 11264, 750, 13.0, 13.4, 0.06, 0.15, 0.05, 3, 10.0, 8),
    GpuModel("RTX 3060", 12288, 860, 9.0, 12.7, 0.04, 0.12, 0.05, 5, 11.0, 4),
    GpuModel("RTX 3080", 10240, 860, 17.0, 29.8, 0.07, 0.18, 0.05, 4, 11.0, 8),
    GpuModel("RTX 4070 Ti", 12282, 890, 18.0, 40.1, 0.08, 0.20, 0.05, 3, 11.8, 4),
    GpuModel("RTX 3090", 24576, 860, 22.0, 35.6, 0.13, 0.35, 0.15, 16, 11.0, 8),
    GpuModel("RTX 4090", 24564, 890, 40.0, 82.6, 0.28, 0.70, 0.20, 18, 11.8, 8),
    GpuModel("RTX 5090", 32607, 1200, 55.0, 104.8, 0.45, 1.10, 0.25, 8, 12.8, 8),
    GpuModel("RTX A5000", 24564, 860, 19.0, 27.8, 0.15, 0.35, 0.40, 5, 11.0, 8),
    GpuModel("RTX A6000", 49140, 860, 27.0, 38.7, 0.35, 0.80, 0.45, 6, 11.0, 8),
    GpuModel("L40S", 46068, 890, 45.0, 91.6, 0.55, 1.10, 0.70, 5, 11.8, 8),
    GpuModel("A100 PCIE", 81920, 800, 40.0, 19.5, 0.60, 1.40, 0.80, 4, 11.0, 8),
    GpuModel("A100 SXM4", 81920, 800, 50.0, 19.5, 0.75, 1.60, 0.85, 5, 11.0, 8),
    GpuModel("H100 PCIE", 81559, 900, 70.0, 51.2, 1.50, 2.50, 0.90, 3, 11.8, 8),
    GpuModel("H100 SXM", 81559, 900, 90.0, 66.9, 1.60, 3.00, 0.90, 8, 11.8, 8),
)

# GPUs per offer: single cards dominate Vast listings; datacenter parts often
# come as 8x SXM boards.
# Source: the "# GPUs" filter of Vast's console search (2024-2025), by hand.
NUM_GPUS_CONSUMER: Final[tuple[tuple[int, float], ...]] = ((1, 60), (2, 20), (4, 12), (8, 8))
NUM_GPUS_DATACENTER_PART: Final[tuple[tuple[int, float], ...]] = (
    (1, 45),
    (2, 15),
    (4, 15),
    (8, 25),
)

# Host regions ("State, CC", as Vast's geolocation) and their share. Vast's
# supply is mostly North America and Europe, with a sizeable East Asian part
# (CN, VN, KR, TW, HK) that users often exclude by country code.
# Source: the location column of Vast's console search (2024-2025), by hand;
# the exclusion of CN and VN is seed 000's ("Excludes certain regions").
# fmt: off
REGIONS: Final[tuple[tuple[str, float], ...]] = (
    ("California, US", 7), ("Texas, US", 6), ("Oregon, US", 3), ("Washington, US", 2),
    ("New York, US", 3), ("Florida, US", 2), ("Virginia, US", 3), ("Illinois, US", 2),
    ("Utah, US", 2), ("Georgia, US", 2), ("Quebec, CA", 3), ("Ontario, CA", 2),
    ("Bavaria, DE", 3), ("Hesse, DE", 2), ("North Holland, NL", 3), ("Ile-de-France, FR", 2),
    ("England, GB", 3), ("Stockholm, SE", 2), ("Oslo, NO", 1), ("Uusimaa, FI", 1),
    ("Masovia, PL", 2), ("Prague, CZ", 1), ("Madrid, ES", 1), ("Lombardy, IT", 1),
    ("Bucharest, RO", 1), ("Kyiv, UA", 1), ("Guangdong, CN", 3), ("Hanoi, VN", 2),
    ("Seoul, KR", 2), ("Taipei, TW", 2), ("Hong Kong, HK", 1), ("Singapore, SG", 1),
    ("Tokyo, JP", 1), ("Maharashtra, IN", 1), ("New South Wales, AU", 1), ("Sao Paulo, BR", 1),
)
# fmt: on

# Advertised download speed (Vast's periodic speedtest, Mb/s). Home hosts sit on
# residential fibre/cable: mostly 100-1000 Mb/s, a tail down to ~10 Mb/s and a
# few multi-gigabit links. Datacenters: 1-10 Gb/s uplinks. Log-normal
# (median, sigma) clipped to (low, high).
# Source: the "Inet Down" values of Vast listings (2024-2025) and the range of
# the console's internet-speed filter (~10 Mb/s to 10+ Gb/s), read by hand; the
# home/datacenter split from the usual residential and datacenter uplinks.
INET_DOWN_HOME_MBPS: Final = (450.0, 0.9, 10.0, 2500.0)
INET_DOWN_DATACENTER_MBPS: Final = (2500.0, 0.7, 200.0, 10000.0)
# Upload as a fraction of download: residential links are asymmetric.
# Source: general knowledge of residential (cable, DSL) and datacenter links.
INET_UP_RATIO_HOME: Final = (0.1, 1.0)
INET_UP_RATIO_DATACENTER: Final = (0.7, 1.0)

# Bandwidth price per TB (Vast shows $/TB; the API's inet_*_cost is $/GB).
# Many hosts charge nothing for downloads, most of the rest $1-20/TB, a tail
# up to $100/TB. Drawn independently of the GPU price and of the speed.
# Each entry: (weight, low $/TB, high $/TB), log-uniform inside (0 = free).
# Source: the "$/TB" download prices on Vast listings (2024-2025), read by
# hand; the shares are estimates, not counts. For scale, Vast once charged
# everyone a flat $0.02/GB = $20/TB (fast.ai course-v3, docs/start_vastai.md,
# 2018). This is the most uncertain distribution that bench/ranking_savings.py
# depends on, and it prints the saving with every host's bandwidth free too.
INET_DOWN_COST_PER_TB: Final[tuple[tuple[float, float, float], ...]] = (
    (0.40, 0.0, 0.0),
    (0.48, 1.0, 20.0),
    (0.12, 20.0, 100.0),
)
# Upload is more often priced than download on Vast.
# Source: the "$/TB" upload prices on Vast listings (2024-2025), by hand.
INET_UP_COST_PER_TB: Final[tuple[tuple[float, float, float], ...]] = (
    (0.25, 0.0, 0.0),
    (0.55, 1.0, 20.0),
    (0.20, 20.0, 100.0),
)

# Disk price, $/GB/month, log-uniform. Seed 002 saw ~$0.033/h for 120 GB,
# i.e. $0.20/GB/month; listings range ~$0.05-0.40.
# Source: seed 002 and the disk prices of Vast listings (2024-2025), by hand.
STORAGE_COST_PER_GB_MONTH: Final = (0.05, 0.40)
HOURS_PER_MONTH: Final = 730.0

# Unreliability (1 - reliability) is log-normal: most hosts 0.95-0.999, a tail
# of flaky ones down to 0.7. (median, sigma, floor of reliability).
# Source: the reliability column of Vast listings (2024-2025), by hand; seed
# 000 filters at 95%, which keeps most of them.
UNRELIABILITY_HOME: Final = (0.02, 0.9, 0.70)
UNRELIABILITY_DATACENTER: Final = (0.01, 0.9, 0.80)
# Share of verified hosts. Source: Vast's "verified" filter (2024-2025), by hand.
VERIFIED_SHARE_HOME: Final = 0.75
VERIFIED_SHARE_DATACENTER: Final = 0.95
# "external" offers (outside Vast's own marketplace); default searches drop them.
# Source: an estimate; only their existence matters (the reference's base filters).
EXTERNAL_SHARE: Final = 0.04

# Open direct ports: some hosts have none (proxy only), some a handful, most
# a range of tens to hundreds. (weight, low, high), log-uniform.
# Source: the "direct ports" column of Vast listings (2024-2025), by hand; the
# hosts with none are why seed 002 added a direct-port filter.
DIRECT_PORTS: Final[tuple[tuple[float, int, int], ...]] = (
    (0.10, 0, 0),
    (0.10, 1, 9),
    (0.80, 10, 1000),
)

# Free disk on the machine, GB, log-uniform. Small values exist so that a
# 100+ GB profile rejects them (seed 002 needed 250 GB for ComfyUI).
# Source: the disk column of Vast listings (2024-2025), by hand.
DISK_SPACE_HOME_GB: Final = (20.0, 2000.0)
DISK_SPACE_DATACENTER_GB: Final = (100.0, 8000.0)
# Disk bandwidth, MB/s: SATA SSDs to NVMe. Source: the drives' usual speeds.
DISK_BW_MBPS: Final = (300.0, 6000.0)

# Max CUDA of the driver, with the driver version that brings it, and weights
# (most hosts run 12.x drivers from the last two years).
# Source: the "Max CUDA" column of Vast listings (2024-2025), by hand; driver
# versions from NVIDIA's release notes.
CUDA_DRIVERS: Final[tuple[tuple[float, str, float], ...]] = (
    (11.8, "520.61.05", 3),
    (12.0, "525.147.05", 3),
    (12.2, "535.183.01", 12),
    (12.4, "550.127.05", 18),
    (12.6, "560.35.03", 14),
    (12.8, "570.133.07", 25),
    (12.9, "575.57.08", 25),
)

# Max rental duration left on the host's listing, days, log-uniform.
# Source: the "Max Duration" column of Vast listings, by hand (unused by ranking).
DURATION_DAYS: Final = (1.0, 180.0)
# Interruptible floor as a share of the on-demand price.
# Source: vast.ai/pricing ("Interruptible: 50%+ cheaper"), widened both ways.
MIN_BID_SHARE: Final = (0.3, 0.7)
# Offer and machine ids look like Vast's (8 and 5 digits).
FIRST_OFFER_ID: Final = 20_000_000
FIRST_MACHINE_ID: Final = 10_000
FIRST_HOST_ID: Final = 100_000
# Machines per host (one host often lists several rigs).
MACHINES_PER_HOST: Final = (1, 6)
# Epoch used for the listings' start_date when no clock is given.
CATALOG_EPOCH: Final = 1_700_000_000.0
# allocated_storage (GB) used when a search does not say (the spec's default).
DEFAULT_ALLOCATED_STORAGE_GB: Final = 8.0

_CPU_NAMES: Final = (
    "AMD Ryzen 9 5950X 16-Core Processor",
    "AMD Ryzen 9 7950X 16-Core Processor",
    "AMD EPYC 7543 32-Core Processor",
    "AMD EPYC 9354 32-Core Processor",
    "Intel Xeon Gold 6338",
    "Intel Core i9-13900K",
    "Intel Xeon Platinum 8480+",
)
_MOBOS: Final = ("ROMED8-2T", "X570 AORUS ELITE", "H12SSL-i", "PRO WS WRX80E-SAGE", "B650M")


def _cumulative(weights: Sequence[float]) -> list[float]:
    total = 0.0
    out = []
    for w in weights:
        total += w
        out.append(total)
    return out


_DIRECT_PORT_TIERS: Final = tuple((w, float(lo), float(hi)) for w, lo, hi in DIRECT_PORTS)
_GPU_CUM: Final = _cumulative([g.weight for g in GPU_MODELS])
_REGION_CUM: Final = _cumulative([w for _, w in REGIONS])
_CUDA_CUM: Final = _cumulative([w for _, _, w in CUDA_DRIVERS])


def _pick(rng: random.Random, cum: list[float]) -> int:
    return bisect.bisect_right(cum, rng.random() * cum[-1])


def _pick_weighted(rng: random.Random, pairs: Sequence[tuple[int, float]]) -> int:
    total = sum(w for _, w in pairs)
    x = rng.random() * total
    for value, w in pairs:
        x -= w
        if x < 0:
            return value
    return pairs[-1][0]


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    if lo <= 0 or hi <= lo:
        return lo
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _lognormal_clipped(rng: random.Random, spec: tuple[float, float, float, float]) -> float:
    median, sigma, lo, hi = spec
    return min(hi, max(lo, rng.lognormvariate(math.log(median), sigma)))


def _tiered(rng: random.Random, tiers: Sequence[tuple[float, float, float]]) -> float:
    x = rng.random() * sum(t[0] for t in tiers)
    for weight, lo, hi in tiers:
        x -= weight
        if x < 0:
            return _log_uniform(rng, lo, hi) if hi > 0 else 0.0
    return 0.0


def _driver_code(version: str) -> int:
    """``535.86.05`` → ``535086005``, the CLI's numeric encoding."""
    parts = [int(p) for p in version.split(".")] + [0, 0]
    return parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]


def storage_dph(storage_cost_gb_month: float, gb: float) -> float:
    """Hourly price of ``gb`` of disk at ``storage_cost`` ($/GB/month)."""
    return storage_cost_gb_month * gb / HOURS_PER_MONTH


def price_offer(
    offer: dict[str, Any],
    allocated_storage: float = DEFAULT_ALLOCATED_STORAGE_GB,
    offer_type: str = "on-demand",
) -> dict[str, Any]:
    """Set the price fields that depend on the search (storage size, bid or not), in place."""
    bid = offer_type == "bid"
    gpu = float(offer["min_bid"] if bid else offer["dph_base"])
    disk = storage_dph(float(offer["storage_cost"]), allocated_storage)
    total = gpu + disk
    offer["is_bid"] = bid
    offer["storage_total_cost"] = disk
    offer["dph_total"] = total
    offer["discounted_dph_total"] = total
    offer["dph_total_adj"] = total
    offer["dlperf_per_dphtotal"] = round(float(offer["dlperf"]) / total, 4) if total else 0.0
    offer["flops_per_dphtotal"] = round(float(offer["total_flops"]) / total, 4) if total else 0.0
    prices = {
        "gpuCostPerHour": gpu,
        "diskHour": disk,
        "totalHour": total,
        "discountTotalHour": 0.0,
        "discountedTotalPerHour": total,
    }
    offer["search"] = prices
    offer["instance"] = dict(prices)
    return offer


def generate_offers(seed: int, n: int, *, now: float = CATALOG_EPOCH) -> list[dict[str, Any]]:
    """A deterministic catalog of ``n`` offers, as the JSON dicts Vast's search returns.

    Prices are for the default ``allocated_storage``; ``price_offer`` reprices for
    a search. ``now`` sets the listings' ``start_date``.
    """
    rng = random.Random(seed)
    offers: list[dict[str, Any]] = []
    offer_id = FIRST_OFFER_ID + rng.randrange(0, 1_000_000)
    host_id = FIRST_HOST_ID + rng.randrange(0, 10_000)
    machines_left_on_host = 0
    host_region = 0
    host_datacenter = False
    for i in range(n):
        if machines_left_on_host <= 0:
            host_id += rng.randint(1, 50)
            machines_left_on_host = rng.randint(*MACHINES_PER_HOST)
            host_region = _pick(rng, _REGION_CUM)
            host_datacenter = rng.random() < 0.3
        machines_left_on_host -= 1
        offer_id += rng.randint(1, 400)
        gpu = GPU_MODELS[_pick(rng, _GPU_CUM)]
        # A host's kind comes from its first machine, but a datacenter part on a
        # home host is still often a datacenter listing.
        datacenter = host_datacenter or rng.random() < gpu.datacenter_share * 0.6
        table = NUM_GPUS_DATACENTER_PART if gpu.datacenter_share >= 0.7 else NUM_GPUS_CONSUMER
        num_gpus = min(_pick_weighted(rng, table), gpu.max_gpus)

        per_gpu = _log_uniform(rng, gpu.price_lo, gpu.price_hi)
        dph_base = round(per_gpu * num_gpus, 4)
        storage_cost = round(_log_uniform(rng, *STORAGE_COST_PER_GB_MONTH), 4)

        inet_down = _lognormal_clipped(
            rng, INET_DOWN_DATACENTER_MBPS if datacenter else INET_DOWN_HOME_MBPS
        )
        up_lo, up_hi = INET_UP_RATIO_DATACENTER if datacenter else INET_UP_RATIO_HOME
        inet_up = inet_down * rng.uniform(up_lo, up_hi)
        down_tb = round(_tiered(rng, INET_DOWN_COST_PER_TB), 3)
        up_tb = round(_tiered(rng, INET_UP_COST_PER_TB), 3)

        median, sigma, floor = UNRELIABILITY_DATACENTER if datacenter else UNRELIABILITY_HOME
        reliability = max(floor, 1.0 - rng.lognormvariate(math.log(median), sigma))
        reliability = round(min(reliability, 0.9995), 4)
        verified = rng.random() < (VERIFIED_SHARE_DATACENTER if datacenter else VERIFIED_SHARE_HOME)

        ports = round(_tiered(rng, _DIRECT_PORT_TIERS))

        cuda_idx = _pick(rng, _CUDA_CUM)
        cuda, driver, _ = CUDA_DRIVERS[cuda_idx]
        if cuda < gpu.min_cuda:
            cuda, driver, _ = CUDA_DRIVERS[-1]

        disk_space = round(
            _log_uniform(rng, *(DISK_SPACE_DATACENTER_GB if datacenter else DISK_SPACE_HOME_GB)), 1
        )
        disk_bw = round(_log_uniform(rng, *DISK_BW_MBPS), 1)
        cores_per_gpu = rng.choice((4, 6, 8, 12, 16, 24, 32))
        ram_per_gpu_gb = rng.choice((16, 32, 48, 64, 96, 128, 256))
        duration = _log_uniform(rng, *DURATION_DAYS) * 86400.0
        start_date = now - rng.uniform(3600.0, 90 * 86400.0)
        dlperf = round(gpu.dlperf * num_gpus * rng.uniform(0.85, 1.05), 3)
        geolocation = REGIONS[host_region][0]
        machine_id = FIRST_MACHINE_ID + i * 7 + rng.randrange(0, 7)

        offer: dict[str, Any] = {
            "id": offer_id,
            "ask_contract_id": offer_id,
            "bundle_id": offer_id + 1_000_000_000,
            "bundled_results": None,
            "machine_id": machine_id,
            "host_id": host_id,
            "num_gpus": num_gpus,
            "gpu_name": gpu.name,
            "gpu_ram": gpu.gpu_ram_mb,
            "gpu_total_ram": gpu.gpu_ram_mb * num_gpus,
            "gpu_frac": 1.0,
            "gpu_arch": "nvidia",
            "gpu_lanes": 16,
            "gpu_mem_bw": round(gpu.tflops * 12.0, 1),
            "gpu_max_power": 450.0 if gpu.compute_cap >= 890 else 350.0,
            "gpu_max_temp": 83.0,
            "gpu_display_active": False,
            "bw_nvlink": 400.0 if "SXM" in gpu.name else 0.0,
            "compute_cap": gpu.compute_cap,
            "cuda_max_good": cuda,
            "driver_version": driver,
            "driver_vers": _driver_code(driver),
            "cpu_name": rng.choice(_CPU_NAMES),
            "cpu_arch": "amd64",
            "cpu_cores": cores_per_gpu * num_gpus * 2,
            "cpu_cores_effective": float(cores_per_gpu * num_gpus),
            "cpu_ghz": round(rng.uniform(2.2, 5.0), 1),
            "cpu_ram": ram_per_gpu_gb * num_gpus * 1024,
            "disk_space": disk_space,
            "disk_bw": disk_bw,
            "disk_name": "nvme" if disk_bw > 1500 else "ssd",
            "inet_up": round(inet_up, 1),
            "inet_down": round(inet_down, 1),
            "inet_up_cost": round(up_tb / 1000.0, 6),
            "inet_down_cost": round(down_tb / 1000.0, 6),
            "internet_up_cost_per_tb": up_tb,
            "internet_down_cost_per_tb": down_tb,
            "direct_port_count": ports,
            "pci_gen": 4.0 if gpu.compute_cap < 1200 else 5.0,
            "pcie_bw": round(rng.uniform(6.0, 25.0), 1),
            "mobo_name": rng.choice(_MOBOS),
            "os_version": "22.04",
            "ubuntu_version": "22.04",
            "has_avx": 1,
            "dph_base": dph_base,
            "min_bid": round(dph_base * rng.uniform(*MIN_BID_SHARE), 4),
            "storage_cost": storage_cost,
            "vram_costperhour": round(dph_base / (gpu.gpu_ram_mb * num_gpus / 1024.0), 6),
            "credit_discount_max": 0.0,
            "discount_rate": 0.0,
            "platform_fee": 0.0,
            "dlperf": dlperf,
            "total_flops": round(gpu.tflops * num_gpus, 2),
            "rentable": True,
            "rented": False,
            "is_bid": False,
            "external": rng.random() < EXTERNAL_SHARE,
            "hosting_type": 1 if datacenter else 0,
            "datacenter": datacenter,
            "reliability": reliability,
            "reliability2": reliability,
            "reliability_mult": round(reliability**2, 4),
            "expected_reliability": reliability,
            "verification": "verified" if verified else "unverified",
            "vericode": 1 if verified else 0,
            "geolocation": geolocation,
            "geolocode": host_region + 1,
            "static_ip": datacenter or rng.random() < 0.3,
            "vms_enabled": False,
            "is_vm_deverified": False,
            "public_ipaddr": "127.0.0.1",
            "hostname": f"host{host_id}",
            "logo": "/static/logos/vastai_small2.png",
            "webpage": None,
            "resource_type": "gpu",
            "start_date": round(start_date, 3),
            "end_date": round(now + duration, 3),
            "duration": round(duration, 3),
            "cluster_id": None,
            "avail_vol_ask_id": None,
            "time_remaining": "",
            "time_remaining_isbid": "",
            "rn": i + 1,
        }
        price_offer(offer)
        # Vast's score is opaque; ours is performance per dollar weighted by reliability.
        offer["score"] = round(float(offer["dlperf_per_dphtotal"]) * reliability**2, 4)
        offers.append(offer)
    return offers


# Ground truth for benchmarks: what actually happens on a rented offer.

# Vast's inet_down is a periodic speedtest to a nearby server with many
# parallel streams: a best case. Downloads from Hugging Face, Civitai or a
# registry usually realise a fraction of it (distance, host congestion, shared
# links, disk write). Realised / advertised is log-normal with this median and
# sigma, capped at REALISED_MAX_RATIO; REALISED_BAD_HOST_SHARE of the draws
# hit a congested or throttled host delivering REALISED_BAD_HOST_RATIO of it.
# Source: an assumption from general experience of speedtests against real
# downloads, not a measurement. Anchor: seed 003 saw ~6.5 min per 5 GB model
# (~100 Mb/s) for single-stream downloads on rented hosts. The ratio does not
# depend on the offer's price, so it does not favour any ranking.
REALISED_MEDIAN_RATIO: Final = 0.6
REALISED_SIGMA: Final = 0.35
REALISED_MAX_RATIO: Final = 1.05
REALISED_BAD_HOST_SHARE: Final = 0.07
REALISED_BAD_HOST_RATIO: Final = (0.03, 0.2)
# A single client rarely pulls more than ~4 Gb/s from a public CDN.
# Source: an assumption (a CDN's per-client throughput), not a measurement.
REALISED_SOURCE_CAP_MBPS: Final = 4000.0
REALISED_FLOOR_MBPS: Final = 1.0

# Boot of the vastai/comfyui image: the daemon schedules the contract, pulls
# the image (compressed ~8 GB for the CUDA + PyTorch + ComfyUI stack) unless
# the host has it cached (popular template images often are), extracts it
# (~18 GB, gzip decompression bound, ~80-250 MB/s) and starts the container.
# Source: estimates, not measurements: the usual size of a CUDA + PyTorch +
# ComfyUI image, gzip's usual single-stream decompression rate, and seed 000's
# readiness budget (ComfyUI polled for up to 15 minutes). The cached share is a guess.
BOOT_SCHEDULING_S: Final = (5.0, 20.0)
BOOT_IMAGE_COMPRESSED_GB: Final = 8.0
BOOT_IMAGE_UNCOMPRESSED_GB: Final = 18.0
BOOT_IMAGE_CACHED_SHARE: Final = 0.3
BOOT_EXTRACT_MBPS: Final = (80.0, 250.0)
BOOT_CONTAINER_START_S: Final = (10.0, 40.0)
# Registry pulls go over a few layer streams: a bit slower than a segmented download.
BOOT_PULL_EFFICIENCY: Final = 0.8


def realised_inet_down_mbps(rng: random.Random, offer: Mapping[str, Any]) -> float:
    """Download speed (Mb/s) a rented offer really delivers, drawn around its ``inet_down``."""
    advertised = float(offer.get("inet_down") or 0.0)
    if rng.random() < REALISED_BAD_HOST_SHARE:
        ratio = rng.uniform(*REALISED_BAD_HOST_RATIO)
    else:
        ratio = min(
            REALISED_MAX_RATIO,
            rng.lognormvariate(math.log(REALISED_MEDIAN_RATIO), REALISED_SIGMA),
        )
    return max(REALISED_FLOOR_MBPS, min(REALISED_SOURCE_CAP_MBPS, advertised * ratio))


def boot_seconds(rng: random.Random, offer: Mapping[str, Any]) -> float:
    """Seconds from create to a running container (scheduling, image pull, extract, start)."""
    seconds = rng.uniform(*BOOT_SCHEDULING_S)
    if rng.random() >= BOOT_IMAGE_CACHED_SHARE:
        mbps = realised_inet_down_mbps(rng, offer) * BOOT_PULL_EFFICIENCY
        seconds += BOOT_IMAGE_COMPRESSED_GB * 8000.0 / mbps
        seconds += BOOT_IMAGE_UNCOMPRESSED_GB * 1000.0 / rng.uniform(*BOOT_EXTRACT_MBPS)
    seconds += rng.uniform(*BOOT_CONTAINER_START_S)
    return seconds


def attempt_fails(rng: random.Random, offer: Mapping[str, Any]) -> bool:
    """Whether a rental of this offer fails (probability ``1 - reliability``)."""
    reliability = offer.get("reliability")
    if reliability is None:
        reliability = offer.get("reliability2", 1.0)
    return rng.random() >= float(reliability)


@dataclass(frozen=True)
class RentalAttempt:
    """What one rental of an offer really took and cost (ground truth, for benchmarks)."""

    failed: bool  # the container ended in load_failed: nothing is ready, rent again
    boot_s: float  # create -> running (or -> load_failed)
    download_s: float  # the models at the realised bandwidth; 0 when the boot failed
    dollars: float  # everything billed for this rental, the failed ones included


def rental_attempt(
    rng: random.Random, offer: Mapping[str, Any], download_bytes: int, use_seconds: float
) -> RentalAttempt:
    """Rent ``offer``, download ``download_bytes`` of models, use it ``use_seconds``; what it costs.

    ``offer`` is a search result, priced at the search's ``allocated_storage``
    (``dph_total`` = GPU + ``storage_total_cost``). The draws, in this order, are
    the simulator's own for a realistic boot: ``boot_seconds``, then
    ``attempt_fails`` (the container ends in ``load_failed``); then, once running,
    ``realised_inet_down_mbps`` for the download. Billing is the simulator's:
    storage from creation, GPU time only while running, so a failed boot costs
    its storage. The download bills ``inet_down_cost`` per GB as Vast bills an
    instance's traffic (the HTTP simulator moves no bytes, so it bills none). The
    image pull is not billed as traffic: whether Vast does is not documented, and
    leaving it out can only understate what a host's bandwidth price costs.
    """
    boot = boot_seconds(rng, offer)
    storage_dph = float(offer.get("storage_total_cost") or 0.0)
    if attempt_fails(rng, offer):
        return RentalAttempt(True, boot, 0.0, storage_dph * boot / 3600.0)
    mbps = realised_inet_down_mbps(rng, offer)
    download_s = download_bytes * 8 / (mbps * 1e6)
    dph = float(offer["dph_total"])
    bandwidth = float(offer.get("inet_down_cost") or 0.0) * download_bytes / 1e9
    dollars = (storage_dph * boot + dph * (download_s + use_seconds)) / 3600.0 + bandwidth
    return RentalAttempt(False, boot, download_s, dollars)


# ---------------------------------------------------------------------------
# 2. Search engine: one filter/order/price engine for both search endpoints
# and the v1 instance list.
# ---------------------------------------------------------------------------

OPERATORS: Final = frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "in", "notin"})
# Keys of a query object that are not field filters.
QUERY_KEYWORDS: Final = frozenset(
    {"order", "type", "limit", "allocated_storage", "disable_bundling", "select_cols", "q"}
)
# Search fields that are computed from others rather than stored on the offer.
DERIVED_OFFER_FIELDS: Final = frozenset({"verified", "geolocation", "datacenter"})
OFFER_TYPES: Final = {
    "on-demand": "on-demand",
    "ondemand": "on-demand",
    "bid": "bid",
    "interruptible": "bid",
    "reserved": "reserved",
}


class SimApiError(Exception):
    """An API answer other than success: the HTTP status and the JSON body to send."""

    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def _invalid_request(msg: str) -> SimApiError:
    return SimApiError(400, {"success": False, "error": "invalid_request", "msg": msg})


def country_code(geolocation: Any) -> str:
    """``"Oregon, US"`` → ``"US"`` (Vast filters geolocation by this code)."""
    if not isinstance(geolocation, str):
        return ""
    return geolocation.rsplit(",", 1)[-1].strip().upper()


def _offer_field(offer: Mapping[str, Any], field: str) -> Any:
    if field == "geolocation":
        return country_code(offer.get("geolocation"))
    if field == "verified":
        return offer.get("verification") == "verified"
    if field == "datacenter":
        return offer.get("hosting_type") == 1
    return offer.get(field)


def _norm(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


def _coerce(value: Any, operand: Any) -> Any:
    """The operand in the row value's type: the CLI sends ``num_gpus=1`` as ``{"eq": "1"}``."""
    if not isinstance(operand, str):
        return operand
    if isinstance(value, bool):
        lowered = operand.strip().lower()
        return {"true": True, "false": False}.get(lowered, operand)
    if isinstance(value, int | float):
        try:
            return float(operand)
        except ValueError:
            return operand
    return operand


def _compare(value: Any, op: str, operand: Any) -> bool:
    """One ``field {op: operand}`` test. Incomparable values never match."""
    if op in ("in", "notin"):
        items = operand if isinstance(operand, list | tuple) else [operand]
        items = [_coerce(value, i) for i in items]
        found = _norm(value) in {_norm(i) for i in items if not isinstance(i, list | dict)}
        return found if op == "in" else not found
    operand = _coerce(value, operand)
    if op == "eq":
        return bool(_norm(value) == _norm(operand))
    if op == "neq":
        return bool(_norm(value) != _norm(operand))
    if value is None or operand is None:
        return False
    try:
        if op == "gt":
            return bool(value > operand)
        if op == "gte":
            return bool(value >= operand)
        if op == "lt":
            return bool(value < operand)
        if op == "lte":
            return bool(value <= operand)
    except TypeError:
        return False
    return True  # unknown operator: ignored, like an unknown field


def _conditions(raw: Any) -> list[tuple[str, Any]]:
    """``{"gte": 1, "lt": 4}`` → pairs; a bare value means ``eq``."""
    if isinstance(raw, dict):
        return [(op, v) for op, v in raw.items() if op in OPERATORS]
    return [("eq", raw)]


def matches(row: Mapping[str, Any], filters: Mapping[str, Any], *, offers: bool = True) -> bool:
    """Whether ``row`` passes every filter (the query object's field entries)."""
    for field, raw in filters.items():
        value = _offer_field(row, field) if offers else row.get(field)
        for op, operand in _conditions(raw):
            if field == "geolocation" and isinstance(operand, str):
                operand = operand.upper()
            if not _compare(value, op, operand):
                return False
    return True


def _sort_key(value: Any) -> tuple[int, Any]:
    # None last; numbers and strings in their own groups so mixed columns still sort.
    if value is None:
        return (2, 0)
    if isinstance(value, bool | int | float):
        return (0, float(value))
    return (1, str(value))


def order_rows(
    rows: list[dict[str, Any]], order: Sequence[tuple[str, bool]], *, offers: bool = True
) -> list[dict[str, Any]]:
    """Stable multi-column sort; ``order`` is ``(field, descending)`` pairs, first is primary.

    Missing values go last whatever the direction.
    """
    out = list(rows)
    for field, descending in reversed(order):

        def get(row: Mapping[str, Any], field: str = field) -> Any:
            return _offer_field(row, field) if offers else row.get(field)

        present = [r for r in out if get(r) is not None]
        missing = [r for r in out if get(r) is None]
        present.sort(key=lambda r: _sort_key(get(r)), reverse=descending)
        out = present + missing
    return out


def _parse_order(raw: Any) -> list[tuple[str, bool]]:
    if raw is None:
        return [("score", True)]
    if not isinstance(raw, list):
        raise _invalid_request("order must be a list of [field, 'asc'|'desc'] pairs")
    order: list[tuple[str, bool]] = []
    for item in raw:
        if isinstance(item, str):
            order.append((item, False))
        elif isinstance(item, list | tuple) and item and isinstance(item[0], str):
            direction = str(item[1]).lower() if len(item) > 1 else "asc"
            order.append((item[0], direction.startswith("desc")))
        else:
            raise _invalid_request(f"invalid order entry: {item!r}")
    return order


def search_offers(
    catalog: Sequence[dict[str, Any]], query: Mapping[str, Any], *, now: float
) -> list[dict[str, Any]]:
    """Answer a search query object (Vast's DSL) over ``catalog``; returns fresh dicts."""
    offer_type = OFFER_TYPES.get(str(query.get("type", "on-demand")).lower(), "on-demand")
    storage_raw = query.get("allocated_storage", DEFAULT_ALLOCATED_STORAGE_GB)
    try:
        storage = float(storage_raw if storage_raw is not None else DEFAULT_ALLOCATED_STORAGE_GB)
    except (TypeError, ValueError):
        raise _invalid_request("allocated_storage must be a number of GB") from None
    order = _parse_order(query.get("order"))
    limit_raw = query.get("limit")
    try:
        limit = int(limit_raw) if limit_raw is not None else None
    except (TypeError, ValueError):
        raise _invalid_request("limit must be an integer") from None
    known = set(catalog[0]) | DERIVED_OFFER_FIELDS if catalog else set()
    filters = {k: v for k, v in query.items() if k not in QUERY_KEYWORDS and k in known}
    hits = []
    for offer in catalog:
        # Price first: dph_total filters and orders use this search's storage and type.
        priced = price_offer(dict(offer), storage, offer_type)
        priced["duration"] = round(max(0.0, float(offer["end_date"]) - now), 3)
        if matches(priced, filters):
            hits.append(priced)
    out = order_rows(hits, order)
    if limit is not None and limit >= 0:
        out = out[:limit]
    return out


# ---------------------------------------------------------------------------
# 3. State: configuration, faults, instances, billing.
# ---------------------------------------------------------------------------

INSTANCE_FAULTS: Final = frozenset({"ok", "no_space", "load_failed", "no_ports", "vanish"})
RATE_LIMIT_TEXT: Final = "API requests too frequent endpoint threshold=4.5"
SERVER_ERROR_CYCLE: Final = (502, 503, 504)
# The overlayfs failure of seed 002, with a layer digest filled in.
NO_SPACE_MSG: Final = (
    "failed to extract layer (application/vnd.oci.image.layer.v1.tar+gzip "
    'sha256:{digest}) to overlayfs as "extract-{n}-{digest8} '
    'sha256:{digest}": write /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/'
    "snapshots/{n}/fs/usr/bin/caddy: no space left on device"
)
LOAD_FAILED_MSG: Final = (
    "Error: container failed to start: OCI runtime create failed: runc create failed: "
    "unable to start container process: error during container init"
)
CREDIT_STOP_MSG: Final = "Instance stopped: account credit exhausted. Add credit to restart it."
OFFLINE_MSG: Final = "Host machine is offline (lost contact with the host daemon)"
AUTO_TAG: Final = "@vastai-automatic-tag"
COMFYUI_TAG_TEMPLATE: Final = "v0.8.2-cuda-{cuda}-py312"
LABEL_MAX_CREATE: Final = 256
LABEL_MAX: Final = 1024
ENV_VALUE_MAX: Final = 256
V1_MAX_LIMIT: Final = 25
# Columns stored on the contract itself: the v1 list filters and sorts on these only.
# fmt: off
V1_FILTER_COLUMNS: Final = frozenset(
    {
        "id", "actual_status", "intended_status", "cur_state", "next_state", "label",
        "machine_id", "host_id", "image_uuid", "image_runtype", "start_date", "end_date",
        "status_msg", "template_id", "template_hash_id", "disk_space", "is_bid", "ssh_port",
        "public_ipaddr",
    }
)
# fmt: on
# Offer fields an instance row repeats (machine and price).
# fmt: off
MACHINE_FIELDS: Final = (
    "machine_id", "host_id", "bundle_id", "num_gpus", "gpu_name", "gpu_arch", "gpu_ram",
    "gpu_frac", "gpu_lanes", "gpu_mem_bw", "bw_nvlink", "gpu_max_power", "gpu_max_temp",
    "compute_cap", "cuda_max_good", "driver_version", "cpu_name", "cpu_arch", "cpu_cores",
    "cpu_cores_effective", "cpu_ghz", "cpu_ram", "disk_bw", "disk_name", "inet_up",
    "inet_down", "inet_up_cost", "inet_down_cost", "internet_up_cost_per_tb",
    "internet_down_cost_per_tb", "min_bid", "storage_cost", "vram_costperhour",
    "credit_discount_max", "dlperf", "total_flops", "score", "geolocation", "verification",
    "static_ip", "hosting_type", "external", "os_version", "mobo_name", "pci_gen", "pcie_bw",
    "logo", "webpage", "time_remaining", "time_remaining_isbid", "end_date", "hostname",
    "has_avx", "reliability2",
)
# fmt: on


@dataclass
class SimConfig:
    """How the simulator behaves. Durations are simulated seconds on its clock."""

    seed: int = 0
    offers: int = 400
    clock_speed: float = 1.0  # used when no clock is passed: simulated seconds per real second
    api_key: str | None = None  # None: any non-empty key is accepted
    credit: float = 100.0  # starting credit, $
    faults: list[str] = dataclasses.field(default_factory=list)  # start-time faults, "name[:value]"
    scheduling_s: float = 5.0  # actual_status null -> created
    created_s: float = 10.0  # created -> loading
    loading_s: float = 45.0  # loading -> running (image pull and container start)
    restart_s: float = 15.0  # start after a stop: loading -> running
    jitter: float = 0.2  # each duration is stretched by a seeded factor in [1-j, 1+j]
    realistic_boot: bool = False  # loading time from boot_seconds, failures from attempt_fails
    vanish_after_s: float = 120.0  # "vanish": running -> offline after this
    gone_after_s: float = 600.0  # "vanish": offline -> gone after this
    log_not_ready_polls: int = 2  # the first N GETs of a log result_url answer 404
    user_id: int = 424242
    email: str = "sim-user@example.invalid"
    username: str = "sim-user"
    # Onstart processes (module docstring, "Running the onstart"); off by default.
    run_onstart: bool = False
    agent_python: str | None = None  # COMFYFLEET_AGENT_PYTHON; None: this interpreter
    host_env: dict[str, str] = dataclasses.field(default_factory=dict)  # every onstart gets it
    workspace_root: Path | None = None  # None: a temporary directory, removed by close()
    onstart_grace_s: float = 5.0  # real seconds between SIGTERM and SIGKILL


@dataclass
class Faults:
    """Faults waiting to happen. ``POST /_sim/faults`` edits this."""

    rate_limit: int = 0
    server_errors: int = 0
    server_error_status: int | None = None
    delay_s: float = 0.0
    delay_requests: int | None = None  # None: every request while delay_s > 0
    offer_taken: int = 0
    next_instances: list[str] = dataclasses.field(default_factory=list)
    _served_errors: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "rate_limit": self.rate_limit,
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "delay_s": self.delay_s,
            "delay_requests": self.delay_requests,
            "offer_taken": self.offer_taken,
            "next_instances": list(self.next_instances),
        }

    def update(self, body: Mapping[str, Any]) -> None:
        """Apply a ``POST /_sim/faults`` body; raises ``ValueError`` on a bad one."""
        known = {"clear", *self.as_json()}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown fault keys {sorted(unknown)}; known: {sorted(known)}")
        if body.get("clear"):
            fresh = Faults()
            for spec in dataclasses.fields(self):
                setattr(self, spec.name, getattr(fresh, spec.name))
        if "rate_limit" in body:
            self.rate_limit = _non_negative_int(body["rate_limit"], "rate_limit")
        if "server_errors" in body:
            self.server_errors = _non_negative_int(body["server_errors"], "server_errors")
        if "server_error_status" in body:
            status = body["server_error_status"]
            if status is not None and (not isinstance(status, int) or not 500 <= status <= 599):
                raise ValueError("server_error_status must be a 5xx status or null")
            self.server_error_status = status
        if "delay_s" in body:
            delay = body["delay_s"]
            if not isinstance(delay, int | float) or delay < 0:
                raise ValueError("delay_s must be a non-negative number of seconds")
            self.delay_s = float(delay)
        if "delay_requests" in body:
            count = body["delay_requests"]
            self.delay_requests = (
                None if count is None else _non_negative_int(count, "delay_requests")
            )
        if "offer_taken" in body:
            self.offer_taken = _non_negative_int(body["offer_taken"], "offer_taken")
        if "next_instances" in body:
            names = body["next_instances"]
            if not isinstance(names, list) or not all(n in INSTANCE_FAULTS for n in names):
                raise ValueError(f"next_instances must be a list of {sorted(INSTANCE_FAULTS)}")
            self.next_instances.extend(names)

    def take_request_fault(self) -> tuple[int, str] | float | None:
        """The fault for the next API request: ``(status, kind)``, a delay, or None."""
        if self.rate_limit > 0:
            self.rate_limit -= 1
            return (429, "rate_limit")
        if self.server_errors > 0:
            self.server_errors -= 1
            status = (
                self.server_error_status
                or SERVER_ERROR_CYCLE[self._served_errors % len(SERVER_ERROR_CYCLE)]
            )
            self._served_errors += 1
            return (status, "server_error")
        if self.delay_s > 0 and (self.delay_requests is None or self.delay_requests > 0):
            if self.delay_requests is not None:
                self.delay_requests -= 1
            return self.delay_s
        return None


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return value


def parse_fault_specs(specs: Sequence[str]) -> dict[str, Any]:
    """Start-time fault strings (``comfyfleet sim vast --fault``) → a faults JSON body."""
    body: dict[str, Any] = {"next_instances": []}
    for spec in specs:
        name, _, value = spec.strip().partition(":")
        name = name.strip().replace("-", "_")
        try:
            if name in ("rate_limit", "server_errors", "offer_taken"):
                body[name] = int(value or 1)
            elif name in ("slow", "delay_s", "delay"):
                body["delay_s"] = float(value or 1.0)
            elif name in INSTANCE_FAULTS:
                body["next_instances"].extend([name] * int(value or 1))
            else:
                raise ValueError("unknown fault")
        except ValueError:
            raise ValueError(
                f"invalid fault {spec!r}: use rate_limit:N, server_errors:N, slow:SECONDS, "
                "offer_taken:N, or no_space|load_failed|no_ports|vanish[:N]"
            ) from None
    return body


def parse_docker_env(text: str) -> dict[str, str]:
    """A docker-flag string (``-e K=V -p 8188:8188 -h name``) → Vast's env dict."""
    result: dict[str, str] = {}
    tokens = shlex.split(text)
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) else None
        if flag in ("-e", "--env") and value is not None:
            key, sep, val = value.partition("=")
            if sep:
                result[key] = val
            i += 2
        elif flag in ("-p", "-v", "-n") and value is not None:
            result[f"{flag} {value}"] = "1"
            i += 2
        elif flag == "-h" and value is not None:
            result["-h"] = value
            i += 2
        else:
            i += 1
    return result


_PORT_KEY = re.compile(r"^-p\s+(?:[\d.]+:)?(?:\d+:)?(\d+)(?:/(tcp|udp))?$")


def exposed_ports(env: Mapping[str, str], runtype: str) -> list[str]:
    """Container ports (``"8188/tcp"``) an instance maps: ``-p`` keys plus direct runtypes."""
    ports: list[str] = []
    tokens = set(runtype.split())
    if tokens & {"ssh_direc", "ssh_direct", "jupyter_direc", "jupyter_direct"}:
        ports.append("22/tcp")
    if tokens & {"jupyter_direc", "jupyter_direct"}:
        ports.append("8080/tcp")
    for key in env:
        match = _PORT_KEY.match(key.strip())
        if match:
            port = f"{match.group(1)}/{match.group(2) or 'tcp'}"
            if port not in ports:
                ports.append(port)
    return ports


@dataclass
class SimInstance:
    """One contract, with the timeline its state is derived from."""

    id: int
    offer: dict[str, Any]  # the offer as rented, priced at the instance's disk
    disk_gb: float
    image: str
    image_uuid: str
    runtype: str
    env: dict[str, str]
    onstart: str | None
    image_args: list[str]
    label: str | None
    is_bid: bool
    gpu_rate: float  # $/h while running
    storage_rate: float  # $/h from creation
    created_at: float
    boot_start: float
    phase_s: tuple[float, float, float]  # scheduling, created, loading
    fault: str  # one of INSTANCE_FAULTS
    api_key: str
    jupyter_token: str
    ssh_port: int
    direct_port_start: int
    direct_port_count: int
    host_ports: dict[str, int]
    intended: str = "running"
    stop_msg: str | None = None
    offline_at: float | None = None
    gone_at: float | None = None
    destroyed_at: float | None = None
    billed_until: float = 0.0
    storage_spent: float = 0.0
    gpu_spent: float = 0.0

    @property
    def running_at(self) -> float:
        return self.boot_start + sum(self.phase_s)

    def can_run(self) -> bool:
        return self.fault not in ("no_space", "load_failed")

    def exists(self, now: float) -> bool:
        if self.destroyed_at is not None:
            return False
        return self.gone_at is None or now < self.gone_at

    def offline(self, now: float) -> bool:
        return self.offline_at is not None and now >= self.offline_at

    def actual_status(self, now: float) -> str | None:
        if self.offline(now):
            return "offline"
        if self.intended == "stopped":
            return "stopped"
        elapsed = now - self.boot_start
        scheduling, created, loading = self.phase_s
        if elapsed < scheduling:
            return None
        if elapsed < scheduling + created:
            return "created"
        if elapsed < scheduling + created + loading or self.fault == "no_space":
            return "loading"
        if self.fault == "load_failed":
            return "load_failed"
        return "running"

    def gpu_billed_at(self, t: float) -> bool:
        """Whether GPU time is billed at ``t`` (given the current intended state)."""
        return (
            self.intended == "running"
            and self.can_run()
            and t >= self.running_at
            and not self.offline(t)
            and self.exists(t)
        )

    def storage_billed_at(self, t: float) -> bool:
        return self.exists(t)


class VastSim:
    """The simulated marketplace and account: offers, instances, credit, faults.

    Every public method takes the lock, so HTTP handlers (any thread) and tests
    may call it directly. Time comes from the injected clock only.
    """

    def __init__(self, config: SimConfig | None = None, clock: Clock | None = None):
        self.config = config or SimConfig()
        if clock is None:
            speed = self.config.clock_speed
            clock = SystemClock() if speed == 1.0 else ScaledClock(speed)
        self.clock: Clock = clock
        self._lock = threading.RLock()
        self._rng = random.Random(self.config.seed * 7919 + 17)
        started = self.clock.now()
        self.offers: list[dict[str, Any]] = generate_offers(
            self.config.seed, self.config.offers, now=started
        )
        self._offers_by_id = {o["id"]: o for o in self.offers}
        self.instances: dict[int, SimInstance] = {}
        self.credit = float(self.config.credit)
        self.faults = Faults()
        self.faults.update(parse_fault_specs(self.config.faults))
        self._next_contract = 30_500_000 + self._rng.randrange(0, 20_000)
        self._next_port_block = 0
        self._logs: dict[str, _LogUpload] = {}
        self._billed_until = started
        # Onstart processes (only with run_onstart). Lock order: _sync_lock, then _lock.
        self.processes: LocalProcesses | None = (
            LocalProcesses() if self.config.run_onstart else None
        )
        self._watch: set[int] = set()  # instances whose process may have to start or stop
        self._launched: dict[int, float] = {}  # instance id -> boot_start its onstart ran for
        self._sync_lock = threading.Lock()
        self._workspace_root: Path | None = self.config.workspace_root
        self._own_workspace_root = False
        self._watcher: threading.Thread | None = None
        self._watcher_stop = threading.Event()

    # -- time and billing ---------------------------------------------------

    def now(self) -> float:
        return self.clock.now()

    def settle(self) -> float:
        """Bill everything up to now, stopping running instances when credit runs out."""
        with self._lock:
            now = self.clock.now()
            t0 = self._billed_until
            if now <= t0:
                return now
            live = [i for i in self.instances.values() if i.exists(t0)]
            if self._settle_without_running_out(live, t0, now):
                self._billed_until = now
                return now
            cuts = {t0, now}
            for inst in live:
                for t in (inst.running_at, inst.offline_at, inst.gone_at):
                    if t is not None and t0 < t < now:
                        cuts.add(t)
            points = sorted(cuts)
            for start, end in itertools.pairwise(points):
                self._bill_segment(live, start, end)
            self._billed_until = now
            return now

    def _settle_without_running_out(self, live: list[SimInstance], t0: float, now: float) -> bool:
        """Bill ``t0..now`` instance by instance when the credit cannot run out on the way.

        An instance's billing changes only at its own times (running, offline, gone),
        so each is integrated over its own few segments: O(n) instead of the O(n^2)
        of global segments. When the total would exhaust the credit, nothing is
        billed and False sends ``settle`` down the chronological path, which stops
        instances at the moment the credit runs out.
        """
        charges: list[tuple[SimInstance, float, float]] = []
        total = 0.0
        for inst in live:
            own = {t0, now}
            for t in (inst.running_at, inst.offline_at, inst.gone_at):
                if t is not None and t0 < t < now:
                    own.add(t)
            gpu_h = storage_h = 0.0
            for start, end in itertools.pairwise(sorted(own)):
                mid = (start + end) / 2
                if inst.gpu_billed_at(mid):
                    gpu_h += (end - start) / 3600.0
                if inst.storage_billed_at(mid):
                    storage_h += (end - start) / 3600.0
            charges.append((inst, gpu_h, storage_h))
            total += inst.gpu_rate * gpu_h + inst.storage_rate * storage_h
        if self.credit - total <= 0:
            return False
        for inst, gpu_h, storage_h in charges:
            inst.gpu_spent += inst.gpu_rate * gpu_h
            inst.storage_spent += inst.storage_rate * storage_h
            self.credit -= inst.gpu_rate * gpu_h + inst.storage_rate * storage_h
        return True

    def _bill_segment(self, live: list[SimInstance], start: float, end: float) -> None:
        mid = (start + end) / 2
        gpu = [i for i in live if i.gpu_billed_at(mid)]
        storage = [i for i in live if i.storage_billed_at(mid)]
        rate = sum(i.gpu_rate for i in gpu) + sum(i.storage_rate for i in storage)
        hours = (end - start) / 3600.0
        if gpu and self.credit - rate * hours <= 0:
            # Credit runs out inside this segment: bill up to that moment, stop, go on.
            zero_at = start + max(0.0, self.credit) / rate * 3600.0 if rate > 0 else start
            zero_at = min(max(zero_at, start), end)
            self._charge(gpu, storage, (zero_at - start) / 3600.0)
            for inst in gpu:
                inst.intended = "stopped"
                inst.stop_msg = CREDIT_STOP_MSG
            self._charge([], storage, (end - zero_at) / 3600.0)
            return
        self._charge(gpu, storage, hours)

    def _charge(self, gpu: list[SimInstance], storage: list[SimInstance], hours: float) -> None:
        for inst in gpu:
            cost = inst.gpu_rate * hours
            inst.gpu_spent += cost
            self.credit -= cost
        for inst in storage:
            cost = inst.storage_rate * hours
            inst.storage_spent += cost
            self.credit -= cost

    # -- offers -------------------------------------------------------------

    def search(self, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            now = self.settle()
            return search_offers(self.offers, query, now=now)

    def offer(self, offer_id: int) -> dict[str, Any] | None:
        with self._lock:
            return self._offers_by_id.get(offer_id)

    def gpu_names(self) -> list[str]:
        return sorted({o["gpu_name"] for o in self.offers})

    # -- instances ----------------------------------------------------------

    def create_instance(self, offer_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        """``PUT /asks/{id}/``: rent an offer. Raises ``SimApiError`` as the API answers."""
        answer = self._create_instance(offer_id, body)
        self.sync_processes()
        return answer

    def _create_instance(self, offer_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            now = self.settle()
            offer = self._offers_by_id.get(offer_id)
            if offer is None or offer["rented"] or not offer["rentable"]:
                raise _no_such_ask(offer_id)
            if self.faults.offer_taken > 0:
                self.faults.offer_taken -= 1
                offer["rented"] = True
                offer["rentable"] = False
                raise _no_such_ask(offer_id)
            request = _CreateBody.parse(body, offer_id)
            if request.disk_gb > float(offer["disk_space"]):
                raise _invalid_args(
                    offer_id,
                    f"disk {request.disk_gb:g} GB is more than the {offer['disk_space']:g} GB "
                    f"free on offer {offer_id}",
                )
            rented = price_offer(dict(offer), request.disk_gb)
            gpu_rate = request.price if request.price is not None else float(offer["dph_base"])
            storage_rate = float(rented["storage_total_cost"])
            if self.credit <= 0 or self.credit < gpu_rate + storage_rate:
                raise SimApiError(
                    400,
                    {
                        "success": False,
                        "error": "insufficient_credit",
                        "msg": "Insufficient credit",
                    },
                )
            instance = self._new_instance(offer, rented, request, gpu_rate, storage_rate, now)
            offer["rented"] = True
            offer["rentable"] = False
            self.instances[instance.id] = instance
            if self.processes is not None:
                self._watch.add(instance.id)
            return {
                "success": True,
                "new_contract": instance.id,
                "instance_api_key": instance.api_key,
                "ask_id": offer_id,
            }

    def _new_instance(
        self,
        offer: dict[str, Any],
        rented: dict[str, Any],
        request: _CreateBody,
        gpu_rate: float,
        storage_rate: float,
        now: float,
    ) -> SimInstance:
        cfg = self.config
        rng = self._rng
        self._next_contract += rng.randint(1, 40)
        fault = self.faults.next_instances.pop(0) if self.faults.next_instances else "ok"

        def jitter(seconds: float) -> float:
            return seconds * rng.uniform(1 - cfg.jitter, 1 + cfg.jitter)

        loading = jitter(cfg.loading_s)
        if cfg.realistic_boot:
            loading = boot_seconds(rng, offer)
            if fault == "ok" and attempt_fails(rng, offer):
                fault = "load_failed"
        phases = (jitter(cfg.scheduling_s), jitter(cfg.created_s), loading)
        wanted = exposed_ports(request.env, request.runtype)
        count = min(int(offer["direct_port_count"]), 20)
        if fault == "no_ports" or count <= 0:
            start, count, host_ports = -1, 0, {}
        else:
            start = 40_000 + (self._next_port_block % 200) * 100
            self._next_port_block += 1
            host_ports = {port: start + n for n, port in enumerate(wanted[:count])}
        instance = SimInstance(
            id=self._next_contract,
            offer=rented,
            disk_gb=request.disk_gb,
            image=request.image,
            image_uuid=_resolve_image(request.image, float(offer["cuda_max_good"])),
            runtype=request.runtype,
            env=request.env,
            onstart=request.onstart,
            image_args=request.args,
            label=request.label,
            is_bid=request.price is not None,
            gpu_rate=gpu_rate,
            storage_rate=storage_rate,
            created_at=now,
            boot_start=now,
            phase_s=phases,
            fault=fault,
            api_key=secrets.token_hex(32),
            jupyter_token=secrets.token_hex(32),
            ssh_port=10_000 + self._next_contract % 50_000,
            direct_port_start=start,
            direct_port_count=count,
            host_ports=host_ports,
            billed_until=now,
        )
        if fault == "vanish":
            instance.offline_at = instance.running_at + cfg.vanish_after_s
            instance.gone_at = instance.offline_at + cfg.gone_after_s
        return instance

    def _live(self, instance_id: int, now: float) -> SimInstance:
        inst = self.instances.get(instance_id)
        if inst is None or not inst.exists(now):
            raise _no_such_instance(instance_id)
        return inst

    def instance_json(self, instance_id: int) -> dict[str, Any] | None:
        """One instance as the API shows it; None once destroyed or gone; 404 if never seen."""
        with self._lock:
            now = self.settle()
            inst = self.instances.get(instance_id)
            if inst is None:
                raise _no_such_instance(instance_id)
            if not inst.exists(now):
                return None
            return _instance_row(inst, now)

    def list_instances(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self.settle()
            return [
                _instance_row(i, now)
                for i in sorted(self.instances.values(), key=lambda i: i.id)
                if i.exists(now)
            ]

    def list_instances_v1(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``GET /api/v1/instances/``: filters and orders the contract columns of every
        instance, then builds the whole row only for the page it returns."""
        query = _v1_query(params)
        with self._lock:
            now = self.settle()
            live = {i.id: i for i in self.instances.values() if i.exists(now)}
            if query.by_id:
                # What a client paging by id sends: no row built beyond the page.
                return _v1_page_by_id(live, query, now)
            if _v1_needs_only_id_and_label(params):
                # Ordered by label: no status to work out for every row.
                rows = [{"id": k, "label": live[k].label} for k in sorted(live)]
            else:
                rows = [_contract_row(live[k], now) for k in sorted(live)]
            return _v1_rows_page(
                rows, query, lambda ids: [_instance_row(live[k], now) for k in ids]
            )

    def manage_instance(self, instance_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        """``PUT /instances/{id}/``: ``state`` (running/stopped) and/or ``label``."""
        answer = self._manage_instance(instance_id, body)
        self.sync_processes()
        return answer

    def _manage_instance(self, instance_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            now = self.settle()
            inst = self.instances.get(instance_id)
            if inst is not None and not inst.exists(now):
                # The quirk: HTTP 200 with success false.
                return {
                    "success": False,
                    "error": "no_such_instance",
                    "msg": f"Instance {instance_id} is destroyed and cannot be changed.",
                }
            inst = self._live(instance_id, now)
            answer: dict[str, Any] = {"success": True}
            if "label" in body:
                label = body["label"]
                if label is not None and not isinstance(label, str):
                    raise _invalid_args(instance_id, "label must be a string")
                if label is not None and len(label) > LABEL_MAX:
                    raise SimApiError(
                        400,
                        {
                            "success": False,
                            "error": "label_too_long",
                            "msg": "Please limit label length to 1024 characters, "
                            "ideally less than 128.",
                        },
                    )
                inst.label = label
                answer["msg"] = f"label for {instance_id} set to '{label or ''}'"
            state = body.get("state")
            if state is not None:
                if state not in ("running", "stopped"):
                    raise _invalid_args(instance_id, f"state must be running or stopped: {state!r}")
                if state == "running" and inst.intended != "running":
                    if self.credit <= 0:
                        return {
                            "success": False,
                            "error": "missing_billing",
                            "msg": "Insufficient credit: add credit to start this instance.",
                        }
                    inst.intended = "running"
                    inst.stop_msg = None
                    inst.boot_start = now
                    restart = self.config.restart_s * self._rng.uniform(
                        1 - self.config.jitter, 1 + self.config.jitter
                    )
                    inst.phase_s = (0.0, 0.0, restart)
                    if self.processes is not None:
                        self._watch.add(inst.id)
                elif state == "stopped" and inst.intended != "stopped":
                    inst.intended = "stopped"
                    inst.stop_msg = None
            return answer

    def destroy_instance(self, instance_id: int) -> dict[str, Any]:
        """``DELETE /instances/{id}/``; its onstart process (if any) is killed at once."""
        answer = self._destroy_instance(instance_id)
        self.sync_processes()
        return answer

    def _destroy_instance(self, instance_id: int) -> dict[str, Any]:
        with self._lock:
            now = self.settle()
            inst = self.instances.get(instance_id)
            if inst is None or not inst.exists(now):
                raise SimApiError(
                    404, {"success": False, "error": "not_found", "msg": "Instance not found"}
                )
            inst.destroyed_at = now
            inst.intended = "destroyed"
            # The machine's GPUs go back on the market under the same ask.
            offer = self._offers_by_id.get(int(inst.offer["id"]))
            if offer is not None:
                offer["rented"] = False
                offer["rentable"] = True
            return {"success": True}

    def request_logs(self, instance_id: int, body: Mapping[str, Any]) -> str:
        """Snapshot the instance's log; returns the token of its upload."""
        with self._lock:
            now = self.settle()
            inst = self.instances.get(instance_id)
            if inst is None or not inst.exists(now):
                raise SimApiError(404, {"error": "invalid_id", "msg": "Invalid instance id."})
            lines = _log_lines(inst, now) + self._onstart_log_lines(inst.id)
            needle = body.get("filter")
            if isinstance(needle, str) and needle:
                lines = [line for line in lines if needle in line]
            tail = body.get("tail")
            try:
                if tail is not None and int(tail) >= 0:
                    lines = lines[-int(tail) :] if int(tail) else []
            except (TypeError, ValueError):
                raise _invalid_request("tail must be a number of lines") from None
            token = secrets.token_hex(16)
            self._logs[token] = _LogUpload(
                text="\n".join(lines) + "\n", misses_left=self.config.log_not_ready_polls
            )
            return token

    def fetch_log(self, token: str) -> str | None:
        """The uploaded log text, or None while the upload is "not finished" (or unknown)."""
        with self._lock:
            upload = self._logs.get(token)
            if upload is None:
                return None
            if upload.misses_left > 0:
                upload.misses_left -= 1
                return None
            return upload.text

    # -- account ------------------------------------------------------------

    def user(self) -> dict[str, Any]:
        with self._lock:
            self.settle()
            cfg = self.config
            credit = round(self.credit, 6)
            return {
                "id": cfg.user_id,
                "key_id": 1,
                "email": cfg.email,
                "username": cfg.username,
                "fullname": "Simulated User",
                "credit": credit,
                "balance": credit,
                "balance_threshold": 0.0,
                "balance_threshold_enabled": False,
                "billaddress_line1": None,
                "billaddress_city": None,
                "billaddress_country": None,
                "billaddress_zip": None,
                "has_billing": True,
                "can_pay": True,
                "email_verified": True,
                "got_signup_credit": True,
                "last4": None,
                "paypal_email": None,
                "ssh_key": "",
                "sid": None,
            }

    # -- onstart processes (run_onstart) ---------------------------------------

    @property
    def workspace_root(self) -> Path:
        """Where the instances' workspaces and onstart logs are (made on first use)."""
        return self._root()

    def workspace_of(self, instance_id: int) -> Path:
        """The folder an instance's onstart runs in (its ``WORKSPACE`` on this machine)."""
        return self._root() / str(int(instance_id))

    def _root(self) -> Path:
        with self._lock:
            if self._workspace_root is None:
                self._workspace_root = Path(tempfile.mkdtemp(prefix="comfyfleet-sim-"))
                self._own_workspace_root = True
            self._workspace_root.mkdir(parents=True, exist_ok=True)
            return self._workspace_root

    def sync_processes(self) -> None:
        """Start the onstart of instances that now run; kill that of instances that no
        longer do (destroyed, stopped, offline, or restarted since).

        Only watched instances are looked at: those created or started that may still
        come to run or whose process runs. The watcher calls this every 50 ms; create,
        manage, destroy and ``advance`` call it at once. A no-op without ``run_onstart``.
        """
        processes = self.processes
        if processes is None:
            return
        with self._sync_lock:
            starts: list[_Launch] = []
            stops: list[int] = []
            with self._lock:
                if self._watcher_stop.is_set() or not self._watch:
                    return
                now = self.settle()
                for iid in sorted(self._watch):
                    inst = self.instances[iid]
                    wanted = inst.exists(now) and inst.actual_status(now) == "running"
                    launched = self._launched.get(iid)
                    if launched is not None and (not wanted or launched != inst.boot_start):
                        stops.append(iid)
                        del self._launched[iid]
                    elif wanted and launched is None:
                        # A previous boot's process still on its way out: next time.
                        if not processes.is_running(iid):
                            self._launched[iid] = inst.boot_start
                            if inst.onstart:
                                starts.append(self._launch(inst))
                    elif not wanted and launched is None and not _may_run_later(inst, now):
                        self._watch.discard(iid)
            for iid in stops:
                try:
                    processes.stop(iid, self.config.onstart_grace_s, wait=False)
                except Exception:
                    log.exception("cannot stop the onstart of instance %s", iid)
            for launch in starts:
                self._start(processes, launch)

    def _launch(self, inst: SimInstance) -> _Launch:
        """What to run for ``inst`` now (called under the lock)."""
        cfg = self.config
        workspace = self.workspace_of(inst.id)
        env, note = instance_env_here(
            inst.env,
            cfg.host_env,
            agent_python=cfg.agent_python or sys.executable,
            workspace=workspace,
            who=f"instance {inst.id}",
        )
        return _Launch(
            key=inst.id,
            script=inst.onstart or "",
            env=env,
            workspace=workspace,
            log_path=self._root() / f"{inst.id}.log",
            note=note,
            first_boot=inst.boot_start == inst.created_at,
        )

    def _start(self, processes: LocalProcesses, launch: _Launch) -> None:
        try:
            if launch.first_boot:
                # A reused workspace_root may hold the log of an earlier run's namesake.
                launch.log_path.unlink(missing_ok=True)
            processes.start(
                launch.key,
                launch.script,
                launch.env,
                launch.workspace,
                launch.log_path,
                note=launch.note,
            )
        except (OSError, RuntimeError) as error:
            log.warning("cannot run the onstart of instance %s: %s", launch.key, error)
            with contextlib.suppress(OSError), launch.log_path.open("a") as fh:
                fh.write(f"=== comfyfleet sim: cannot run the onstart: {error}\n")

    def _onstart_log_lines(self, instance_id: int) -> list[str]:
        root = self._workspace_root
        if self.processes is None or root is None:
            return []
        return read_tail(root / f"{instance_id}.log").splitlines()

    def start_watcher(self, interval_s: float = 0.05) -> None:
        """Call ``sync_processes`` every ``interval_s`` from a daemon thread (with
        ``run_onstart`` only; ``RunningSim`` and ``serve`` do it). ``close`` stops it."""
        if self.processes is None or self._watcher is not None:
            return

        def watch() -> None:
            while not self._watcher_stop.wait(interval_s):
                try:
                    self.sync_processes()
                except Exception:
                    log.exception("the onstart watcher failed a round; it goes on")

        self._watcher = threading.Thread(target=watch, name="vast-sim-onstart", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop the watcher and kill every onstart process (and what it started); remove
        the workspace root if the simulator made it. Nothing runs an onstart after this."""
        self._watcher_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None
        with self._sync_lock:
            with self._lock:
                self._watch.clear()
                self._launched.clear()
            if self.processes is not None:
                self.processes.stop_all(self.config.onstart_grace_s)
            if self._own_workspace_root and self._workspace_root is not None:
                shutil.rmtree(self._workspace_root, ignore_errors=True)

    # -- control ------------------------------------------------------------

    def set_faults(self, body: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.faults.update(body)
            return self.faults.as_json()

    def take_request_fault(self) -> tuple[int, str] | float | None:
        with self._lock:
            return self.faults.take_request_fault()

    def advance(self, seconds: float) -> float:
        """Move a ``ManualClock`` forward (and bill the time)."""
        if not isinstance(self.clock, ManualClock):
            raise SimApiError(
                400,
                {
                    "success": False,
                    "error": "not_manual_clock",
                    "msg": "the simulator runs on a real or scaled clock; it cannot be advanced",
                },
            )
        if seconds < 0:
            raise _invalid_request("seconds must be non-negative")
        with self._lock:
            self.clock.advance(seconds)
            now = self.settle()
        self.sync_processes()
        return now

    def state(self) -> dict[str, Any]:
        with self._lock:
            now = self.settle()
            return {
                "now": now,
                "credit": round(self.credit, 6),
                "offers": {
                    "total": len(self.offers),
                    "rented": sum(1 for o in self.offers if o["rented"]),
                },
                "faults": self.faults.as_json(),
                "instances": [
                    {
                        "id": i.id,
                        "offer_id": i.offer["id"],
                        "fault": i.fault,
                        "exists": i.exists(now),
                        "destroyed_at": i.destroyed_at,
                        "actual_status": i.actual_status(now) if i.exists(now) else None,
                        "intended_status": i.intended,
                        "gpu_spent": round(i.gpu_spent, 6),
                        "storage_spent": round(i.storage_spent, 6),
                    }
                    for i in self.instances.values()
                ],
            }


@dataclass
class _LogUpload:
    text: str
    misses_left: int


@dataclass(frozen=True)
class _Launch:
    """An onstart to start: what ``LocalProcesses.start`` takes."""

    key: int
    script: str
    env: dict[str, str]
    workspace: Path
    log_path: Path
    note: str
    first_boot: bool


def _may_run_later(inst: SimInstance, now: float) -> bool:
    """Whether ``inst`` may yet reach ``running`` without a call (a start) changing it."""
    return (
        inst.exists(now) and inst.intended == "running" and inst.can_run() and not inst.offline(now)
    )


def _no_such_ask(offer_id: int) -> SimApiError:
    return SimApiError(
        404,
        {
            "success": False,
            "error": "invalid_args",
            "msg": f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available.",
            "ask_id": offer_id,
        },
    )


def _no_such_instance(instance_id: object) -> SimApiError:
    return SimApiError(
        404,
        {
            "success": False,
            "error": "no_such_instance",
            "msg": f"Instance {instance_id} not found.",
        },
    )


def _invalid_args(ask_id: int, why: str) -> SimApiError:
    return SimApiError(
        400,
        {
            "success": False,
            "error": "invalid_args",
            "msg": f"error 400/3467: Invalid args: {why}",
            "ask_id": ask_id,
        },
    )


@dataclass
class _CreateBody:
    """The fields of a create body the simulator uses, validated as the spec says."""

    image: str
    disk_gb: float
    env: dict[str, str]
    runtype: str
    onstart: str | None
    args: list[str]
    label: str | None
    price: float | None

    @classmethod
    def parse(cls, body: Mapping[str, Any], ask_id: int) -> _CreateBody:
        image = body.get("image")
        if not image and (body.get("template_hash_id") or body.get("template_id")):
            image = "vastai/base-image:@vastai-automatic-tag"
        if not isinstance(image, str) or not image:
            raise _invalid_args(ask_id, "image is required (or a template_hash_id)")
        if len(image) > 1024:
            raise _invalid_args(ask_id, "image is longer than 1024 characters")
        raw_env = body.get("env")
        if raw_env is None:
            env: dict[str, str] = {}
        elif isinstance(raw_env, str):
            env = parse_docker_env(raw_env)
        elif isinstance(raw_env, dict):
            env = {str(k): "" if v is None else str(v) for k, v in raw_env.items()}
        else:
            raise _invalid_args(ask_id, "env must be an object or a docker flag string")
        for key, value in env.items():
            if len(value) > ENV_VALUE_MAX:
                raise _invalid_args(ask_id, f"env value of {key} is longer than 256 characters")
        if sum(len(k) + len(v) for k, v in env.items()) > 32768:
            raise _invalid_args(ask_id, "env is longer than 32768 characters")
        try:
            raw_disk = body.get("disk")
            disk = 10.0 if raw_disk is None else float(raw_disk)
        except (TypeError, ValueError):
            raise _invalid_args(ask_id, "disk must be a number of GB") from None
        if disk <= 0:
            raise _invalid_args(ask_id, "disk must be positive")
        label = body.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > LABEL_MAX_CREATE):
            raise _invalid_args(ask_id, "label must be a string of at most 256 characters")
        price = body.get("price")
        if price is not None:
            if not isinstance(price, int | float) or not 0.001 <= price <= 128:
                raise SimApiError(
                    400,
                    {
                        "success": False,
                        "error": "invalid_price",
                        "msg": "error 400/3467: Invalid args: price must be 0.001-128 $/h",
                        "ask_id": ask_id,
                    },
                )
            price = float(price)
        args = body.get("args")
        image_args = [str(a) for a in args] if isinstance(args, list) else []
        if isinstance(body.get("args_str"), str) and body["args_str"]:
            image_args = shlex.split(body["args_str"])
        onstart = body.get("onstart")
        return cls(
            image=image,
            disk_gb=disk,
            env=env,
            runtype=str(body.get("runtype") or "ssh"),
            onstart=onstart if isinstance(onstart, str) else None,
            args=image_args,
            label=label,
            price=price,
        )


def _resolve_image(image: str, cuda: float) -> str:
    """The server resolves ``@vastai-automatic-tag`` to a tag matching the host's CUDA."""
    if not image.endswith(AUTO_TAG):
        return image
    repo = image[: -len(AUTO_TAG)].rstrip(":")
    return f"{repo}:{COMFYUI_TAG_TEMPLATE.format(cuda=f'{min(cuda, 12.9):.1f}')}"


def _status_msg(inst: SimInstance, status: str | None) -> str | None:
    mode = "jupyter" if "jupyter" in inst.runtype else ("args" if inst.runtype == "args" else "ssh")
    if status == "offline":
        return OFFLINE_MSG
    if status == "stopped":
        return inst.stop_msg or "Instance stopped"
    if status == "created":
        return f"Pulling image {inst.image_uuid}"
    if status == "loading":
        if inst.fault == "no_space":
            digest = hashlib.sha256(f"{inst.id}".encode()).hexdigest()
            return NO_SPACE_MSG.format(digest=digest, digest8=digest[:8], n=inst.id % 997)
        return f"Status: Downloaded newer image for {inst.image_uuid}; starting container"
    if status == "load_failed":
        return LOAD_FAILED_MSG
    if status == "running":
        return f"success, running {inst.image_uuid.replace(':', '_')}/{mode}"
    return None


def _v1_needs_only_id_and_label(params: Mapping[str, Any]) -> bool:
    """Whether a v1 listing filters and orders on ``id`` and ``label`` only.

    Anything unusual (malformed values included) answers False, so that the full
    path validates it and gives the API's own error.
    """
    filters = params.get("select_filters") or {}
    order = params.get("order_by") or []
    if isinstance(order, dict):
        order = [order]
    if not isinstance(filters, dict) or not isinstance(order, list):
        return False
    columns = set(filters)
    for item in order:
        if not isinstance(item, dict):
            return False
        columns.add(str(item.get("col")))
    return columns <= {"id", "label"}


def _contract_row(inst: SimInstance, now: float) -> dict[str, Any]:
    """Only the columns stored on the contract (``V1_FILTER_COLUMNS``), as
    ``_instance_row`` shows them: what the v1 listing filters and orders on."""
    status = inst.actual_status(now)
    contract_state = "stopped" if inst.intended == "stopped" else "running"
    return {
        "id": inst.id,
        "actual_status": status,
        "intended_status": inst.intended,
        "cur_state": contract_state,
        "next_state": contract_state,
        "label": inst.label,
        "machine_id": inst.offer.get("machine_id"),
        "host_id": inst.offer.get("host_id"),
        "image_uuid": inst.image_uuid,
        "image_runtype": inst.runtype,
        "start_date": inst.created_at,
        "end_date": inst.offer.get("end_date"),
        "status_msg": _status_msg(inst, status),
        "template_id": None,
        "template_hash_id": None,
        "disk_space": inst.disk_gb,
        "is_bid": inst.is_bid,
        "ssh_port": inst.ssh_port,
        "public_ipaddr": "127.0.0.1",
    }


def _instance_row(inst: SimInstance, now: float) -> dict[str, Any]:
    """The instance as ``GET /instances/`` shows it (reference §1.3 and §4)."""
    status = inst.actual_status(now)
    running = status == "running"
    row: dict[str, Any] = {k: inst.offer.get(k) for k in MACHINE_FIELDS}
    offer = inst.offer
    contract_state = "stopped" if inst.intended == "stopped" else "running"
    uptime = (now - inst.running_at) / 60.0 if running else 0.0
    row.update(
        {
            "id": inst.id,
            "actual_status": status,
            "intended_status": inst.intended,
            "cur_state": contract_state,
            "next_state": contract_state,
            "status_msg": _status_msg(inst, status),
            "label": inst.label,
            "image_uuid": inst.image_uuid,
            "image_args": list(inst.image_args),
            "image_runtype": inst.runtype,
            "extra_env": [[k, v] for k, v in inst.env.items()],
            "onstart": inst.onstart,
            "template_id": None,
            "template_hash_id": None,
            "template_name": None,
            "jupyter_token": inst.jupyter_token,
            "public_ipaddr": "127.0.0.1",
            "local_ipaddrs": "10.0.0.5 172.17.0.2 \n",
            "ssh_host": "127.0.0.1",
            "ssh_port": inst.ssh_port,
            "ssh_idx": "0",
            "machine_dir_ssh_port": inst.ssh_port + 2,
            "direct_port_start": inst.direct_port_start,
            "direct_port_end": (
                inst.direct_port_start + inst.direct_port_count - 1
                if inst.direct_port_start >= 0
                else -1
            ),
            "direct_port_count": inst.direct_port_count,
            "gpu_totalram": offer.get("gpu_total_ram"),
            "gpu_util": 0.0,
            "gpu_temp": 45.0 if running else None,
            "cpu_util": 0.01 if running else 0.0,
            "mem_usage": 1.5 if running else 0.0,
            "mem_limit": float(offer.get("cpu_ram") or 0) / 1024.0,
            "vmem_usage": 0.0,
            "disk_space": inst.disk_gb,
            "disk_util": 0.0,
            "disk_usage": 18.0 if running else 0.0,
            "dph_base": inst.gpu_rate,
            "dph_total": inst.gpu_rate + inst.storage_rate,
            "storage_total_cost": inst.storage_rate,
            "is_bid": inst.is_bid,
            "dlperf_per_dphtotal": offer.get("dlperf_per_dphtotal"),
            "flops_per_dphtotal": offer.get("flops_per_dphtotal"),
            "search": offer.get("search"),
            "instance": offer.get("instance"),
            "credit_balance": None,
            "credit_discount": None,
            "country_code": country_code(offer.get("geolocation")),
            "rentable": False,
            "start_date": inst.created_at,
            "uptime_mins": round(uptime, 3),
            "duration": round(max(0.0, float(offer.get("end_date") or now) - now), 3),
            "client_run_time": round((inst.gpu_spent / inst.gpu_rate) if inst.gpu_rate else 0, 6),
            "host_run_time": round((now - inst.created_at) / 3600.0, 6),
            "volume_info": [],
        }
    )
    if running and inst.host_ports:
        row["ports"] = {
            port: [{"HostIp": "0.0.0.0", "HostPort": str(host)}]
            for port, host in inst.host_ports.items()
        }
    return row


def _log_lines(inst: SimInstance, now: float) -> list[str]:
    """The container log so far, derived from the instance's timeline."""
    scheduling, created, loading = inst.phase_s
    t_created = inst.boot_start + scheduling
    t_loading = t_created + created
    events: list[tuple[float, str]] = [
        (inst.created_at, f"Contract {inst.id} accepted on machine {inst.offer['machine_id']}"),
        (t_created, f"Pulling image {inst.image_uuid}"),
        (t_loading, f"{inst.image_uuid}: extracting layers"),
    ]
    if inst.fault == "no_space":
        events.append((t_loading + loading, _status_msg(inst, "loading") or ""))
    elif inst.fault == "load_failed":
        events.append((inst.running_at, LOAD_FAILED_MSG))
    else:
        events.append((inst.running_at, f"Status: Downloaded newer image for {inst.image_uuid}"))
        events.append((inst.running_at, f"Starting container ({inst.runtype})"))
        if inst.onstart:
            events.append((inst.running_at, f"Running onstart: {inst.onstart}"))
        events.append((inst.running_at, _status_msg(inst, "running") or ""))
    if inst.offline_at is not None:
        events.append((inst.offline_at, OFFLINE_MSG))
    return [
        f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t))}Z {text}"
        for t, text in sorted(events, key=lambda e: e[0])
        if t <= now
    ]


# ---------------------------------------------------------------------------
# 4. HTTP: the FastAPI app, a background runner for tests, a foreground server.
# ---------------------------------------------------------------------------

# Unauthenticated, unmetered: the CLI fetches this at start-up (reference §2).
PUBLIC_PATHS: Final = frozenset({"/api/v0/gpu_names/unique/", "/api/v0/gpu_types/"})
_SERVER_ERROR_HTML: Final = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_REASONS: Final = {
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}


def _json(body: Any, status: int = 200) -> JSONResponse:
    # Exactly "application/json": the official CLI aborts on "; charset=utf-8".
    return JSONResponse(body, status_code=status, media_type="application/json")


async def _read_json(request: Request) -> dict[str, Any]:
    """The JSON object body; tolerant of a missing or empty body (and of one on GET)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise _invalid_request("Invalid json body") from None
    if not isinstance(data, dict):
        raise _invalid_request("Invalid json body")
    return data


def _request_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.query_params.get("api_key")
    return key or None


def _check_key(sim: VastSim, request: Request, *, bad_key_status: int = 401) -> None:
    key = _request_key(request)
    if key is None:
        raise SimApiError(
            403, {"success": False, "error": "auth_error", "msg": "This action requires login."}
        )
    expected = sim.config.api_key
    if expected is not None and not hmac.compare_digest(key.encode(), expected.encode()):
        raise SimApiError(
            bad_key_status,
            {"success": False, "error": "auth_error", "msg": "Invalid user key"},
        )


def _path_id(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise _no_such_instance(raw) from None


def _query_json(request: Request, name: str) -> Any:
    """A JSON-encoded query argument (the SDK ``json.dumps`` every non-string value)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        if name in ("after_token", "next_token"):
            return raw
        raise _invalid_request(f"Error in query parameters: {name} is not valid JSON") from None


def _encode_token(values: Mapping[str, Any]) -> str:
    return base64.b64encode(json.dumps({"values": dict(values)}).encode()).decode()


def _decode_token(token: str) -> dict[str, Any]:
    try:
        values = json.loads(base64.b64decode(token.encode(), validate=True))["values"]
        if not isinstance(values, dict) or "id" not in values:
            raise ValueError(token)
        return values
    except (ValueError, KeyError, TypeError):
        raise SimApiError(400, {"error": "invalid_token"}) from None


@dataclass(frozen=True)
class _V1Query:
    """The validated query of a v1 listing (reference §1.3)."""

    filters: Mapping[str, Any]
    order: list[tuple[str, bool]]  # (column, descending), ``id`` last as the tie-break
    limit: int
    after: Mapping[str, Any] | None  # the cursor's values
    select: list[str] | None  # None: every column

    @property
    def by_id(self) -> bool:
        """Ordered by id alone and filtered on id and label at most: what a client
        paging through all its instances asks."""
        return self.order == [("id", False)] and set(self.filters) <= {"id", "label"}


def _v1_query(params: Mapping[str, Any]) -> _V1Query:
    """``params`` checked as the API checks them; its 400s otherwise."""
    filters = params.get("select_filters") or {}
    if not isinstance(filters, dict):
        raise _invalid_request("Error in query parameters: select_filters must be an object")
    for column in filters:
        if column not in V1_FILTER_COLUMNS:
            raise _invalid_request(f"Error in query parameters: {column} is not a valid search key")
    order_raw = params.get("order_by") or [{"col": "id", "dir": "asc"}]
    if isinstance(order_raw, dict):
        order_raw = [order_raw]
    order: list[tuple[str, bool]] = []
    for item in order_raw if isinstance(order_raw, list) else []:
        if not isinstance(item, dict) or item.get("col") not in V1_FILTER_COLUMNS:
            raise _invalid_request(f"Error in query parameters: invalid order_by {item!r}")
        order.append((str(item["col"]), str(item.get("dir", "asc")).lower() == "desc"))
    if not any(col == "id" for col, _ in order):
        order.append(("id", False))
    limit_raw = params.get("limit")
    try:
        limit = V1_MAX_LIMIT if limit_raw is None else int(limit_raw)
    except (TypeError, ValueError):
        raise _invalid_request("Error in query parameters: limit must be an integer") from None
    limit = 5 if limit <= 0 else min(limit, V1_MAX_LIMIT)
    token = params.get("after_token") or params.get("next_token")
    after = _decode_token(str(token)) if token else None
    select = params.get("select_cols")
    columns = select if isinstance(select, list) and select and "*" not in select else None
    return _V1Query(filters, order, limit, after, columns)


def list_instances_v1(
    rows: list[dict[str, Any]],
    params: Mapping[str, Any],
    *,
    full: Callable[[list[int]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``GET /api/v1/instances/``: filter, order, cursor-paginate (reference §1.3).

    ``full`` builds the whole rows of the page from their ids when ``rows`` carry
    only the contract columns the listing filters and orders on.
    """
    return _v1_rows_page(rows, _v1_query(params), full)


def _v1_rows_page(
    rows: list[dict[str, Any]],
    query: _V1Query,
    full: Callable[[list[int]], list[dict[str, Any]]] | None,
) -> dict[str, Any]:
    """One page of ``rows`` (every live instance) under any filter and order."""
    order = query.order
    hits = [r for r in rows if matches(r, query.filters, offers=False)] if query.filters else rows
    if order == [("id", False)]:
        hits = sorted(hits, key=lambda r: int(r["id"]))
        if query.after is not None:
            hits = hits[_v1_start([int(r["id"]) for r in hits], query.after) :]
    else:
        hits = order_rows(hits, order, offers=False)
        if query.after is not None:
            hits = [r for r in hits if _after_cursor(r, query.after, order)]
    page = hits[: query.limit]
    more = len(hits) > query.limit
    cursor = _encode_token({col: page[-1].get(col) for col, _ in order}) if more and page else None
    if full is not None:
        page = full([int(r["id"]) for r in page])
    return _v1_body(page, cursor, [r.get("label") for r in rows], query)


def _v1_page_by_id(live: Mapping[int, SimInstance], query: _V1Query, now: float) -> dict[str, Any]:
    """One page in id order (``query.by_id``): a bisect of the sorted ids, then whole
    rows for the page only, so a page costs the same wherever it starts."""
    every = sorted(live)
    ids = every
    if query.filters:
        ids = [
            k
            for k in every
            if matches({"id": k, "label": live[k].label}, query.filters, offers=False)
        ]
    start = _v1_start(ids, query.after) if query.after is not None else 0
    page = ids[start : start + query.limit]
    more = len(ids) - start > query.limit
    cursor = _encode_token({"id": page[-1]}) if more and page else None
    rows = [_instance_row(live[k], now) for k in page]
    return _v1_body(rows, cursor, [live[k].label for k in every], query)


def _v1_start(ids: list[int], after: Mapping[str, Any]) -> int:
    """Where the rows after the cursor begin in ``ids`` (sorted)."""
    try:
        return bisect.bisect_right(ids, int(after["id"]))
    except (KeyError, TypeError, ValueError):
        raise SimApiError(400, {"error": "invalid_token"}) from None


def _v1_body(
    page: list[dict[str, Any]],
    cursor: str | None,
    labels: Sequence[str | None],
    query: _V1Query,
) -> dict[str, Any]:
    """The answer around ``page``; ``labels``: one per live instance."""
    if query.select is not None:
        page = [{k: r.get(k) for k in ["id", *query.select]} for r in page]
    counts: dict[str, int] = {}
    for label in labels:
        counts[label or ""] = counts.get(label or "", 0) + 1
    return {
        "success": True,
        "instances_found": len(page),
        "total_instances": len(labels),
        "label_counts": counts,
        "next_token": cursor,
        "instances": page,
    }


def _after_cursor(
    row: Mapping[str, Any], cursor: Mapping[str, Any], order: Sequence[tuple[str, bool]]
) -> bool:
    """Whether ``row`` sorts strictly after the row the cursor was taken from."""
    for col, descending in order:
        a, b = _sort_key(row.get(col)), _sort_key(cursor.get(col))
        if a == b:
            continue
        if a[0] != b[0]:  # None (group 2) sorts last in both directions
            return a[0] > b[0]
        return (a > b) != descending
    return False


class _RequestFaults:
    """The faults of ``POST /_sim/faults`` (rate limits, 5xx pages, delays) on API requests.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` costs ~0.6 ms a request,
    which a paginated listing of 1,000 instances pays 40 times.
    """

    def __init__(self, app: ASGIApp, sim: VastSim) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/api/") and path not in PUBLIC_PATHS:
                fault = self.sim.take_request_fault()
                if isinstance(fault, tuple):
                    status, kind = fault
                    response: Response
                    if kind == "rate_limit":
                        # Plain text and no Retry-After, as Vast answers (reference §3).
                        response = PlainTextResponse(RATE_LIMIT_TEXT, status_code=429)
                    else:
                        reason = _REASONS.get(status, "Server Error")
                        response = HTMLResponse(
                            _SERVER_ERROR_HTML.format(status=status, reason=reason),
                            status_code=status,
                        )
                    await response(scope, receive, send)
                    return
                if isinstance(fault, float):
                    await asyncio.sleep(fault)
        await self.app(scope, receive, send)


def create_app(sim: VastSim) -> FastAPI:
    """The Vast.ai-compatible API over ``sim`` (paths, bodies and quirks of the reference)."""
    app = FastAPI(
        title="comfyfleet Vast.ai simulator",
        description="A local Vast.ai-compatible API for tests and demos.",
        default_response_class=JSONResponse,
    )

    @app.exception_handler(SimApiError)
    async def _sim_error(_request: Request, exc: SimApiError) -> Response:
        return _json(exc.body, exc.status)

    def route(path: str, methods: list[str]) -> Callable[[_Handler], _Handler]:
        """Register ``path`` with and without its trailing slash (clients differ)."""

        def register(handler: _Handler) -> _Handler:
            for variant in {path, path.rstrip("/")}:
                app.add_api_route(variant, handler, methods=methods, include_in_schema=True)
            return handler

        return register

    # -- offers -------------------------------------------------------------

    @route("/api/v0/gpu_names/unique/", ["GET"])
    async def gpu_names() -> Response:
        return _json({"gpu_names": sim.gpu_names()})

    @route("/api/v0/gpu_types/", ["GET"])
    async def gpu_types() -> Response:
        return _json({"gpu_types": [{"name": n} for n in sim.gpu_names()]})

    @route("/api/v0/bundles/", ["POST", "GET", "PUT"])
    async def bundles(request: Request) -> Response:
        _check_key(sim, request, bad_key_status=404)
        query = await _read_json(request)
        if not query and request.query_params.get("q"):
            q = _query_json(request, "q")
            query = q if isinstance(q, dict) else {}
        return _json({"offers": sim.search(query)})

    @route("/api/v0/search/asks/", ["PUT", "POST"])
    async def search_asks(request: Request) -> Response:
        _check_key(sim, request, bad_key_status=404)
        body = await _read_json(request)
        query = body.get("q", {})
        if not isinstance(query, dict):
            raise _invalid_request("q must be an object")
        return _json({"offers": sim.search(query)})

    @route("/api/v0/asks/{offer_id}/", ["PUT"])
    async def create_instance(offer_id: str, request: Request) -> Response:
        _check_key(sim, request)
        body = await _read_json(request)
        try:
            ask = int(offer_id)
        except ValueError:
            raise _no_such_ask(0) from None
        return _json(sim.create_instance(ask, body))

    # -- instances ----------------------------------------------------------

    @route("/api/v0/instances/", ["GET"])
    async def instances_v0(request: Request) -> Response:
        _check_key(sim, request)
        return _json({"instances": sim.list_instances()})

    @route("/api/v0/instances/", ["PUT"])
    async def manage_many(request: Request) -> Response:
        _check_key(sim, request)
        body = await _read_json(request)
        ids = body.get("ids") or []
        results = {str(i): sim.manage_instance(_path_id(str(i)), body) for i in ids}
        return _json(
            {"success": all(r.get("success") for r in results.values()), "results": results}
        )

    @route("/api/v0/instances/", ["DELETE"])
    async def destroy_many(request: Request) -> Response:
        _check_key(sim, request)
        body = await _read_json(request)
        destroyed, failed = [], []
        for raw in body.get("instance_ids") or []:
            try:
                sim.destroy_instance(_path_id(str(raw)))
                destroyed.append(raw)
            except SimApiError:
                failed.append(raw)
        return _json({"success": not failed, "destroyed": destroyed, "failed": failed})

    @route("/api/v1/instances/", ["GET"])
    async def instances_v1(request: Request) -> Response:
        _check_key(sim, request)
        params = {
            name: _query_json(request, name)
            for name in (
                "select_filters",
                "order_by",
                "select_cols",
                "limit",
                "after_token",
                "next_token",
            )
        }
        # A page is ~85 KB, most of it floats: pydantic-core writes them ~4x faster than
        # the json module (the same JSON). Exactly "application/json", as ``_json``.
        body = pydantic_core.to_json(sim.list_instances_v1(params))
        return Response(body, media_type="application/json")

    @route("/api/v0/instances/{instance_id}/", ["GET"])
    async def show_instance(instance_id: str, request: Request) -> Response:
        _check_key(sim, request)
        # The quirk: plural key, one object (or null once destroyed).
        return _json({"instances": sim.instance_json(_path_id(instance_id))})

    @route("/api/v0/instances/{instance_id}/", ["PUT"])
    async def manage_instance(instance_id: str, request: Request) -> Response:
        _check_key(sim, request)
        body = await _read_json(request)
        return _json(sim.manage_instance(_path_id(instance_id), body))

    @route("/api/v0/instances/{instance_id}/", ["DELETE"])
    async def destroy_instance(instance_id: str, request: Request) -> Response:
        _check_key(sim, request)
        await _read_json(request)
        return _json(sim.destroy_instance(_path_id(instance_id)))

    @route("/api/v0/instances/reboot/{instance_id}/", ["PUT"])
    async def reboot_instance(instance_id: str, request: Request) -> Response:
        _check_key(sim, request)
        ident = _path_id(instance_id)
        sim.manage_instance(ident, {"state": "stopped"})
        return _json(sim.manage_instance(ident, {"state": "running"}))

    @route("/api/v0/instances/request_logs/{instance_id}/", ["PUT"])
    async def request_logs(instance_id: str, request: Request) -> Response:
        _check_key(sim, request)
        body = await _read_json(request)
        token = sim.request_logs(_path_id(instance_id), body)
        base = str(request.base_url).rstrip("/")
        return _json(
            {
                "success": True,
                "result_url": f"{base}/_logs/{token}.log",
                "msg": "Pulling logs; they will be at result_url shortly.",
            }
        )

    @app.get("/_logs/{name}", include_in_schema=False)
    async def fetch_log(name: str) -> Response:
        # No auth: it stands for a pre-signed S3 URL. Not ready yet → 404, like S3.
        text = sim.fetch_log(name.removesuffix(".log"))
        if text is None:
            return Response(
                "<Error><Code>NoSuchKey</Code><Message>The specified key does not exist."
                "</Message></Error>",
                status_code=404,
                media_type="application/xml",
            )
        return PlainTextResponse(text)

    # -- account ------------------------------------------------------------

    @route("/api/v0/users/current/", ["GET"])
    async def current_user(request: Request) -> Response:
        _check_key(sim, request, bad_key_status=404)
        return _json(sim.user())

    # -- simulator control --------------------------------------------------

    @app.post("/_sim/faults")
    async def set_faults(request: Request) -> Response:
        _check_key(sim, request)
        body = await _read_json(request)
        try:
            return _json(sim.set_faults(body))
        except ValueError as exc:
            raise _invalid_request(str(exc)) from None

    @app.get("/_sim/faults")
    async def get_faults(request: Request) -> Response:
        _check_key(sim, request)
        return _json(sim.set_faults({}))

    @app.post("/_sim/clock/advance")
    async def advance_clock(request: Request) -> Response:
        _check_key(sim, request)
        body = await _read_json(request)
        seconds = body.get("seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise _invalid_request("seconds must be a number")
        return _json({"success": True, "now": sim.advance(float(seconds))})

    @app.get("/_sim/state")
    async def sim_state(request: Request) -> Response:
        _check_key(sim, request)
        return _json(sim.state())

    app.add_middleware(_RequestFaults, sim=sim)
    return app


_Handler = Callable[..., Awaitable[Response]]


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
    )


class RunningSim:
    """The simulator served by uvicorn in a background thread on 127.0.0.1.

    ``with RunningSim(SimConfig(seed=1)) as s:`` gives ``s.url`` (``http://127.0.0.1:PORT``)
    and ``s.sim`` (the ``VastSim``, for direct inspection or clock control).
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        clock: Clock | None = None,
        *,
        port: int = 0,
        start_timeout_s: float = 10.0,
    ):
        self.sim = VastSim(config, clock=clock)
        self.app = create_app(self.sim)
        self._port = port
        self._start_timeout_s = start_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.url = ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1]) if self.url else 0

    def __enter__(self) -> RunningSim:
        sock = _bind("127.0.0.1", self._port)
        port = sock.getsockname()[1]
        server = uvicorn.Server(_uvicorn_config(self.app))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"vast-sim-{port}", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError("the Vast.ai simulator did not start")
            time.sleep(0.005)
        self._sock = sock
        self.url = f"http://127.0.0.1:{port}"
        self.sim.start_watcher()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        # Last: an onstart's agent may still be talking to the control plane, not to us.
        self.sim.close()


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the simulator in the foreground until interrupted (127.0.0.1 only)."""
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError("the simulator listens on 127.0.0.1 only")
    sim = VastSim(config)
    sock = _bind("127.0.0.1", port)
    print(f"Vast.ai simulator listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    if config.run_onstart:
        print(f"Instances run their onstart in {sim.workspace_root}", flush=True)
    sim.start_watcher()
    try:
        uvicorn.Server(_uvicorn_config(create_app(sim))).run(sockets=[sock])
    finally:
        sock.close()
        sim.close()
