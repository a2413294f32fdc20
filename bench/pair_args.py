"""The arguments the distillation benches share: which teacher and student (the kit, a real pair's folder, or
the real pair built under $CONCH_HOME/models/smollm2), which domains, how many of their seed prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH


def add_model_args(p: argparse.ArgumentParser, domains: str | None = "thinking,debug",
                   prompts: int | None = 64) -> None:
    """--teacher, --student, --pair-dir, --real; --domains and --prompts unless None."""
    p.add_argument("--teacher", default=TEACHER_PATH)
    p.add_argument("--student", default=STUDENT_PATH)
    p.add_argument("--pair-dir", help="the real pair's folder (teacher/, student/), e.g. from `conch models pair`")
    p.add_argument("--real", action="store_true",
                   help="the real pair (conch models pair), built under $CONCH_HOME/models/smollm2 if missing")
    if domains is not None:
        p.add_argument("--domains", default=domains)
    if prompts is not None:
        p.add_argument("--prompts", type=int, default=prompts, help="prompts per domain (then split train/held-out)")


def parse_model_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed arguments, --pair-dir or --real turned into --teacher and --student."""
    args = p.parse_args()
    if args.pair_dir:
        args.teacher, args.student = str(Path(args.pair_dir) / "teacher"), str(Path(args.pair_dir) / "student")
    elif args.real:
        from conch_dna.models.realpair import build_pair
        from conch_dna.system.home import conch_home

        args.teacher, args.student = (str(x) for x in build_pair(conch_home() / "models" / "smollm2"))
    return args
