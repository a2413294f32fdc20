"""`conch teacher-cache`: the teacher's targets as a bundle for another machine, and back."""

from __future__ import annotations

from pathlib import Path

from conch_dna.cli.common import GROUPS, console, fail, home_and_config, print_json

import typer

app = typer.Typer(help=GROUPS["teacher-cache"][1], no_args_is_help=True)


@app.command("export")
def teacher_cache_export(output: Path = typer.Argument(..., help="the bundle to write, e.g. targets.tar"),
                         as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Write this home's teacher targets and answers as one bundle, for `conch teacher-cache import`."""
    from conch_dna.system.home import TEACHER_CACHE_DIR
    from conch_dna.traces.bundle import export_bundle
    from conch_dna.training.targets.teacher import TeacherCache

    home, config = home_and_config()
    summary = export_bundle(TeacherCache(home / TEACHER_CACHE_DIR), output, config.teacher)
    if as_json:
        print_json({"bundle": str(output), "teacher": config.teacher, **summary.as_dict()})
    else:
        console.print(f"{summary.targets} targets, {summary.hidden} hidden states and {summary.answers} answers "
                      f"of teacher {config.teacher} written to {output}")


@app.command("import")
def teacher_cache_import(bundle: Path = typer.Argument(..., help="a bundle from `conch teacher-cache export`"),
                         as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Add a bundle's teacher targets and answers to this home's cache (those it has are kept)."""
    from conch_dna.system.home import TEACHER_CACHE_DIR
    from conch_dna.traces.bundle import BundleError, import_bundle
    from conch_dna.training.targets.teacher import TeacherCache

    home, config = home_and_config()
    try:
        summary = import_bundle(TeacherCache(home / TEACHER_CACHE_DIR), bundle, config.teacher)
    except BundleError as exc:
        fail(str(exc))
    if as_json:
        print_json({"bundle": str(bundle), **summary.as_dict()})
        return
    console.print(f"{summary.targets} targets, {summary.hidden} hidden states and {summary.answers} answers "
                  f"imported, {summary.skipped} already here")
    for line in summary.rejected:
        console.print(f"[yellow]not taken:[/yellow] {line}", soft_wrap=True)
