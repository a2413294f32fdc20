"""`conch kd`: status, retrain (here, through the running daemon, or data-parallel), history, report, rollback, pin."""

from __future__ import annotations

import time
from pathlib import Path

from conch_dna.cli.common import GROUPS, checked_domain, console, fail, home_and_config, open_store, print_json

import typer
from rich.table import Table

app = typer.Typer(help=GROUPS["kd"][1], no_args_is_help=True)


@app.command("status")
def kd_status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Per domain: traces against the threshold, current version and its metrics, the last run."""
    from conch_dna.lifecycle.status import auto_words, kd_status_data, metric_cells

    home, config = home_and_config()
    data = kd_status_data(home, config)
    if as_json:
        print_json(data)
        return
    table = Table(title=f"conch kd status ({home})")
    for col in ("domain", "train", "held-out", "new / threshold", "version", "held-out KL", "on-policy KL", "top-1",
                "tool calls right (parse)", "in form free (held)", "auto/ served", "last run"):
        table.add_column(col, no_wrap=col in ("domain", "version"))
    for d in data["domains"]:
        last = d["last_run"]
        table.add_row(d["domain"], str(d["train"]), str(d["heldout"]), f"{d['new']} / {d['threshold']}",
                      d["version"], *metric_cells(d["metrics"]), auto_words(d["auto"]),
                      f"{last['status']}: {last['reason'] or ''}"[:60] if last else "-")
    console.print(table)
    for d in data["domains"]:
        auto = d["auto"]
        if auto["deferred"] and auto["teacher_seconds_saved"] is not None:
            right = auto["would_have_been_right"]
            console.print(f"{d['domain']}@{d['version']}: auto/ saved about {auto['teacher_seconds_saved']:.0f} s "
                          f"of teacher time; the teacher's {auto['teacher_seconds']:.0f} s on deferred calls"
                          + (f", where the student had {right:.0%} right" if right is not None else ""),
                          soft_wrap=True)
        if d["failures_in_a_row"]:
            nxt = time.strftime("%Y-%m-%d %H:%M", time.localtime(d["retry_at"]))
            console.print(f"{d['domain']}: {d['failures_in_a_row']} failed run(s) in a row; the daemon tries "
                          f"again at {nxt} (`conch kd retrain --domain {d['domain']}` now)", soft_wrap=True)
        if d["set_aside_traces"]:
            console.print(f"{d['domain']}: {d['set_aside_traces']} train trace(s) set aside; last: "
                          f"{d['last_set_aside']['reason']}", soft_wrap=True)
    daemon = data["daemon"]
    if daemon["running"]:
        nxt = time.strftime("%H:%M:%S", time.localtime(daemon["next_check"])) if daemon["next_check"] else "-"
        console.print(f"daemon: running (pid {daemon['pid']}), next check {nxt}"
                      + (f", training {daemon['training']['domain']}" if daemon["training"] else ""))
    else:
        console.print("daemon: not running (start it with `conch daemon run` or `conch daemon install`)")


@app.command("retrain")
def kd_retrain(domain: str = typer.Option(..., help="the domain to retrain"),
               iters: int = typer.Option(None, help="KD steps (default: the config's)"),
               force: bool = typer.Option(False, help="promote even with too few held-out traces"),
               hosts: Path = typer.Option(None, help="data-parallel over the Macs of this mlx.launch host file"),
               ranks: int = typer.Option(None, help="data-parallel over this many processes on this machine")) -> None:
    """Retrain a domain now: through the daemon when it runs, else here with a progress bar; with --hosts
    or --ranks (or [distributed] in config.toml), data-parallel under mlx.launch."""
    from conch_dna.lifecycle.cycle import retrain_domain
    from conch_dna.lifecycle.status import read_state
    from conch_dna.traces.runs import RunStatus

    from daemon.client import DaemonGone, retrain_in_parallel, retrain_through_daemon

    home, config = home_and_config()
    domain = checked_domain(domain, config)
    if iters is not None and iters < 1:
        fail(f"--iters must be at least 1, got {iters}")
    config = config.with_iters(domain, iters)
    parallel = config.distributed
    if hosts or ranks:
        if hosts and not hosts.is_file():
            fail(f"no host file {hosts}")
        parallel = parallel.model_copy(update={"hostfile": str(hosts) if hosts else None, "local_ranks": ranks or 0})
    if parallel.enabled and not read_state(home):
        where = f"the hosts of {parallel.hostfile}" if parallel.hostfile else f"{parallel.local_ranks} processes here"
        console.print(f"retraining {domain} data-parallel over {where} ({parallel.backend})")
        status, reason = retrain_in_parallel(
            home, domain, iters, force, parallel, on_event=_show_rank_event,
            on_stop=lambda: console.print("  stopping: the ranks checkpoint, and the next retrain resumes"))
    elif read_state(home):
        console.print(f"asked the running daemon to retrain {domain}; waiting for it")
        try:
            status, reason = retrain_through_daemon(home, domain, iters, force)
        except DaemonGone as exc:
            fail(str(exc))
    else:
        from conch_dna.cli.progress import RichProgress

        progress = RichProgress(console)
        try:
            with progress.stop_on_signals():
                r = retrain_domain(home, domain, config, force, progress)
        finally:
            progress.close()
        status, reason = str(r.status), r.reason
    console.print(f"{domain}: {status}: {reason}")
    if status == RunStatus.FAILED:
        raise typer.Exit(1)


def _show_rank_event(event: dict) -> None:
    if event.get("event") == "stage":
        console.print(f"  {event['text']}", soft_wrap=True, markup=False)
    elif event.get("event") == "progress":
        console.print(f"  step {event['iteration']}: loss {event['combined']:.4f}, "
                      f"{event['tokens_per_second']:.0f} tokens/s")


@app.command("history")
def kd_history(domain: str = typer.Option(...), as_json: bool = typer.Option(False, "--json"),
               limit: int = typer.Option(20)) -> None:
    """The domain's training runs, newest first, with their decisions and reasons."""
    from conch_dna.lifecycle.status import auto_figures, auto_words

    home, config = home_and_config()
    runs = open_store().runs(checked_domain(domain, config), limit)
    if as_json:
        print_json([r.as_dict() for r in runs])
        return
    table = Table(title=f"{domain}: training runs")
    for col in ("run", "started", "status", "version", "KL current -> candidate", "on-policy KL",
                "tool calls right (parse)", "in form free (held)", "auto/ served (expected)", "samples", "reason"):
        table.add_column(col, no_wrap=col in ("run", "status", "version"))
    answered = {a["version"]: a for a in open_store().auto_answers(domain)}
    for r in runs:
        table.add_row(str(r.id), time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at)),
                      str(r.status), r.version or "-", r.kl_change(), r.kl_change(on_policy=True), r.tool_change(),
                      r.format_change(), auto_words(auto_figures(answered.get(r.version),
                                                                 (r.candidate_metrics or {}).get("acceptance"))),
                      str(r.samples_generated) if r.samples_generated is not None else "-", r.reason or "")
    console.print(table)


