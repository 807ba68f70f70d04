"""``rrome memcheck``'s tables: the devices, the edit's working set on the edited layer's device,
the verdict, the cheapest fix and the notes.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rrome_cli.memcheck.planning import GiB, MemoryPlan


def render(plan: MemoryPlan, console: Console) -> None:
    """A table of the devices, the edit's working set on the edited layer's device, the verdict."""
    table = Table(title=f"rrome memcheck: {plan.model} ({plan.dtype}), layers {plan.layers}")
    for column in (
        "device",
        "weights",
        "edit working set",
        "stats pass peak",
        "reserve",
        "total",
        "capacity",
        "headroom",
    ):
        table.add_column(column, justify="left" if column == "device" else "right")
    for d in plan.devices:
        layers = f" (edits {', '.join(map(str, d.edited_layers))})" if d.edited_layers else ""
        colour = "green" if d.fits else "red"
        table.add_row(
            d.device + layers,
            _g(d.weights),
            _g(d.edit),
            _g(d.stats),
            _g(d.reserve),
            _g(d.total),
            _g(d.capacity),
            f"[{colour}]{_g(d.headroom)}[/{colour}]",
        )
    console.print(table)
    parts = Table(title=f"edit working set on {plan.edit_device} (GiB)", show_header=False)
    parts.add_column("part")
    parts.add_column("GiB", justify="right")
    c, geo = plan.components, plan.geometry
    rows = [
        ("key covariance C (fp32, in RAM)", c["key_covariance_C"]),
        ("Cholesky factor of C + lambda I (fp32)", c["cholesky_factor"]),
        ("factorisation peak (C + lambda I copy, factor)", c["factorisation_peak"]),
        (
            f"value step, traced ({geo.rows} prompts x {geo.prefix}+{geo.suffix} tokens)",
            c["value_step"],
        ),
        ("  of which activations kept for backprop and KV cache", c["value_activations"]),
        (
            f"  of which logits + log-softmax at {geo.targets + 1} rows (fp32)",
            c["logits_target_rows"],
        ),
        ("  of which KL reference + Adam state", c["kl_reference"] + c["adam_delta"]),
        ("  (full logits, not computed by the engine)", c["logits_if_full"]),
        ("key pass", c["key_pass"]),
        ("rank-one update (outer product, old W, W in fp32)", c["update"]),
    ]
    for label, value in rows:
        parts.add_row(label, _g(value))
    console.print(parts)
    colour = "green" if plan.fits else "red"
    console.print(f"[bold {colour}]{plan.verdict()}[/bold {colour}]")
    if plan.fix:
        console.print(f"cheapest fix: {plan.fix}")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/dim]")


def _g(n: int) -> str:
    return f"{n / GiB:.2f}"
