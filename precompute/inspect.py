"""`cogfun inspect STORE [--json] [--verify]`: what a latent store holds, and whether it is intact.

    cogfun inspect latents.zarr            # tables: buckets, totals, settings, failures
    cogfun inspect latents.zarr --json     # one JSON object on stdout, nothing else
    cogfun inspect latents.zarr --verify   # read every sample against its checksum
    cogfun inspect s3://bucket/prefix/latents.zarr [--storage-options JSON]   # an object store

Exit codes: 0 fine; 1 `--verify` found damage or an unfinished store; 2 the store cannot be opened.
Input failures recorded by precompute (a bad video, say) are reported but are not damage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cogfun.common.store import StoreError, live_writer, open_store
from rich.console import Console
from rich.table import Table

EXIT_OK, EXIT_DAMAGED, EXIT_UNREADABLE = 0, 1, 2
INCOMPLETE = (
    "the store is incomplete: a precompute is still running or was interrupted; rerun it to finish"
)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _flat(value: object, prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as (dotted key, JSON value) rows."""
    if isinstance(value, dict) and value:
        rows: list[tuple[str, str]] = []
        for key in sorted(value):
            rows += _flat(value[key], f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix, json.dumps(value, default=str))]


def bucket_table(summary: dict) -> Table:
    table = Table()
    for col in ("bucket", "pixels (HxW)", "frames", "latent shape", "samples", "planned", "bytes"):
        table.add_column(
            col, justify="left" if col in ("bucket", "latent shape") else "right", no_wrap=True
        )
    for b in summary["buckets"]:
        shape = "x".join(str(v) for v in b["latent_shape"])
        table.add_row(
            b["name"], f"{b['height']}x{b['width']}", str(b["frames"]), shape,
            str(b["count"]), str(b["planned"]), human_bytes(b["bytes"]),
        )  # fmt: skip
    bucket_bytes = sum(b["bytes"] for b in summary["buckets"])
    table.add_section()
    table.add_row(
        f"total ({len(summary['buckets'])} buckets)", "", "", "",
        str(summary["samples"]), str(summary["planned"]), human_bytes(bucket_bytes),
    )  # fmt: skip
    return table


def _update_text(update: dict | None) -> str:
    if not update:
        return "none (planned once)"
    return ", ".join(f"{update.get(k, 0)} {k}" for k in ("added", "reused", "retired", "restored"))


def store_table(summary: dict) -> Table:
    table = Table(show_header=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    layout = summary["layout"]
    rows = [
        ("path", summary["path"]),
        ("status", summary["status"]),
        ("schema version", str(summary["schema_version"])),
        ("samples stored", f"{summary['samples']} of {summary['planned']} planned"),
        ("retired", f"{summary['retired']} (rows the dataset no longer has, not served)"),
        ("last update", _update_text(summary.get("last_update"))),
        (
            "captions",
            f"{summary['captions']['written']} of {summary['captions']['planned']} written",
        ),
        ("latents", f"{layout['latent_format']}, {layout['latent_channels']} channels"),
        ("masks per sample", str(layout["masks_per_sample"])),
        ("text embedding", f"{layout['text_len']} x {layout['text_dim']}"),
        ("disk size", f"{human_bytes(summary['bytes'])} ({summary['bytes']} bytes)"),
        ("raw payload", f"{human_bytes(summary['raw_bytes'])} ({summary['raw_bytes']} bytes)"),
        ("compression ratio", f"{summary['compression_ratio']:.2f}"),
        ("fingerprint", summary["fingerprint"]),
        ("digest", summary["digest"] or f"unavailable: {summary['digest_error']}"),
        ("created", str(summary["created_at"])),
        ("finalized", str(summary["finalized_at"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def settings_table(summary: dict) -> Table:
    table = Table()
    table.add_column("setting", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in _flat(summary["settings"]):
        table.add_row(key, value)
    return table


def failures_table(failed: list[dict]) -> Table:
    table = Table()
    for col in ("row", "file", "reason"):
        table.add_column(col, overflow="fold")
    for f in failed:
        table.add_row("" if f["row"] is None else str(f["row"]), str(f["file"]), str(f["reason"]))
    return table


def damaged_table(damaged: list[dict]) -> Table:
    table = Table()
    for col in ("bucket", "slot", "reason"):
        table.add_column(col, overflow="fold")
    for d in damaged:
        table.add_row(d["bucket"], str(d["slot"]), d["reason"])
    return table


def render(summary: dict, damaged: list[dict] | None, console: Console) -> None:
    console.print("[bold]Store[/bold]")
    console.print(store_table(summary))
    console.print("[bold]Buckets[/bold]")
    console.print(bucket_table(summary))
    console.print("[bold]Settings[/bold] (fingerprinted)")
    console.print(settings_table(summary))
    failed = summary["failed"]
    console.print(
        f"[bold]Failed inputs[/bold] ({len(failed)})" + ("" if failed else ": none recorded")
    )
    if failed:
        console.print(failures_table(failed))
    if damaged is not None:
        console.print(f"[bold]Damaged samples[/bold] ({len(damaged)})")
        if damaged:
            console.print(damaged_table(damaged))
        elif summary["status"] == "complete":
            console.print(f"verify: intact ({summary['samples']} samples checked)")


def inspect_store(path: str | Path, *, as_json: bool = False, verify: bool = False) -> int:
    """Print the store's summary (tables, or JSON only on stdout); returns the exit code. `path`
    is a local folder or an object-store URL (opened with the process's storage options)."""
    err = Console(file=sys.stderr, soft_wrap=True)
    try:
        reader = open_store(path, allow_incomplete=True)
        summary = reader.summary()
        found = reader.verify() if verify else None
    except StoreError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_UNREADABLE
    damaged = (
        None if found is None else [{"bucket": b, "slot": s, "reason": r} for b, s, r in found]
    )
    incomplete = summary["status"] != "complete"
    if incomplete:
        writer = live_writer(path)
        warning = f"the store is incomplete: a precompute is writing it right now ({writer})"
        err.print(f"warning: {warning if writer else INCOMPLETE}", markup=False, highlight=False)
    code = EXIT_DAMAGED if verify and (damaged or incomplete) else EXIT_OK
    if as_json:
        if damaged is not None:
            summary["damaged"] = damaged
            summary["intact"] = code == EXIT_OK
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()
    else:
        render(summary, damaged, Console(file=sys.stdout, width=max(120, Console().width)))
    if damaged:
        err.print(f"{len(damaged)} damaged sample(s) in {path}", markup=False, highlight=False)
    return code