@app.command("report")
def kd_report(output: Path = typer.Option(None, "--output", "-o", help="folder (default: $CONCH_HOME/report)")) -> None:
    """Write a self-contained HTML report with loss curves, metrics per version and decisions."""
    from conch_dna.lifecycle.report import build_report

    home, config = home_and_config()
    console.print(f"report: {build_report(home, config, output)}")


@app.command("rollback")
def kd_rollback(domain: str = typer.Option(...), to: str = typer.Option(None, help="version, e.g. v0002")) -> None:
    """Make an earlier version current again (default: the previous one)."""
    from conch_dna.models.versions import rollback

    home, config = home_and_config()
    try:
        version = rollback(home, checked_domain(domain, config), to)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: DomainBusy, a retrain of it is running
        fail(str(exc))
    console.print(f"{domain}: {version} is current again")


@app.command("pin")
def kd_pin(domain: str = typer.Option(...), version: str = typer.Option(..., help="e.g. v0002"),
           unpin: bool = typer.Option(False, "--unpin", help="let pruning delete it again")) -> None:
    """Keep a version however many newer ones come (only the newest keep_versions are kept)."""
    from conch_dna.models.versions import pin

    home, config = home_and_config()
    try:
        pinned = pin(home, checked_domain(domain, config), version, pinned=not unpin)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: DomainBusy, a retrain of it is running
        fail(str(exc))
    console.print(f"{domain}: pinned: {', '.join(pinned) or 'none'}")
