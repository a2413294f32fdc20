"""Hot-swap latency, the cost of serving one call through the registry, and memory per extra domain.

    python bench/swap.py [--versions 30] [--calls 20] [--tokens 32]

1. Promotes N versions of a domain (another thread writes them as `conch` would) while the
   registry runs: time from the manifest switch to the version being what the next call gets.
2. Median time of a 32-token greedy answer through neurons (queue to the MLX thread, the batch
   engine, the adapter gathered per row) against mlx_lm.generate on a model loaded once with that
   one adapter fixed: the ratio. (Many calls at once: bench/serve.py.)
3. Bytes of one domain's adapter weights against a second full copy of the student.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from conch_dna.kit import STUDENT_PATH
from conch_dna.models.versions import promote

import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import generate, load
from safetensors.numpy import save_file

from neurons import NeuronRegistry

PROMPT = "Plan how to send the email."


def write_candidate(path: Path, shapes: dict, seed: int, adapter_config: dict) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    weights = {k: (rng.standard_normal(s) * (0.05 if k.endswith("lora_b") else 0.3)).astype(np.float32)
               for k, s in shapes.items()}
    save_file(weights, str(path / "adapters.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default=STUDENT_PATH)
    p.add_argument("--versions", type=int, default=30)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text(f'student = "{args.student}"\n[kd]\nlora_layers = 16\nlora_rank = 16\n')
        registry = NeuronRegistry(home, poll_seconds=0.5)
        layers = len(registry.model.layers)
        adapter_config = {"model": args.student, "fine_tune_type": "lora", "num_layers": min(16, layers),
                          "lora_parameters": {"rank": 16, "scale": 20.0, "dropout": 0.0}}

        lags = []
        for i in range(args.versions):
            cand = write_candidate(Path(tmp) / f"c{i}", registry.shapes, i, adapter_config)
            version = promote(home, "task", cand, f"bench {i}")
            tic = time.perf_counter()
            while registry.next_version("task") != version:
                time.sleep(0.001)
            lags.append(time.perf_counter() - tic)
        q = statistics.quantiles(lags, n=100)
        print(f"swap latency, manifest switch -> next call serves it ({args.versions} versions): "
              f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms")

        neuron = registry.get("task")
        version_dir = home / "adapters_kd" / "task" / version
        fixed, tokenizer = load(args.student, adapter_path=str(version_dir))
        chat = [{"role": "user", "content": PROMPT}]  # the same prompt both ways: no system prompt
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        bound_out = neuron.generate(chat, max_tokens=args.tokens)
        fixed_out = generate(fixed, tokenizer, prompt, max_tokens=args.tokens)
        assert bound_out == fixed_out, (bound_out, fixed_out)
        n_tokens = len(tokenizer.encode(fixed_out))
        bound, plain = [], []
        for _ in range(args.calls):  # interleaved, so both see the same machine state
            tic = time.perf_counter()
            neuron.generate(chat, max_tokens=args.tokens)
            bound.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            generate(fixed, tokenizer, prompt, max_tokens=args.tokens)
            plain.append(time.perf_counter() - tic)
        b, f = statistics.median(bound), statistics.median(plain)
        print(f"answer of {n_tokens} tokens (max {args.tokens}), median of {args.calls}: neurons (one call alone) "
              f"{b * 1000:.1f} ms, one fixed adapter {f * 1000:.1f} ms, ratio {b / f:.3f} (target <= 1.05)")

        adapter_bytes = sum(np.prod(s) * 4 for s in registry.shapes.values())
        model_bytes = sum(v.nbytes for _, v in tree_flatten(fixed.parameters()))
        print(f"memory per extra domain: {adapter_bytes / 1e6:.3f} MB of adapter weights vs "
              f"{model_bytes / 1e6:.3f} MB for a second copy of the student ({adapter_bytes / model_bytes:.1%})")
        registry.close()


if __name__ == "__main__":
    main()
