"""The `conch` command: a thin layer over the library."""

from __future__ import annotations

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
kd_app = typer.Typer(help="Distillation: status, retrain, history, rollback.", no_args_is_help=True)
app.add_typer(kd_app, name="kd")
daemon_app = typer.Typer(help="The background service.", no_args_is_help=True)
app.add_typer(daemon_app, name="daemon")
cache_app = typer.Typer(help="The teacher cache: export it to train on another machine, import it there.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="teacher-cache")
models_app = typer.Typer(help="Models: those on this machine, importing a GGUF, checking or building a pair.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def _fail(message: str) -> None:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _home_and_config():
    from conch_dna.settings.config import ConfigError, load_config
    from conch_dna.system.home import conch_home

    try:
        return conch_home(), load_config(conch_home())
    except ConfigError as exc:
        _fail(str(exc))


def _checked_domain(domain: str, config) -> str:
    from conch_dna.system.domains import UnknownDomainError, check_domain

    try:
        return check_domain(domain, config.domains)
    except UnknownDomainError as exc:
        _fail(str(exc))


def _store():
    from conch_dna.traces.store import TraceStore

    home, config = _home_and_config()
    return TraceStore.for_home(home, config)


def _print_json(data) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


@traces_app.command("import")
def traces_import(files: list[Path] = typer.Argument(..., help="JSONL trace files")) -> None:
    """Ingest JSONL files into the trace store (the files are left in place)."""
    from conch_dna.traces.ingest import ingest_file

    from rich.progress import Progress

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        console.print(f"[red]error:[/red] no such file: {', '.join(missing)}")
        raise typer.Exit(2)
    store, totals = _store(), [0, 0, 0]
    with Progress(console=console) as bar:
        task = bar.add_task("importing", total=len(files))
        for f in files:
            try:
                r = ingest_file(store, f, source=str(f), follow_links=True)
            except ValueError as exc:
                _fail(str(exc))
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


@traces_app.command("purge-quarantine")
def traces_purge_quarantine(older_than: float = typer.Option(..., "--older-than", help="days; 0 forgets them all"),
                            as_json: bool = typer.Option(False, "--json")) -> None:
    """Forget quarantined lines kept longer than --older-than days (they hold private trace text)."""
    if older_than < 0:
        _fail(f"--older-than must be 0 or more days, got {older_than}")
    purged = _store().purge_quarantine(time.time() - older_than * 86400)
    if as_json:
        _print_json({"purged": purged})
        return
    console.print(f"forgot {purged} quarantined line(s) older than {older_than:g} day(s)")


@traces_app.command("export")
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
    lines = [json.dumps(chat, ensure_ascii=False) for chat in _store().chats(domain, split)]
    text = "".join(line + "\n" for line in lines)
    if output:
        from conch_dna.system.fsutil import atomic_write_text

        atomic_write_text(output, text)
        console.print(f"{len(lines)} traces written to {output}")
    else:
        typer.echo(text, nl=False)


@cache_app.command("export")
def teacher_cache_export(output: Path = typer.Argument(..., help="the bundle to write, e.g. targets.tar"),
                         as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Write this home's teacher targets and answers as one bundle, for `conch teacher-cache import`."""
    from conch_dna.system.home import TEACHER_CACHE_DIR
    from conch_dna.traces.bundle import export_bundle
    from conch_dna.training.teacher import TeacherCache

    home, config = _home_and_config()
    summary = export_bundle(TeacherCache(home / TEACHER_CACHE_DIR), output, config.teacher)
    if as_json:
        _print_json({"bundle": str(output), "teacher": config.teacher, **summary.as_dict()})
    else:
        console.print(f"{summary.targets} targets, {summary.hidden} hidden states and {summary.answers} answers "
                      f"of teacher {config.teacher} written to {output}")


@cache_app.command("import")
def teacher_cache_import(bundle: Path = typer.Argument(..., help="a bundle from `conch teacher-cache export`"),
                         as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Add a bundle's teacher targets and answers to this home's cache (those it has are kept)."""
    from conch_dna.system.home import TEACHER_CACHE_DIR
    from conch_dna.traces.bundle import BundleError, import_bundle
    from conch_dna.training.teacher import TeacherCache

    home, config = _home_and_config()
    try:
        summary = import_bundle(TeacherCache(home / TEACHER_CACHE_DIR), bundle, config.teacher)
    except BundleError as exc:
        _fail(str(exc))
    if as_json:
        _print_json({"bundle": str(bundle), **summary.as_dict()})
        return
    console.print(f"{summary.targets} targets, {summary.hidden} hidden states and {summary.answers} answers "
                  f"imported, {summary.skipped} already here")
    for line in summary.rejected:
        console.print(f"[yellow]not taken:[/yellow] {line}", soft_wrap=True)


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
        _fail(str(exc))
    raise typer.Exit(run_demo(home, console, real_setup() if real else kit_setup()))


@kd_app.command("status")
def kd_status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Per domain: traces against the threshold, current version and its metrics, the last run."""
    from conch_dna.lifecycle.status import kd_status_data, metric_cells

    home, config = _home_and_config()
    data = kd_status_data(home, config)
    if as_json:
        _print_json(data)
        return
    table = Table(title=f"conch kd status ({home})")
    for col in ("domain", "train", "held-out", "new / threshold", "version", "held-out KL", "on-policy KL", "top-1",
                "tool calls right (parse)", "last run"):
        table.add_column(col, no_wrap=col in ("domain", "version"))
    for d in data["domains"]:
        last = d["last_run"]
        table.add_row(d["domain"], str(d["train"]), str(d["heldout"]), f"{d['new']} / {d['threshold']}",
                      d["version"], *metric_cells(d["metrics"]),
                      f"{last['status']}: {last['reason'] or ''}"[:60] if last else "-")
    console.print(table)
    for d in data["domains"]:
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


@kd_app.command("retrain")
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

    from daemon.service import request_retrain

    home, config = _home_and_config()
    domain = _checked_domain(domain, config)
    if iters is not None and iters < 1:
        _fail(f"--iters must be at least 1, got {iters}")
    config = config.with_iters(domain, iters)
    parallel = config.distributed
    if hosts or ranks:
        if hosts and not hosts.is_file():
            _fail(f"no host file {hosts}")
        parallel = parallel.model_copy(update={"hostfile": str(hosts) if hosts else None, "local_ranks": ranks or 0})
    if parallel.enabled and not read_state(home):
        status, reason = _retrain_in_parallel(home, domain, iters, force, parallel)
    elif read_state(home):
        import json as _json

        answer = request_retrain(home, domain, iters, force)
        console.print(f"asked the running daemon to retrain {domain}; waiting for it")
        while not answer.exists():
            if not read_state(home):
                _fail("the daemon stopped before answering")
            time.sleep(0.5)
        result = _json.loads(answer.read_text())
        answer.unlink(missing_ok=True)
        status, reason = result.get("status", result.get("event")), result.get("reason", "")
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


def _retrain_in_parallel(home: Path, domain: str, iters, force: bool, parallel) -> tuple[str, str]:
    """The worker under mlx.launch, one rank per process; rank 0's progress and result as it goes."""
    import json as _json
    import os
    import signal
    import subprocess

    from daemon.service import worker_command

    cmd = worker_command(domain, iters, force, parallel)
    where = f"the hosts of {parallel.hostfile}" if parallel.hostfile else f"{parallel.local_ranks} processes here"
    console.print(f"retraining {domain} data-parallel over {where} ({parallel.backend})")
    started = time.time()
    # a session of its own, so that Ctrl-C here becomes one SIGTERM to the launcher, which passes it on
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "CONCH_HOME": str(home)},
                            start_new_session=True)
    result = {"status": "failed", "reason": "the ranks exited without a result"}
    lines = iter(proc.stdout)
    while True:
        try:
            line = next(lines, None)
        except KeyboardInterrupt:
            console.print("  stopping: the ranks checkpoint, and the next retrain resumes")
            proc.send_signal(signal.SIGTERM)
            continue
        if line is None:
            break
        try:
            event = _json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "stage":
            console.print(f"  {event['text']}", soft_wrap=True, markup=False)
        elif event.get("event") == "progress":
            console.print(f"  step {event['iteration']}: loss {event['combined']:.4f}, "
                          f"{event['tokens_per_second']:.0f} tokens/s")
        elif event.get("event") == "result":
            result = event
    code = proc.wait()
    if "event" not in result:  # rank 0 ended without a word (a rank that hung): its run record says why
        latest = next(iter(_store().runs(domain, 1)), None)
        if latest is not None and latest.started_at >= started:
            result = {"status": str(latest.status), "reason": latest.reason}
    if code and result.get("status") != "failed":
        result = {"status": "failed", "reason": f"a rank exited with status {code}"}
    return str(result.get("status")), result.get("reason") or ""


@kd_app.command("history")
def kd_history(domain: str = typer.Option(...), as_json: bool = typer.Option(False, "--json"),
               limit: int = typer.Option(20)) -> None:
    """The domain's training runs, newest first, with their decisions and reasons."""
    home, config = _home_and_config()
    runs = _store().runs(_checked_domain(domain, config), limit)
    if as_json:
        _print_json([r.as_dict() for r in runs])
        return
    table = Table(title=f"{domain}: training runs")
    for col in ("run", "started", "status", "version", "KL current -> candidate", "on-policy KL",
                "tool calls right (parse)", "samples", "reason"):
        table.add_column(col, no_wrap=col in ("run", "status", "version"))
    for r in runs:
        table.add_row(str(r.id), time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at)),
                      str(r.status), r.version or "-", r.kl_change(), r.kl_change(on_policy=True), r.tool_change(),
                      str(r.samples_generated) if r.samples_generated is not None else "-", r.reason or "")
    console.print(table)


