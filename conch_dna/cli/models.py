"""`conch models`: the models on this machine, importing a GGUF, checking or building a pair."""

from __future__ import annotations

from pathlib import Path

from conch_dna.cli.common import GROUPS, console, fail, home_and_config, print_json

import typer
from rich.table import Table

app = typer.Typer(help=GROUPS["models"][1], no_args_is_help=True)


@app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The models on this machine: Ollama's, LM Studio's, the Hugging Face cache's and conch's imports."""
    from conch_dna.models.local import list_models

    home, _ = home_and_config()
    models = list_models(home)
    if as_json:
        print_json([m.as_dict() for m in models])
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


@app.command("import")
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

    home, _ = home_and_config()
    try:
        path = resolve(source)
    except ModelNotFound as exc:
        fail(str(exc))
    if path.is_dir():
        fail(f"{source} is already an mlx-lm directory ({path}): name it in config.toml as it is")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split(":", 1)[-1]).strip("-.")
    if output is None and not name:
        fail(f"cannot name a model folder after {source!r}: give one with --output")
    out = output or home / "models" / name
    try:
        with console.status(f"importing {source} ({path.stat().st_size / 2**30:.2f} GiB) as {dtype}"):
            out = import_gguf(path, out, dtype, rest_dtype)
    except (GGUFImportError, FileNotFoundError, FileExistsError) as exc:
        fail(str(exc))
    console.print(f"{out}: load it with mlx_lm.load({str(out)!r}) or name it in config.toml")


@app.command("pair")
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
            fail("give both a TEACHER and a STUDENT (or neither, to build the real pair)")
        try:
            ok, words = pair_check(teacher, student)
        except (ModelNotFound, OSError, ValueError) as exc:
            fail(str(exc))
        console.print(f"{teacher} -> {student}: {words}", soft_wrap=True, markup=False)
        raise typer.Exit(0 if ok else 1)
    from conch_dna.models.realpair import STUDENT_LAYERS, PairBuildError, build_pair
    from conch_dna.system.home import conch_home

    out = output or conch_home() / "models" / "smollm2"
    try:
        with console.status("building the SmolLM2 teacher and student (downloads ~93 MB once)"):
            teacher, student = build_pair(out, student_layers or STUDENT_LAYERS)
    except (PairBuildError, ValueError) as exc:
        fail(str(exc))
    console.print(f"teacher: {teacher}\nstudent: {student}\nin config.toml:\n"
                  f'  teacher = "{teacher}"\n  student = "{student}"')


if __name__ == "__main__":
    app()
