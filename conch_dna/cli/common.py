"""What every command group shares: the console, the one-line error (exit 2), the home and its config,
a domain checked against it, the store, --json output."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
# the command groups, name: (module, help): `conch --help` lists them without loading their modules
GROUPS = {
    "traces": ("conch_dna.cli.traces", "Teacher traces: import, stats, quarantine, export."),
    "kd": ("conch_dna.cli.kd", "Distillation: status, retrain, history, rollback."),
    "daemon": ("conch_dna.cli.daemon", "The background service."),
    "teacher-cache": ("conch_dna.cli.teacher_cache",
                      "The teacher cache: export it to train on another machine, import it there."),
    "models": ("conch_dna.cli.models", "Models: those on this machine, importing a GGUF, checking or building a pair."),
}


def fail(message: str) -> None:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def home_and_config():
    from conch_dna.settings.config import ConfigError, load_config
    from conch_dna.system.home import conch_home

    try:
        return conch_home(), load_config(conch_home())
    except ConfigError as exc:
        fail(str(exc))


def checked_domain(domain: str, config) -> str:
    from conch_dna.system.domains import UnknownDomainError, check_domain

    try:
        return check_domain(domain, config.domains)
    except UnknownDomainError as exc:
        fail(str(exc))


def open_store():
    from conch_dna.traces.store import TraceStore

    home, config = home_and_config()
    return TraceStore.for_home(home, config)


def print_json(data) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))
