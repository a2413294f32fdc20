"""The `conch` command: a thin layer over the library. Each command group lives in its own module, loaded
only when that group runs (so `conch models list` imports no trainer), as mlx-lm's command line does."""

from __future__ import annotations

import importlib
from pathlib import Path

from conch_dna.cli.common import GROUPS, console, fail, home_and_config, print_json

import typer
from rich.table import Table
from typer.core import TyperGroup


class LazyGroups(TyperGroup):
    """The top-level commands, and the groups of GROUPS imported on first use (`conch --help` loads them all to
    list them; any other command only its own)."""

    def list_commands(self, ctx) -> list[str]:
        return [*super().list_commands(ctx), *GROUPS]

    def get_command(self, ctx, name: str):
        if name not in GROUPS:
            return super().get_command(ctx, name)
        group = typer.main.get_group(importlib.import_module(GROUPS[name][0]).app)
        group.name = name
        return group


app = typer.Typer(cls=LazyGroups, help="Conch DNA: continuous true knowledge distillation on MLX.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def demo(home: Path = typer.Option(Path("demo-home"), help="demo state folder (one an earlier demo made is "
                                                           "emptied; another non-empty one is refused)"),
         real: bool = typer.Option(False, "--real", help="SmolLM2-135M-Instruct and its cut instead of the kit "
                                                          "(built on first use; several minutes)")) -> None:
    """The whole loop, live: EGO traces, daemon retrains, neurons hot-swap (the tiny kit, or --real)."""
    from conch_dna.cli.demo import DemoHomeError, kit_setup, prepare_home, real_setup, run_demo

    try:
        prepare_home(home)  # refused before a pair is built or anything is deleted
    except DemoHomeError as exc:
        fail(str(exc))
    raise typer.Exit(run_demo(home, console, real_setup() if real else kit_setup()))


@app.command("serve")
def serve(host: str = typer.Option(None, help="address to listen on (default: [server] host, 127.0.0.1)"),
          port: int = typer.Option(None, help="port (default: [server] port, 8321)")) -> None:
    """The neurons and the EGO behind an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models)."""
    import logging

    from conch_dna.server.app import ServeError, Server

    home, _ = home_and_config()
    # each request's model, version, finish reason and token count; never its messages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = Server(home, host=host, port=port)
    except ServeError as exc:
        fail(str(exc))
    server.run(ready=lambda url: console.print(f"conch serve: {url} (model = a domain, domain@vNNNN or "
                                                f"ego/<domain>); Ctrl-C stops it"))


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Check this machine: MLX backend, BLAS speed, memory, models, disk, daemon, serving; hints for problems."""
    from conch_dna.lifecycle.doctor import run_checks
    from conch_dna.lifecycle.status import read_state

    home, config = home_and_config()
    checks = run_checks(home, config, read_state(home))
    if as_json:
        print_json({"home": str(home), "ok": all(c.ok for c in checks),
                     "checks": {c.name: c.as_dict() for c in checks}})
        return
    table = Table(title=f"conch doctor ({home})")
    for col in ("check", "", "value", "hint"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[yellow]![/yellow]", c.value, c.hint or "")
    console.print(table)
