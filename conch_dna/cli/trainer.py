"""The plain trainer's command line: `python -m conch_dna.training.true_kd --domain thinking --iters 200`.

It distils the seed prompts of a domain (or of all of them) with TrueKnowledgeDistiller, outside
the daemon: no trace store, no gate, the adapter goes to <output-dir>/adapters_kd/<domain>.
Every KDConfig field is a flag, with KDConfig's default (see conch_dna.training.kd_config).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conch_dna.cli.progress import RichProgress
from conch_dna.models.chat import split_prompts
from conch_dna.models.loading import DEFAULT_STUDENT, DEFAULT_TEACHER, ModelLoadError
from conch_dna.models.realpair import PairBuildError
from conch_dna.settings.config import Config
from conch_dna.system import distributed
from conch_dna.system.domains import DOMAINS, UnknownDomainError, check_domain
from conch_dna.system.home import MODELS_DIR, conch_home
from conch_dna.training.callbacks import KDCallback
from conch_dna.training.kd_config import add_kd_flags, kd_config_from_flags
from conch_dna.training.true_kd import TrueKnowledgeDistiller

from rich.console import Console

HELDOUT_FRACTION = Config.model_fields["heldout_fraction"].default


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conch_dna.training.true_kd",
                                description="TRUE knowledge distillation into LoRA adapters.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--domain", help=f"one domain ({', '.join(DOMAINS)})")
    which.add_argument("--all", action="store_true", help="every domain")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher model id or path")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="student base model id or path")
    which_pair = p.add_mutually_exclusive_group()
    which_pair.add_argument("--kit", action="store_true",
                            help="use the project's tiny teacher and student (overrides --teacher/--student)")
    which_pair.add_argument("--real", action="store_true",
                            help="use SmolLM2-135M-Instruct and its 15-layer cut (`conch models pair`; built "
                                 "under $CONCH_HOME/models/smollm2 on first use)")
    p.add_argument("--heldout-fraction", type=float, default=HELDOUT_FRACTION,
                   help="share of prompts held out for validation (default: %(default)s)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where adapters_kd/ and teacher_cache/ go (default: $CONCH_HOME)")
    add_kd_flags(p)
    return p


def _models(args) -> tuple[str, str]:
    if args.kit:
        from conch_dna.kit import STUDENT_PATH, TEACHER_PATH

        return TEACHER_PATH, STUDENT_PATH
    if args.real:
        from conch_dna.models.realpair import build_pair

        return tuple(str(p) for p in build_pair(conch_home() / MODELS_DIR / "smollm2"))
    return args.teacher, args.student


def main(argv: list[str] | None = None) -> int:
    from conch_dna.kit.seeds import DOMAIN_PROMPTS

    args = parser().parse_args(argv)
    console = Console(stderr=True)
    progress = RichProgress(console)
    try:
        if not 0.0 <= args.heldout_fraction < 1.0:
            raise ValueError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
        teacher, student = _models(args)
        # under mlx.launch every rank trains; rank 0 alone shows the progress
        distiller = TrueKnowledgeDistiller(teacher, student, kd_config_from_flags(args), args.output_dir,
                                           callbacks=progress if distributed.is_leader() else KDCallback())
        if args.all:
            distiller.distill_all(heldout_fraction=args.heldout_fraction)
            console.print(f"summary: {distiller.output_dir / 'adapters_kd' / 'kd_summary.json'}")
        else:
            domain = check_domain(args.domain)
            train, held = split_prompts(DOMAIN_PROMPTS[domain]["examples"], args.heldout_fraction)
            distiller.distill_domain(domain, train, held)
    except (ValueError, UnknownDomainError, ModelLoadError, PairBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
