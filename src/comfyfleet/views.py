"""How offers and instances look to a user: rows for JSON, Rich tables for people."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from comfyfleet.offers import RankedOffer
from comfyfleet.providers.base import Instance

OFFER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("#", "right"),
    ("offer", "right"),
    ("$/h", "right"),
    ("min to ready", "right"),
    ("$ to ready", "right"),
    ("$ expected", "right"),
    ("GPU", "left"),
    ("VRAM GB", "right"),
    ("inet down Mb/s", "right"),
    ("$/GB down", "right"),
    ("reliability", "right"),
    ("location", "left"),
    ("direct ports", "right"),
)


def ranked_row(position: int, item: RankedOffer) -> dict[str, Any]:
    offer, est = item.offer, item.estimate
    return {
        "rank": position,
        "offer_id": offer.id,
        "machine_id": offer.machine_id,
        "dph_total": round(offer.dph_total, 4),
        "minutes_to_ready": round(est.minutes_to_ready, 1),
        "dollars_to_ready": round(est.dollars_to_ready, 4),
        "expected_dollars": round(est.expected_dollars, 4),
        "bandwidth_dollars": round(est.bandwidth_dollars, 4),
        "gpu": f"{offer.num_gpus}x {offer.gpu_name}",
        "vram_gb": round(offer.vram_gb, 1),
        "inet_down_mbps": round(offer.inet_down, 1),
        "inet_down_cost_per_gb": offer.inet_down_cost,
        "reliability": round(offer.reliability, 4),
        "location": offer.geolocation or "",
        "direct_ports": offer.direct_port_count,
    }


def offers_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, header_style="bold cyan", title_justify="left")
    for header, justify in OFFER_COLUMNS:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            str(r["rank"]),
            str(r["offer_id"]),
            f"{r['dph_total']:.3f}",
            f"{r['minutes_to_ready']:.1f}",
            f"{r['dollars_to_ready']:.3f}",
            f"{r['expected_dollars']:.3f}",
            r["gpu"],
            f"{r['vram_gb']:.0f}",
            f"{r['inet_down_mbps']:.0f}",
            f"{r['inet_down_cost_per_gb']:.4f}",
            f"{r['reliability']:.3f}",
            r["location"],
            str(r["direct_ports"]),
        )
    return table


def instance_row(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id,
        "label": inst.label,
        "status": inst.actual_status,
        "intended": inst.intended_status,
        "status_msg": inst.status_msg,
        "gpu": f"{inst.num_gpus}x {inst.gpu_name or '?'}",
        "dph_total": inst.dph_total,
        "public_ip": inst.public_ipaddr,
        "ports": {k: v[0].get("HostPort") for k, v in (inst.ports or {}).items() if v},
        "machine_id": inst.machine_id,
        "location": inst.geolocation,
    }


def instances_table(instances: list[Instance]) -> Table:
    table = Table(title="Instances", header_style="bold cyan", title_justify="left")
    for header in ("id", "label", "status", "GPU", "$/h", "public ip", "ports", "status message"):
        table.add_column(header)
    for inst in instances:
        r = instance_row(inst)
        ports = ", ".join(f"{k}->{v}" for k, v in r["ports"].items()) or "-"
        table.add_row(
            str(r["id"]),
            r["label"] or "",
            r["status"] or "(none yet)",
            r["gpu"],
            f"{r['dph_total']:.3f}" if r["dph_total"] is not None else "",
            r["public_ip"] or "",
            ports,
            (r["status_msg"] or "")[:80],
        )
    return table