@kd_app.command("report")
def kd_report(output: Path = typer.Option(None, "--output", "-o", help="folder (default: $CONCH_HOME/report)")) -> None:
    """Write a self-contained HTML report with loss curves, metrics per version and decisions."""
    from conch_dna.lifecycle.report import build_report

    home, config = _home_and_config()
    console.print(f"report: {build_report(home, config, output)}")


@kd_app.command("rollback")
def kd_rollback(domain: str = typer.Option(...), to: str = typer.Option(None, help="version, e.g. v0002")) -> None:
    """Make an earlier version current again (default: the previous one)."""
    from conch_dna.models.versions import rollback

    home, config = _home_and_config()
    try:
        version = rollback(home, _checked_domain(domain, config), to)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: DomainBusy, a retrain of it is running
        _fail(str(exc))
    console.print(f"{domain}: {version} is current again")


@kd_app.command("pin")
def kd_pin(domain: str = typer.Option(...), version: str = typer.Option(..., help="e.g. v0002"),
           unpin: bool = typer.Option(False, "--unpin", help="let pruning delete it again")) -> None:
    """Keep a version however many newer ones come (only the newest keep_versions are kept)."""
    from conch_dna.models.versions import pin

    home, config = _home_and_config()
    try:
        pinned = pin(home, _checked_domain(domain, config), version, pinned=not unpin)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: DomainBusy, a retrain of it is running
        _fail(str(exc))
    console.print(f"{domain}: pinned: {', '.join(pinned) or 'none'}")


