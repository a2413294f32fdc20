"""The `conch` command: a thin layer over the library."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Conch DNA: continuous true knowledge distillation on MLX.",
                  no_args_is_help=True, add_completion=False)
console = Console()
traces_app = typer.Typer(help="Teacher traces: import, stats, quarantine, export.", no_args_is_help=True)
app.add_typer(traces_app, name="traces")


def _store():
    from conch_dna.home import conch_home
    from conch_dna.store import TraceStore

    return TraceStore(conch_home() / "conch.db")


def _print_json(data) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


@traces_app.command("import")
def traces_import(files: list[Path] = typer.Argument(..., help="JSONL trace files")) -> None:
    """Ingest JSONL files into the trace store (the files are left in place)."""
    from rich.progress import Progress

    from conch_dna.ingest import ingest_file

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        console.print(f"[red]error:[/red] no such file: {', '.join(missing)}")
        raise typer.Exit(2)
    store, totals = _store(), [0, 0, 0]
    with Progress(console=console) as bar:
        task = bar.add_task("importing", total=len(files))
        for f in files:
            r = ingest_file(store, f, source=str(f))
            totals = [totals[0] + r.stored, totals[1] + r.duplicates, totals[2] + r.quarantined]
            bar.advance(task)
    console.print(f"{totals[0]} stored, {totals[1]} duplicates, {totals[2]} quarantined"
                  + (" (see `conch traces quarantine`)" if totals[2] else ""))


@traces_app.command("stats")
def traces_stats(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Traces per domain: total, train, held-out, new since the last training run."""
    from dataclasses import asdict

    store = _store()
    rows = [asdict(c) for c in store.stats()]
    if as_json:
        _print_json({"domains": rows, "quarantined": store.quarantine_count()})
        return
    table = Table(title=f"traces in {store.path}")
    for col in ("domain", "total", "train", "heldout", "new_train"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("domain", "total", "train", "heldout", "new_train")))
    console.print(table)
    console.print(f"quarantined lines: {store.quarantine_count()}")


@traces_app.command("quarantine")
def traces_quarantine(as_json: bool = typer.Option(False, "--json"),
                      limit: int = typer.Option(50, help="newest N lines")) -> None:
    """Lines that were not stored, with their source, line number and the reason."""
    items = _store().quarantined(limit)
    if as_json:
        _print_json(items)
        return
    table = Table(title="quarantined lines (newest first)")
    for col in ("source", "line", "reason", "start of line"):
        table.add_column(col)
    for q in items:
        table.add_row(q["source"], str(q["line"]), q["reason"], q["raw"][:60])
    console.print(table)


@traces_app.command("export")
def traces_export(domain: str = typer.Option(..., help="the domain to export"),
                  split: str = typer.Option("train", help="train or heldout"),
                  output: Path = typer.Option(None, "--output", "-o", help="file (default: stdout)")) -> None:
    """Write a domain's traces as mlx-lm chat JSONL ({"messages": [...]} per line)."""
    import json

    from conch_dna.domains import UnknownDomainError, check_domain

    try:
        check_domain(domain)
    except UnknownDomainError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if split not in ("train", "heldout"):
        console.print(f"[red]error:[/red] --split must be train or heldout, got {split!r}")
        raise typer.Exit(2)
    lines = [json.dumps({"messages": chat}, ensure_ascii=False) for chat in _store().chats(domain, split)]
    text = "".join(line + "\n" for line in lines)
    if output:
        from conch_dna.fsutil import atomic_write_text

        atomic_write_text(output, text)
        console.print(f"{len(lines)} traces written to {output}")
    else:
        typer.echo(text, nl=False)


@app.command()
def demo(
    home: Path = typer.Option(Path("demo-home"), help="demo state folder (emptied first)"),
    domains: str = typer.Option("thinking,action", help="comma-separated domains to distil"),
    iters: int = typer.Option(120, help="KD steps per domain"),
) -> None:
    """Distil domains of the tiny kit end to end and show held-out KL before and after."""
    from conch_dna.domains import check_domain
    from conch_dna.fsutil import private_dir
    from conch_dna.kit import STUDENT_PATH, TEACHER_PATH
    from conch_dna.training.distillation import DOMAIN_PROMPTS
    from conch_dna.training.true_kd import KDConfig, TrueKnowledgeDistiller, split_prompts

    names = [check_domain(d.strip()) for d in domains.split(",") if d.strip()]
    if home.exists():
        shutil.rmtree(home)
    private_dir(home)
    tic = time.perf_counter()
    console.print(f"[bold]Conch DNA demo[/bold]: teacher {TEACHER_PATH}\n"
                  f"student {STUDENT_PATH}\nhome {home.resolve()}")
    config = KDConfig(num_iters=iters, learning_rate=1e-3, lora_rank=8, max_answer_tokens=96)
    distiller = TrueKnowledgeDistiller(TEACHER_PATH, STUDENT_PATH, config, output_dir=home,
                                       console=console)
    results = []
    for domain in names:
        train, held = split_prompts(DOMAIN_PROMPTS[domain]["examples"], 0.2)
        results.append(distiller.distill_domain(domain, train, held))

    table = Table(title="held-out metrics against the teacher (lower KL is better)")
    for col in ("domain", "KL before", "KL after", "change", "top-1 before", "top-1 after"):
        table.add_column(col, justify="right")
    for r in results:
        b, a = r.heldout_before, r.heldout_after
        table.add_row(r.domain, f"{b['kl']:.4f}", f"{a['kl']:.4f}",
                      f"{100 * (a['kl'] / b['kl'] - 1):+.1f}%", f"{b['agreement']:.1%}",
                      f"{a['agreement']:.1%}")
    console.print(table)
    console.print(f"adapters under {home / 'adapters_kd'}; done in {time.perf_counter() - tic:.0f}s")


if __name__ == "__main__":
    app()
