"""Serving many calls at once: aggregate tokens/s and time to first token, batched against serial.

    python bench/serve.py                 # the kit's student
    python bench/serve.py --pair          # the real pair's student (SmolLM2-135M cut), built if needed

Six domains each get a promoted adapter (random LoRA weights; end-of-sequence is suppressed, so
every answer runs to max_tokens and both servers do the same work). At
concurrency 1, 4, 8 and 16, that many agent threads call back to back, all on one domain or spread
over the six, against
  - serial: the registry as it was before batching, re-created here: one MLX thread that serves one
    call at a time, binding the call's adapter into the LoRA layers, then mlx_lm.stream_generate;
  - batched: neurons.NeuronRegistry, continuous batching with a per-row adapter.
Both run in this one process, one after the other, on the same machine state. Time to first token
is measured by the caller: from the call to its first text chunk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from conch_dna.kit import STUDENT_PATH
from conch_dna.models.adapters import adapter_weights, apply_lora
from conch_dna.models.loading import load_model
from conch_dna.models.versions import promote
from conch_dna.system.mlx_thread import MLXThread

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors
from safetensors.numpy import load_file
from swap import write_candidate

from neurons import NeuronRegistry

DOMAINS = ["thinking", "task", "action", "reflection", "debug", "memory"]
PROMPTS = ["Plan how to send the email.", "Why does ice float?", "List three prime numbers.",
           "Explain recursion briefly.", "What went wrong in the last run?", "Remember the user's name."]
LORA_LAYERS, LORA_RANK = 16, 8


class SerialRegistry:
    """The registry before batching: one call at a time, its adapter bound into the model per call."""

    def __init__(self, student: str, versions: dict[str, Path], no_eos: list):
        self.no_eos = no_eos
        self.mlx = MLXThread("serial")
        self.mlx.call(self._load, student, versions)

    def _load(self, student, versions):
        self.model, self.tokenizer = load_model(student)
        apply_lora(self.model, LORA_LAYERS, LORA_RANK, 20.0, 0.0)
        self.model.eval()
        self.weights = {d: {k: mx.array(v) for k, v in load_file(str(p / "adapters.safetensors")).items()}
                        for d, p in versions.items()}

    def stream(self, domain: str, prompt: str, max_tokens: int):
        chunks, generated = [], [0]
        done = threading.Event()

        def serve():
            self.model.load_weights(list(self.weights[domain].items()), strict=False)
            tokens = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True)
            for r in stream_generate(self.model, self.tokenizer, tokens, max_tokens=max_tokens,
                                     logits_processors=self.no_eos):
                chunks.append((time.perf_counter(), r.text))
                generated[0] = r.generation_tokens
            done.set()

        self.mlx.submit(serve)
        done.wait()
        return chunks, generated[0]

    def close(self):
        self.mlx.close()


def batched_stream(registry: NeuronRegistry, no_eos: list):
    def stream(domain: str, prompt: str, max_tokens: int):
        call = registry.get(domain).submit([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                           logits_processors=no_eos)
        chunks = [(time.perf_counter(), text) for text in call]
        return chunks, call.completion_tokens
    return stream


def run_load(stream, concurrency: int, mixed: bool, calls_each: int, max_tokens: int) -> dict:
    """`concurrency` threads, each making `calls_each` calls back to back: tokens/s and TTFT."""
    ttfts, tokens = [], []

    def agent(i: int):
        for j in range(calls_each):
            domain = DOMAINS[(i + j) % len(DOMAINS)] if mixed else "task"
            tic = time.perf_counter()
            chunks, n = stream(domain, PROMPTS[(i + j) % len(PROMPTS)], max_tokens)
            first = next((t for t, text in chunks if text), chunks[-1][0] if chunks else time.perf_counter())
            ttfts.append(first - tic)
            tokens.append(n)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(concurrency)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else [ttfts[0]] * 99
    return {"tokens_per_s": sum(tokens) / wall, "ttft_p50": q[49], "ttft_p99": q[98]}


def setup_home(tmp: Path, student: str, max_batch: int) -> tuple[Path, dict[str, Path]]:
    home = tmp / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'student = "{student}"\n[kd]\nlora_layers = {LORA_LAYERS}\n'
                                      f"lora_rank = {LORA_RANK}\n[neurons]\nmax_batch_size = {max_batch}\n")
    model, _ = load_model(student)
    config = {"model": student, **apply_lora(model, LORA_LAYERS, LORA_RANK, 20.0, 0.0)}
    shapes = {k: tuple(v.shape) for k, v in adapter_weights(model).items()}
    versions = {}
    for i, domain in enumerate(DOMAINS):
        candidate = write_candidate(tmp / f"candidate-{domain}", shapes, i, config)
        version = promote(home, domain, candidate, "bench")
        versions[domain] = home / "adapters_kd" / domain / version
    return home, versions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default=STUDENT_PATH)
    p.add_argument("--pair", action="store_true", help="use the real pair's student (built under --pair-dir)")
    p.add_argument("--pair-dir", default=str(Path(".cache") / "pair"))
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--calls-each", type=int, default=3, help="calls each agent thread makes")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of every call")
    args = p.parse_args()
    student = args.student
    if args.pair:
        from conch_dna.models.realpair import build_pair

        student = str(build_pair(args.pair_dir, cache_dir=Path(".cache") / "downloads")[1])
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        home, versions = setup_home(Path(tmp), student, max(levels))
        registry = NeuronRegistry(home, watch=False)
        # every answer runs to max_tokens, so both servers do the same work
        no_eos = make_logits_processors(logit_bias={t: -1e9 for t in registry.tokenizer.eos_token_ids})
        servers = {"serial": SerialRegistry(student, versions, no_eos), "batched": registry}
        streams = {"serial": servers["serial"].stream, "batched": batched_stream(registry, no_eos)}
        for stream in streams.values():  # warm both up under load first
            run_load(stream, 4, True, 1, args.tokens)
        print(f"student {student}; {args.tokens} tokens a call, {args.calls_each} calls per agent thread\n")
        print("| server | domains | concurrency | tokens/s | vs serial c=1 | TTFT p50 | TTFT p99 |")
        print("|---|---|---:|---:|---:|---:|---:|")
        base = None
        results = {}
        for mixed in (False, True):
            for c in levels:
                for name, stream in streams.items():
                    r = run_load(stream, c, mixed, args.calls_each, args.tokens)
                    results[(name, mixed, c)] = r
                    base = base or r["tokens_per_s"]
                    print(f"| {name} | {'six mixed' if mixed else 'one'} | {c} | {r['tokens_per_s']:.1f} | "
                          f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50'] * 1000:.0f} ms | "
                          f"{r['ttft_p99'] * 1000:.0f} ms |", flush=True)
        print()
        first = results[("batched", False, levels[0])]["tokens_per_s"]
        for c in levels:
            one, six = results[("batched", False, c)], results[("batched", True, c)]
            print(f"batched, concurrency {c}: {one['tokens_per_s'] / first:.2f}x "
                  f"the tokens/s of concurrency {levels[0]}; six mixed domains cost "
                  f"{1 - six['tokens_per_s'] / one['tokens_per_s']:+.1%} against one")
        print(f"\nregistry: {registry.stats()}")
        for server in servers.values():
            server.close()


if __name__ == "__main__":
    main()