@daemon_app.command("run")
def daemon_run() -> None:
    """Run the daemon in the foreground until SIGTERM / Ctrl-C (with `serve = true`, the API too)."""
    from daemon.service import run_forever

    home, config = _home_and_config()
    try:
        code = run_forever(home, companion=_api_server(home) if config.serve else None)
    except RuntimeError as exc:  # another daemon holds the lock, or the API cannot start
        _fail(str(exc))
    raise typer.Exit(code)


def _api_server(home: Path):
    """What the daemon starts once it holds its lock: `conch serve` on a thread; returns its stop."""

    def start():
        from conch_dna.server.app import Server

        server = Server(home).start()
        print(f"conch serve: the OpenAI API on {server.url}", flush=True)
        return server.stop

    return start


@app.command("serve")
def serve(host: str = typer.Option(None, help="address to listen on (default: [server] host, 127.0.0.1)"),
          port: int = typer.Option(None, help="port (default: [server] port, 8321)")) -> None:
    """The neurons and the EGO behind an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models)."""
    import logging

    from conch_dna.server.app import ServeError, Server

    home, _ = _home_and_config()
    # each request's model, version, finish reason and token count; never its messages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = Server(home, host=host, port=port)
    except ServeError as exc:
        _fail(str(exc))
    server.run(ready=lambda url: console.print(f"conch serve: {url} (model = a domain, domain@vNNNN or "
                                                f"ego/<domain>); Ctrl-C stops it"))


