"""`conch daemon`: the background service run in the foreground, its status, and installed as a launchd or
systemd service."""

from __future__ import annotations

from pathlib import Path

from conch_dna.cli.common import GROUPS, console, fail, home_and_config, print_json

import typer

app = typer.Typer(help=GROUPS["daemon"][1], no_args_is_help=True)


def api_server(home: Path):
    """What the daemon starts once it holds its lock: `conch serve` on a thread; returns its stop."""

    def start():
        from conch_dna.server.app import Server

        server = Server(home).start()
        print(f"conch serve: the OpenAI API on {server.url}", flush=True)
        return server.stop

    return start


@app.command("run")
def daemon_run() -> None:
    """Run the daemon in the foreground until SIGTERM / Ctrl-C (with `serve = true`, the API too)."""
    from daemon.service import run_forever

    home, config = home_and_config()
    try:
        code = run_forever(home, companion=api_server(home) if config.serve else None)
    except RuntimeError as exc:  # another daemon holds the lock, or the API cannot start
        fail(str(exc))
    raise typer.Exit(code)


@app.command("status")
def daemon_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Whether the daemon runs, its pid, and what it is doing."""
    from conch_dna.lifecycle.status import read_state

    home, _ = home_and_config()
    state = read_state(home)
    if as_json:
        print_json({"running": state is not None, **(state or {})})
    elif state:
        doing = f"training {state['running']['domain']}" if state.get("running") else "idle"
        console.print(f"daemon running (pid {state['pid']}), {doing}")
    else:
        console.print("daemon not running")


@app.command("install")
def daemon_install() -> None:
    """Install and start the service: launchd on macOS, a systemd user unit on Linux."""
    from daemon.launchd import install

    home, _ = home_and_config()
    console.print(install(home))


@app.command("uninstall")
def daemon_uninstall() -> None:
    """Stop and remove the service."""
    from daemon.launchd import uninstall

    console.print(uninstall())
