"""`conch traces`: import, stats, quarantine, export."""

from __future__ import annotations

import time
from pathlib import Path

from conch_dna.cli.common import GROUPS, console, fail, open_store, print_json

import typer
from rich.table import Table

app = typer.Typer(help=GROUPS["traces"][1], no_args_is_help=True)


@app.command("import")
def traces_import(files: list[Path] = typer.Argument(..., help="JSONL trace files")) -> None:
    """Ingest JSONL files into the trace store (the files are left in place)."""
    from conch_dna.traces.ingest import ingest_file

    from rich.progress import Progress

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        console.print(f"[red]error:[/red] no such file: {', '.join(missing)}")
        raise typer.Exit(2)
    store, totals = open_store(), [0, 0, 0]
    with Progress(console=console) as bar:
        task = bar.add_task("importing", total=len(files))
        for f in files:
            try:
                r = ingest_file(store, f, source=str(f), follow_links=True)
            except ValueError as exc:
                fail(str(exc))
            totals = [totals[0] + r.stored, totals[1] + r.duplicates, totals[2] + r.quarantined]
            bar.advance(task)
    console.print(f"{totals[0]} stored, {totals[1]} duplicates, {totals[2]} quarantined"
                  + (" (see `conch traces quarantine`)" if totals[2] else ""))


@app.command("stats")
def traces_stats(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Traces per domain: total, train, held-out, new since the last training run."""
    from dataclasses import asdict

    store = open_store()
    rows = [asdict(c) for c in store.stats()]
    if as_json:
        print_json({"domains": rows, "quarantined": store.quarantine_count()})
        return
    table = Table(title=f"traces in {store.path}")
    for col in ("domain", "total", "train", "heldout", "new_train"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("domain", "total", "train", "heldout", "new_train")))
    console.print(table)
    console.print(f"quarantined lines: {store.quarantine_count()}")


@app.command("quarantine")
def traces_quarantine(as_json: bool = typer.Option(False, "--json"),
                      limit: int = typer.Option(50, help="newest N lines")) -> None:
    """Lines that were not stored, with their source, line number and the reason."""
    items = open_store().quarantined(limit)
    if as_json:
        print_json(items)
        return
    table = Table(title="quarantined lines (newest first)")
    for col in ("source", "line", "reason", "start of line"):
        table.add_column(col)
    for q in items:
        table.add_row(q["source"], str(q["line"]), q["reason"], q["raw"][:60])
    console.print(table)


@app.command("purge-quarantine")
def traces_purge_quarantine(older_than: float = typer.Option(..., "--older-than", help="days; 0 forgets them all"),
                            as_json: bool = typer.Option(False, "--json")) -> None:
    """Forget quarantined lines kept longer than --older-than days (they hold private trace text)."""
    if older_than < 0:
        fail(f"--older-than must be 0 or more days, got {older_than}")
    purged = open_store().purge_quarantine(time.time() - older_than * 86400)
    if as_json:
        print_json({"purged": purged})
        return
    console.print(f"forgot {purged} quarantined line(s) older than {older_than:g} day(s)")


@app.command("export")
def traces_export(domain: str = typer.Option(..., help="the domain to export"),
                  split: str = typer.Option("train", help="train or heldout"),
                  output: Path = typer.Option(None, "--output", "-o", help="file (default: stdout)")) -> None:
    """Write a domain's traces as mlx-lm chat JSONL ({"messages": [...]} per line, and "tools" where offered)."""
    import json

    from conch_dna.system.domains import UnknownDomainError, check_domain

    try:
        check_domain(domain)
    except UnknownDomainError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if split not in ("train", "heldout"):
        console.print(f"[red]error:[/red] --split must be train or heldout, got {split!r}")
        raise typer.Exit(2)
    lines = [json.dumps(chat, ensure_ascii=False) for chat in open_store().chats(domain, split)]
    text = "".join(line + "\n" for line in lines)
    if output:
        from conch_dna.system.fsutil import atomic_write_text

        atomic_write_text(output, text)
        console.print(f"{len(lines)} traces written to {output}")
    else:
        typer.echo(text, nl=False)