@daemon_app.command("status")
def daemon_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Whether the daemon runs, its pid, and what it is doing."""
    from conch_dna.lifecycle.status import read_state

    home, _ = _home_and_config()
    state = read_state(home)
    if as_json:
        _print_json({"running": state is not None, **(state or {})})
    elif state:
        doing = f"training {state['running']['domain']}" if state.get("running") else "idle"
        console.print(f"daemon running (pid {state['pid']}), {doing}")
    else:
        console.print("daemon not running")


@daemon_app.command("install")
def daemon_install() -> None:
    """Install and start the service: launchd on macOS, a systemd user unit on Linux."""
    from daemon.launchd import install

    home, _ = _home_and_config()
    console.print(install(home))


@daemon_app.command("uninstall")
def daemon_uninstall() -> None:
    """Stop and remove the service."""
    from daemon.launchd import uninstall

    console.print(uninstall())



@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Check this machine: MLX backend, BLAS speed, memory, models, disk, daemon, serving; hints for problems."""
    from conch_dna.lifecycle.doctor import run_checks
    from conch_dna.lifecycle.status import read_state

    home, config = _home_and_config()
    checks = run_checks(home, config, read_state(home))
    if as_json:
        _print_json({"home": str(home), "ok": all(c.ok for c in checks),
                     "checks": {c.name: c.as_dict() for c in checks}})
        return
    table = Table(title=f"conch doctor ({home})")
    for col in ("check", "", "value", "hint"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[yellow]![/yellow]", c.value, c.hint or "")
    console.print(table)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The models on this machine: Ollama's, LM Studio's, the Hugging Face cache's and conch's imports."""
    from conch_dna.models.local import list_models

    home, _ = _home_and_config()
    models = list_models(home)
    if as_json:
        _print_json([m.as_dict() for m in models])
        return
    table = Table(title="models on this machine")
    for col in ("name", "kind", "architecture", "size", "quantization", "conch can use it"):
        table.add_column(col, no_wrap=col == "name")
    for m in models:
        use = ("yes: import it" if m.kind == "gguf" else "yes") if m.usable else f"no: {m.reason}"
        table.add_row(m.name, m.kind, m.architecture or "-", f"{m.size_bytes / 2**30:.2f} GiB", m.quantization or "-",
                      use)
    console.print(table)
    if not models:
        console.print("none found in Ollama's store, LM Studio's folder, the Hugging Face cache or "
                      f"{home / 'models'}")


@models_app.command("import")
def models_import(source: str = typer.Argument(..., help="a .gguf file, ollama:NAME[:TAG], lmstudio:PUBLISHER/REPO"
                                                         "[/FILE], or hf:ORG/NAME/FILE.gguf"),
                  output: Path = typer.Option(None, "--output", "-o",
                                              help="the model directory to write (default: $CONCH_HOME/models/<name>)"),
                  dtype: str = typer.Option("float16", help="float32, float16, bfloat16, q8 or q4 (MLX quantized)"),
                  rest_dtype: str = typer.Option(None, help="with q8/q4: float16 or float32 for the scales and the "
                                                            "unquantized tensors (default: float16 on a GPU, else "
                                                            "float32)")) -> None:
    """Turn a GGUF model into an mlx-lm model directory that `mlx_lm.load` and config.toml accept."""
    import re

    from conch_dna.models.gguf.importer import GGUFImportError, import_gguf
    from conch_dna.models.local import ModelNotFound, resolve

    home, _ = _home_and_config()
    try:
        path = resolve(source)
    except ModelNotFound as exc:
        _fail(str(exc))
    if path.is_dir():
        _fail(f"{source} is already an mlx-lm directory ({path}): name it in config.toml as it is")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split(":", 1)[-1]).strip("-.")
    if output is None and not name:
        _fail(f"cannot name a model folder after {source!r}: give one with --output")
    out = output or home / "models" / name
    try:
        with console.status(f"importing {source} ({path.stat().st_size / 2**30:.2f} GiB) as {dtype}"):
            out = import_gguf(path, out, dtype, rest_dtype)
    except (GGUFImportError, FileNotFoundError, FileExistsError) as exc:
        _fail(str(exc))
    console.print(f"{out}: load it with mlx_lm.load({str(out)!r}) or name it in config.toml")


@models_app.command("pair")
def models_pair(teacher: str = typer.Argument(None, help="with STUDENT: check that the two share token ids"),
                student: str = typer.Argument(None),
                output: Path = typer.Option(None, "--output", "-o",
                                            help="without models: folder for teacher/ and student/ (default: "
                                                 "$CONCH_HOME/models/smollm2)"),
                student_layers: int = typer.Option(None, help="blocks the student keeps of the teacher's 30")) -> None:
    """Check that TEACHER and STUDENT pair (they share token ids, the rule the distiller applies); without
    them, build the real pair: SmolLM2-135M-Instruct (from the PyPI wheel's GGUF) and a shallower student."""
    if teacher or student:
        from conch_dna.models.local import ModelNotFound, pair_check

        if not (teacher and student):
            _fail("give both a TEACHER and a STUDENT (or neither, to build the real pair)")
        try:
            ok, words = pair_check(teacher, student)
        except (ModelNotFound, OSError, ValueError) as exc:
            _fail(str(exc))
        console.print(f"{teacher} -> {student}: {words}", soft_wrap=True, markup=False)
        raise typer.Exit(0 if ok else 1)
    from conch_dna.models.realpair import STUDENT_LAYERS, PairBuildError, build_pair
    from conch_dna.system.home import conch_home

    out = output or conch_home() / "models" / "smollm2"
    try:
        with console.status("building the SmolLM2 teacher and student (downloads ~93 MB once)"):
            teacher, student = build_pair(out, student_layers or STUDENT_LAYERS)
    except (PairBuildError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"teacher: {teacher}\nstudent: {student}\nin config.toml:\n"
                  f'  teacher = "{teacher}"\n  student = "{student}"')


if __name__ == "__main__":
    app()
