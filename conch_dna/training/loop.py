"""The training loop: batches of KD examples through the step, checkpoints every steps_per_save, reports to
the callback, and a stop asked between steps (a checkpoint, then TrainingInterrupted). It knows nothing of
how the run was put together (the distiller does that)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from conch_dna.models.adapters import (
    load_optimizer_state,
    save_checkpoint,
)
from conch_dna.system import distributed
from conch_dna.training.callbacks import KDCallback
from conch_dna.training.data import KDExample, iterate_kd_batches
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.step import learning_rate_schedule, make_kd_step, multiplier_tree

import mlx.core as mx
import mlx.optimizers as optim


class TrainingInterrupted(Exception):
    """should_stop() said stop: the adapter so far was saved to `checkpoint` at `iteration`."""

    def __init__(self, iteration: int, checkpoint: Path | None):
        super().__init__(f"training interrupted at step {iteration}")
        self.iteration, self.checkpoint = iteration, checkpoint


def train_kd(model, examples: list[KDExample], config: KDConfig, adapter_config: dict,
             checkpoint_dir: Path | None = None, callbacks: KDCallback | None = None,
             resume: tuple[str | Path, int] | None = None, until: int | None = None) -> list[dict]:
    """The training loop: LoRA parameters of `model` learn the teacher targets of `examples`.

    Every steps_per_report a report dict (iteration, kd, ce, combined, tokens/s) goes to the
    history and to callbacks.on_train_report; every steps_per_save a checkpoint goes to
    checkpoint_<N>/. When callbacks.should_stop() turns true, a checkpoint is saved and
    TrainingInterrupted is raised.
    `resume` = (checkpoint dir, its step), with the checkpoint's weights already in `model`: the
    optimizer state, learning-rate schedule and batch order go on from there, so a resumed run
    ends where an uninterrupted one would (without LoRA dropout, whose masks differ).
    `until` < num_iters stops at that step with a checkpoint_<until> there (a round of on-policy
    training ends; the next resumes from it on more examples).
    """
    callbacks = callbacks or KDCallback()
    shapes = {e.hidden.shape[1:] for e in examples if e.hidden is not None} if config.hidden_weight > 0 else set()
    if len(shapes) > 1:
        raise ValueError(f"the examples' hidden states differ in shape (layers, width): {sorted(shapes)}")
    if config.hidden_weight > 0 and not shapes:
        callbacks.on_stage("", "no example carries the teacher's hidden states (a top-k captured from the EGO "
                               "has none): this run trains on the logit loss alone")
        config = replace(config, hidden_weight=0.0)
    hidden_shape = next(iter(shapes), None)
    world, leader = distributed.size(), distributed.is_leader()
    if world > 1 and config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world} ranks: make it a multiple")
    mx.random.seed(config.seed)
    optimizer = optim.Adam(learning_rate=learning_rate_schedule(config))
    if world > 1:
        optimizer.init(model.trainable_parameters())  # the same state tree on every rank, for the broadcast
    start = resume[1] if resume else 0
    if resume and not load_optimizer_state(optimizer, model, resume[0]):
        optimizer.state["step"] = mx.array(start, dtype=mx.uint64)  # at least the schedule goes on
    if world > 1:  # every rank from rank 0's weights and optimizer state (its current version or checkpoint)
        start = int(distributed.all_sum([start if leader else 0], "the step to start at")[0])
        model.update(distributed.broadcast_tree(model.trainable_parameters(), "rank 0's adapter"))
        optimizer.state = distributed.broadcast_tree(optimizer.state, "rank 0's optimizer state")
    in_force = None  # the multiplier patterns the compiled step was made with
    # every rank walks the same global batches (same seed), each collating its own rows of them
    batches = iterate_kd_batches(examples, config.batch_size, config.max_seq_length, config.seed, skip=start,
                                 hidden_shape=hidden_shape, shard=(distributed.rank(), world))

    model.train()
    history: list[dict] = []
    sums, n_steps, n_tokens, tic = [0.0, 0.0, 0.0], 0, 0, time.perf_counter()
    stop = min(until or config.num_iters, config.num_iters)
    for it in range(start + 1, stop + 1):
        if config.multipliers_at(it) != in_force:  # a new stage: its own step
            in_force = config.multipliers_at(it)
            step, state = make_kd_step(model, optimizer, config, multiplier_tree(model, in_force))
        batch = next(batches)
        with distributed.collective(f"training step {it}"):
            combined, kd, ce = step(*batch)
            mx.eval(state, combined, kd, ce)
        sums = [s + v.item() for s, v in zip(sums, (combined, kd, ce))]
        n_steps, n_tokens = n_steps + 1, n_tokens + int(batch[2].sum().item())
        if it % config.steps_per_report == 0 or it == stop:
            n_tokens = int(distributed.all_sum([n_tokens], "the tokens trained")[0])
            elapsed = time.perf_counter() - tic
            report = {"iteration": it, "combined": sums[0] / n_steps, "kd": sums[1] / n_steps,
                      "ce": sums[2] / n_steps, "tokens_per_second": n_tokens / elapsed}
            history.append(report)
            callbacks.on_train_report(report)
            sums, n_steps, n_tokens, tic = [0.0, 0.0, 0.0], 0, 0, time.perf_counter()
        path = checkpoint_dir / f"checkpoint_{it}" if checkpoint_dir and it != config.num_iters and leader else None
        due = it % config.steps_per_save == 0 or it == stop
        if path and due:
            save_checkpoint(path, model, optimizer, adapter_config)
        stopping = distributed.agree(callbacks.should_stop()) if world > 1 else callbacks.should_stop()
        if stopping and it != config.num_iters:
            if path and not due:
                save_checkpoint(path, model, optimizer, adapter_config)
            model.eval()
            raise TrainingInterrupted(it, path)
    model.eval()
    return history


