"""What share of EGO traces keep their captured top-k, and what share need a teacher pass at retrain.

The EGO (the teacher) answers prompts of every domain and records each answer with the top-k
log-probs of every generated token. A retrain re-tokenises the stored chat: the capture is used
when its rows hold the answer's tokens (a byte-level BPE can tokenise decoded text differently
from the ids that were generated), else the teacher scores the chat again.

    python bench/capture_share.py --real --prompts 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.models.loading import tokenizer_fingerprint
from conch_dna.settings.config import load_config
from conch_dna.system.domains import DOMAINS
from conch_dna.traces.ego import Ego
from conch_dna.traces.store import TraceStore
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer
from conch_dna.training.true_kd import to_messages

from pair_args import add_model_args, parse_model_args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, domains=None, prompts=8)
    p.add_argument("--max-tokens", type=int, default=64, help="the EGO's answer budget")
    args = parse_model_args(p)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text(f'teacher = "{args.teacher}"\nstudent = "{args.student}"\n')
        ego = Ego(home=home, max_tokens=args.max_tokens)
        tic = time.perf_counter()
        for domain in DOMAINS:
            for prompt in DOMAIN_PROMPTS[domain]["examples"][: args.prompts]:
                ego.generate(domain, to_messages(domain, prompt))
        ego_seconds = time.perf_counter() - tic
        tokenizer = ego.tokenizer
        ego.close()
        store = TraceStore.for_home(home, load_config(home))
        traces = [t for d in DOMAINS for split in ("train", "heldout") for t in store.traces_of(d, split)]
        scorer = TeacherScorer(args.teacher, TeacherCache(Path(tmp) / "cache"), 64, len(tokenizer))
        fingerprint, kept, cut = tokenizer_fingerprint(tokenizer), 0, 0
        for trace in traces:
            passes = scorer.forward_passes
            example = scorer.example(trace["messages"], tokenizer, trace["topk"], fingerprint)
            if scorer.forward_passes == passes:
                kept += 1
                cut += len(example.answer_tokens) == len(trace["topk"]["token_ids"]) and \
                    example.answer_tokens[-1] not in tokenizer.eos_token_ids
    n = len(traces)
    print(f"teacher {args.teacher}: {n} EGO traces ({args.prompts} prompts x {len(DOMAINS)} domains, "
          f"answers <= {args.max_tokens} tokens, {ego_seconds:.0f}s)")
    print(f"captured top-k used: {kept}/{n} = {kept / n:.1%} ({cut} of them cut short by max_tokens, "
          f"trained on the captured prefix); teacher pass needed: {n - kept}/{n} = {(n - kept) / n:.1%}")


if __name__ == "__main__":
    main()
