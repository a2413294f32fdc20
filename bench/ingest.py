"""Trace ingest throughput, against a plain sqlite-utils insert, and record() latency under training.

    python bench/ingest.py [--traces 100000] [--records 2000]

1. Writes N trace lines to a JSONL file, then ingests it as the inbox does (parse, validate,
   dedup, split, quarantine, one transaction) into a fresh TraceStore: traces per second.
2. Inserts the same JSONL with sqlite-utils' insert_all into a fresh database: the ratio.
3. Starts a real KD training on the tiny kit in another process and, while it trains, calls
   conch_dna.traces.ingest.record() from this one: p50 / p99 latency per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conch_dna.kit import corpus
from conch_dna.traces.ingest import ingest_file, record
from conch_dna.traces.store import TraceStore

import sqlite_utils

DOMAINS = list(corpus.GENERATORS)


def trace_lines(n: int) -> list[str]:
    out = []
    for i, chat in enumerate(corpus.dialogues(n, seed=11)):
        chat[1]["content"] += f" (case {i})"  # distinct prompts, as real traffic mostly is
        out.append(json.dumps({"domain": DOMAINS[i % len(DOMAINS)], "teacher": "tiny-teacher",
                               "messages": chat}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", type=int, default=100_000)
    p.add_argument("--records", type=int, default=2000)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "traces.jsonl"
        jsonl.write_text("\n".join(trace_lines(args.traces)) + "\n")
        size_mb = jsonl.stat().st_size / 1e6

        store = TraceStore(tmp / "conch.db")
        tic = time.perf_counter()
        report = ingest_file(store, jsonl)
        ours = time.perf_counter() - tic
        assert report.stored == args.traces, report

        db = sqlite_utils.Database(tmp / "plain.db")
        tic = time.perf_counter()
        with open(jsonl) as f:
            db["traces"].insert_all((json.loads(line) for line in f), batch_size=1000)
        plain = time.perf_counter() - tic

        print(f"{args.traces} traces, {size_mb:.1f} MB of JSONL")
        print(f"  conch ingest (validate, dedup, split, 1 transaction): {ours:6.2f}s = "
              f"{args.traces / ours:9,.0f} traces/s   (target >= 20,000/s)")
        print(f"  plain sqlite-utils insert_all of the same JSONL:        {plain:6.2f}s = "
              f"{args.traces / plain:9,.0f} traces/s")
        print(f"  ratio conch / plain throughput: {plain / ours:.2f}")

        out = tmp / "kd"
        trainer = subprocess.Popen(
            [sys.executable, "-m", "conch_dna.training.true_kd", "--kit", "--domain", "task",
             "--iters", "100000", "--output-dir", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 300
            # wait until the trainer is in its training loop (it writes checkpoints there)
            while time.monotonic() < deadline and not (out / "adapters_kd").exists():
                time.sleep(0.2)
            time.sleep(3)
            rstore = TraceStore(tmp / "record.db")
            latencies = []
            for i in range(args.records):
                msgs = [{"role": "user", "content": f"question {i}"},
                        {"role": "assistant", "content": f"answer {i}"}]
                tic = time.perf_counter()
                record("task", msgs, teacher="tiny-teacher", store=rstore)
                latencies.append(time.perf_counter() - tic)
            training = trainer.poll() is None
        finally:
            trainer.terminate()
            trainer.wait()
        q = statistics.quantiles(latencies, n=100)
        print(f"record() x {args.records} while a KD training runs in another process "
              f"(still training at the end: {training}):")
        print(f"  p50 {q[49] * 1000:.3f} ms   p99 {q[98] * 1000:.3f} ms   max {max(latencies) * 1000:.3f} ms"
              f"   (target p99 < 2 ms)")


if __name__ == "__main__":
    main()
