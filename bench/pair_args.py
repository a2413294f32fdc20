"""The arguments the distillation benches share: which teacher and student (the kit, or a real
pair's folder), which domains, how many of their seed prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH


def add_model_args(p: argparse.ArgumentParser, domains: str = "thinking,debug") -> None:
    p.add_argument("--teacher", default=TEACHER_PATH)
    p.add_argument("--student", default=STUDENT_PATH)
    p.add_argument("--pair-dir", help="the real pair's folder (teacher/, student/), e.g. from `conch models pair`")
    p.add_argument("--domains", default=domains)
    p.add_argument("--prompts", type=int, default=64, help="prompts per domain (then split train/held-out)")


def parse_model_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed arguments, --pair-dir turned into --teacher and --student."""
    args = p.parse_args()
    if args.pair_dir:
        args.teacher, args.student = str(Path(args.pair_dir) / "teacher"), str(Path(args.pair_dir) / "student")
    return args
