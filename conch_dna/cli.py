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
