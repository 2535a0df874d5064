"""What a node tells a client about the mesh (`meshci peers`, `meshci status`): one row per
member, this node's own facts first, the others' from their adverts. Pure: the node passes
its peer table and the time in."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshci.node.membership import Advert, Peer


def links_json(links: Iterable[tuple[str, float, float]]) -> dict[str, dict[str, float]]:
    """An advert's link estimates as {peer: {mbps, latency_ms}} (mbps 0: not measured yet)."""
    return {peer: {"mbps": mbps, "latency_ms": ms} for peer, mbps, ms in links}


def member_row(name: str, address: str, status: str, advert: Advert, heard_s_ago: float) -> dict[str, Any]:
    return {
        "name": name,
        "address": address,
        "status": status,
        "gflops": advert.gflops,
        "load_s": advert.backlog_s,
        "tile_ms": advert.tile_ms,
        "links": links_json(advert.links),
        "version": advert.version or None,
        "heard_s_ago": round(max(0.0, heard_s_ago), 3),
    }


def mesh_view(own: dict[str, Any], peers: Iterable[Peer], now: float) -> list[dict[str, Any]]:
    """This node's row, then every member it believes up (alive or suspect, heard directly),
    by name; a dead member drops out once failure detection declared it."""
    rows = [own]
    for peer in sorted(peers, key=lambda p: p.name):
        rows.append(member_row(peer.name, str(peer.address), peer.status.value, peer.advert, now - peer.last_heard))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The members as a plain text table: name, address, status, speed, load, links, version."""
    header = ("NAME", "ADDRESS", "STATUS", "GFLOP/S", "LOAD", "VERSION", "LINKS (Mbit/s, ms)")
    lines = [header]
    for row in rows:
        links = ", ".join(f"{peer} {v['mbps']:g}/{v['latency_ms']:g}" for peer, v in sorted(row["links"].items()))
        lines.append((row["name"], row["address"], row["status"], f"{row['gflops']:.3g}",
                      f"{row['load_s']:.2f} s", row["version"] or "?", links or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1]
                     for line in lines)


def with_activity(rows: list[dict[str, Any]], own: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The member rows with each member's own account of its activity (`own[name]`: the
    first row of its own view, None when it did not answer): requests in flight, tiles."""
    merged = []
    for row in rows:
        mine = own.get(row["name"])
        merged.append({**row, "requests_in_flight": (mine or {}).get("requests_in_flight"),
                       "tiles_computed": (mine or {}).get("tiles_computed")})
    return merged


STATUS_COLUMNS = ("NAME", "STATUS", "GFLOP/S", "LOAD", "IN FLIGHT", "TILES", "ADDRESS")


def status_cells(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One line of `meshci status` per member (`?` where a member did not answer)."""
    def shown(value: Any) -> str:
        return "?" if value is None else str(value)

    return [(r["name"], r["status"], f"{r['gflops']:.3g}", f"{r['load_s']:.2f} s",
             shown(r.get("requests_in_flight")), shown(r.get("tiles_computed")), r["address"]) for r in rows]


def format_status(rows: list[dict[str, Any]]) -> str:
    """`meshci status` as plain text (the view without rich)."""
    lines = [STATUS_COLUMNS, *status_cells(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(STATUS_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
