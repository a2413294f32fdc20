"""The neuron registry: one shared student base, per-domain LoRA versions, hot-swapped, served in batches.

How calls are served: MLX is not thread-safe (and its arrays belong to the thread that made them),
so the registry owns one MLX thread that loads the model and runs every call. Agent threads
submit calls and read their text back; on the MLX thread the calls decode together in one
continuously batched step, each row through its own version's adapter (neurons.batching,
neurons.multi_lora), so calls of different domains, or a pinned call beside a swapped one, share
every forward pass.

Hot-swap: a watchdog observer on $CONCH_HOME/adapters_kd, with a polling fallback, notices a
domain's manifest change. The new version's weights are read with numpy off the serving path and
checked against the model's LoRA parameters (names, shapes, dtype, finiteness) and the LoRA it was
trained with; a version that fails is refused, logged, and the old one keeps serving, as it does
through a broken manifest. A call runs entirely on the version that served its domain when it was
submitted; calls submitted after a swap get the new one. A version no call, pin or domain holds
any more is freed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conch_dna.models.adapters import apply_lora
from conch_dna.models.chat import prompt_tokens, to_chat
from conch_dna.models.loading import load_model, output_vocab_size
from conch_dna.models.structured import Grammars, StructureError
from conch_dna.models.tools import Answer, ToolError, tool_use
from conch_dna.models.versions import MANIFEST, ManifestError, current_version, domain_dir, is_version_name
from conch_dna.settings.config import load_config
from conch_dna.system.domains import check_domain
from conch_dna.system.fsutil import atomic_write_json, private_dir
from conch_dna.system.home import NEURONS_DIR, conch_home
from conch_dna.system.mlx_thread import MLXThread
from conch_dna.system.watching import stop_watching, watch

import numpy as np

from neurons.batching import BatchEngine, Call, EngineClosed
from neurons.deferral import Deferral
from neurons.multi_lora import Adapter, RowAdapters, lora_shapes

log = logging.getLogger("conch.neurons")
BASE = "base"
STATS_EVERY_S = 2.0  # how often a serving registry writes its figures for `conch doctor`
SAMPLING = ("sampler", "logits_processors", "temperature", "temp", "top_p", "top_k", "min_p", "stop", "logprobs")


class VersionRefused(ValueError):
    """A promoted version whose weights do not fit the serving model."""


class Neuron:
    """A domain's student: generate() / stream() / submit() on its current (or pinned) version."""

    def __init__(self, registry: NeuronRegistry, domain: str, pin: Adapter | None = None):
        self.registry = registry
        self.domain = domain
        self._pin = pin
        self.served_version: str | None = None  # the version the last call on this neuron ran on

    @property
    def version(self) -> str:
        """The version the next call runs on."""
        return self._pin.version if self._pin else self.registry.next_version(self.domain)

    def generate(self, prompt_or_messages, max_tokens: int = 128, tools: list[dict] | None = None,
                 tool_choice=None, response_format=None, defer: str | None = None, **sampling) -> Answer:
        """The student's answer (a str; its `tool_calls` and `content` read out of it). A string
        prompt gets the domain's system prompt, as in training (conch_dna.models.chat.to_messages); a list
        of chat messages (tool calls and results included) is used as it is. `tools`: OpenAI function
        tools, rendered by the model's chat template (conch_dna.models.chat); `tool_choice`: "auto",
        "none", "required" or {"type": "function", "function": {"name": ...}}. `sampling`:
        temperature (or temp), top_p, top_k, min_p, stop (strings), or mlx-lm's sampler and
        logits_processors; none of them means greedy decoding. logprobs=N (0 to 20) gives the
        call's token_logprobs with N alternatives (submit() returns the call). `response_format`: OpenAI's
        ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}) or a pydantic
        model class: the answer is held to it token by token (conch_dna.models.structured), so it parses
        unless it ran out of max_tokens (finish_reason "length"). `defer="auto"`: the answer is the student's
        where its version's acceptance rule takes it, else the home's EGO answers and its answer is recorded
        (neurons.deferral); `answer.answered_by` says who wrote it ("domain@vNNNN" or "ego")."""
        if defer not in (None, "auto"):
            raise ValueError(f'defer must be None or "auto", got {defer!r}')
        if defer:
            sampling["logprobs"] = sampling.get("logprobs") or 0
        call = self.submit(prompt_or_messages, max_tokens=max_tokens, tools=tools, tool_choice=tool_choice,
                           response_format=response_format, **sampling)
        for _ in call:
            pass
        if defer:
            return self.registry.deferral.answer(call, self.domain, prompt_or_messages, max_tokens, tools,
                                                 tool_choice, response_format)
        answer = Answer.read(call.text, call.parsed())
        answer.answered_by = f"{self.domain}@{call.version}"
        return answer

    def stream(self, prompt_or_messages, max_tokens: int = 128, tools: list[dict] | None = None,
               tool_choice=None, response_format=None, **sampling) -> Iterator[str]:
        """The answer's text in chunks as it decodes (tool-call markup included; submit() gives
        the call, whose parsed() reads it); closing (or dropping) the stream cancels the call."""
        yield from self.submit(prompt_or_messages, max_tokens=max_tokens, tools=tools, tool_choice=tool_choice,
                               response_format=response_format, **sampling)

    def submit(self, prompt_or_messages, max_tokens: int = 128, tools: list[dict] | None = None,
               tool_choice=None, response_format=None, **sampling) -> Call:
        """Start a call and return it: iterate it for text; its finish_reason and token counts
        are set when it ends, call.parsed() reads its tool calls; call.cancel() frees its row."""
        call = self.registry.submit(self.domain, prompt_or_messages, max_tokens, self._pin, tools=tools,
                                    tool_choice=tool_choice, response_format=response_format, **sampling)
        self.served_version = call.version
        return call


def sampling_settings(sampling: dict) -> dict:
    """A call's sampler, logits processors and stop strings from generate()'s keywords."""
    from mlx_lm.sample_utils import make_sampler

    unknown = sorted(set(sampling) - set(SAMPLING))
    if unknown:
        raise TypeError(f"unknown generation setting {unknown[0]!r}; known: {', '.join(SAMPLING)}")
    temperature = sampling.get("temperature", sampling.get("temp", 0.0))
    knobs = {k: sampling[k] for k in ("top_p", "top_k", "min_p") if sampling.get(k) is not None}
    sampler = sampling.get("sampler")
    if sampler is None and (temperature or knobs):
        if not temperature or temperature < 0:
            raise ValueError(f"top_p, top_k and min_p need a temperature above 0, got {temperature}")
        sampler = make_sampler(temp=temperature, **knobs)
    stop = sampling.get("stop") or ()
    return {"sampler": sampler, "logits_processors": sampling.get("logits_processors"),
            "stop": (stop,) if isinstance(stop, str) else tuple(stop), "logprobs": sampling.get("logprobs")}


class NeuronRegistry:
    """Every domain's newest validated adapter over one student base, hot-swapped, served in batches.

    `home` defaults to $CONCH_HOME; `student` to the config's; `[neurons]` in config.toml sets the
    batch (max_batch_size, prefill_step_size). Manifests are watched (events, and a poll every
    `poll_seconds` since events can be lost); a new version is loaded off the serving path and
    serves the calls submitted after it. Raises UnknownDomainError from get() for a domain the
    config does not have, before any weights load.
    """

    def __init__(self, home: str | Path | None = None, student: str | None = None,
                 poll_seconds: float = 0.5, watch: bool = True):
        self.home = Path(home or conch_home())
        self.config = load_config(self.home)
        self.domains = tuple(self.config.domains)
        self.mlx = MLXThread("conch-neurons")
        self._state_lock = threading.Lock()
        self._closed = False
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        try:
            self.mlx.call(self._load, student or self.config.student)
        except BaseException:
            self.mlx.close()
            raise
        self._serving: dict[str, Adapter] = {d: self._base for d in self.domains}
        self.swapped_at: dict[tuple[str, str], float] = {}
        self.refused: dict[tuple[str, str], str] = {}
        self.broken_manifests: dict[str, str] = {}  # domain -> what is wrong with its manifest now
        self._stop = threading.Event()
        self._observer = None
        self._poller = None
        self.stats_path = self.home / NEURONS_DIR / f"{os.getpid()}.json"
        self.refresh()
        _open_registries.add(self)
        if watch:
            self._start_watching(poll_seconds)

    def _load(self, student: str) -> None:
        """On the MLX thread: the model, its LoRA layers made per-row, the batch engine."""
        self.model, self.tokenizer = load_model(student)
        kd = self.config.kd
        self.lora = apply_lora(self.model, kd.lora_layers, kd.lora_rank, kd.lora_scale, 0.0)
        self.model.eval()
        own = lora_shapes(self.model)
        self.shapes = {k: shape for k, (shape, _) in own.items()}
        self.dtypes = {k: dtype for k, (_, dtype) in own.items()}
        self._base = Adapter(BASE, {k: np.zeros(shape, dtype) for k, (shape, dtype) in own.items()})
        self.engine = BatchEngine(self.model, self.tokenizer, RowAdapters(self.model), self.config.neurons)
        self.mlx.step = self.engine.step
        self.mlx.on_close = self.engine.close
        self.deferral = Deferral(self.home, self.config, self.tokenizer)

    # -- calls ---------------------------------------------------------------------------------

    def submit(self, domain: str, prompt_or_messages, max_tokens: int = 128, pin: Adapter | None = None,
               tools: list[dict] | None = None, tool_choice=None, response_format=None, **sampling) -> Call:
        """Queue a call of `domain` (on `pin`, or the version serving it now) and return it.
        `tools` default to those of a trace-like prompt ({"messages", "tools"}); ToolError (a
        ValueError) for tools or a tool_choice that cannot be honoured, StructureError (a ValueError) for
        a response_format that cannot."""
        check_domain(domain, self.domains)
        if self._closed:
            raise EngineClosed("the neuron registry is closed")
        settings = sampling_settings(sampling)
        chat = to_chat(domain, prompt_or_messages)
        use = tool_use(self.tokenizer, tools if tools is not None else chat.tools, tool_choice)
        tokens = prompt_tokens(self.tokenizer, chat.messages, use.tools if use else None)
        if use and use.prefix:
            tokens += self.tokenizer.encode(use.prefix, add_special_tokens=False)
        forced = bool(use and use.prefix)
        if response_format is not None:
            grammar = self.grammars().matcher(response_format)
            if grammar is not None and forced:
                raise StructureError("a response_format and a forced tool call cannot both hold the answer")
        else:  # tool calls are held to the offered tools' schemas, where their form is JSON
            try:
                grammar = self.grammars().tool_call(use) if use else None
            except StructureError as exc:
                raise ToolError(str(exc)) from None
        call = Call(tokens, pin or self._current(domain), max_tokens, **settings, tools=use, grammar=grammar)
        self.mlx.submit(self.engine.add, call)
        return call

    def grammars(self) -> Grammars:
        """The compiled response formats of this student's tokenizer (built at the first that asks)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, output_vocab_size(self.model))
            return self._grammars

    def stats(self) -> dict:
        """The batch, the queue, tokens/s and time to first token of this registry, now."""
        return {"pid": os.getpid(), "student": self.config.student, **self.engine.stats()}

    # -- loading versions, off the serving path ------------------------------------------------
    def load_version(self, domain: str, version: str) -> dict[str, np.ndarray]:
        """A version's adapter weights as numpy arrays, checked against the model's LoRA layers."""
        from safetensors.numpy import load_file

        if not is_version_name(version):
            raise VersionRefused(f"{domain}: {version!r} is not a version name (v0001, v0002, ...)")
        self._check_inside_home(domain, version)
        self._check_lora_config(domain, version)
        path = domain_dir(self.home, domain) / version / "adapters.safetensors"
        try:
            weights = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a refused version
            raise VersionRefused(f"{domain} {version}: cannot read {path.name}: {exc}") from None
        missing = sorted(set(self.shapes) - set(weights))
        extra = sorted(set(weights) - set(self.shapes))
        wrong = [k for k in self.shapes if k in weights and tuple(weights[k].shape) != self.shapes[k]]
        if missing or extra or wrong:
            what = (missing and f"missing {missing[0]}") or (extra and f"unknown {extra[0]}") or \
                f"{wrong[0]} has shape {weights[wrong[0]].shape}, the model wants {self.shapes[wrong[0]]}"
            raise VersionRefused(f"{domain} {version}: does not fit the serving model ({what})")
        # another dtype would be cast silently on binding: not the weights the gate measured
        cast = [k for k in self.dtypes if weights[k].dtype.name != self.dtypes[k]]
        if cast:
            raise VersionRefused(f"{domain} {version}: {cast[0]} is {weights[cast[0]].dtype.name}, "
                                 f"the model's LoRA layers are {self.dtypes[cast[0]]}")
        if not all(np.isfinite(w).all() for w in weights.values()):
            raise VersionRefused(f"{domain} {version}: weights hold NaN or infinity")
        return weights

    def _check_inside_home(self, domain: str, version: str) -> None:
        """A version's files are real files in its own folder: a link cannot make the registry
        serve (or read) a file from outside the home."""
        folder = domain_dir(self.home, domain)
        for name in ("", "adapter_config.json", "adapters.safetensors"):
            path = folder / version / name if name else folder / version
            if path.is_symlink() or not path.resolve().is_relative_to(folder.resolve()):
                raise VersionRefused(f"{domain} {version}: {path.name} is a link; versions are plain folders")

    def _check_lora_config(self, domain: str, version: str) -> None:
        """A version is served only with the LoRA it was trained with: same layers, rank and scale
        (the weights' shapes show the rank and layers, not the scale)."""
        path = domain_dir(self.home, domain) / version / "adapter_config.json"
        try:
            trained = json.loads(path.read_text())
            theirs = (trained["num_layers"], trained["lora_parameters"]["rank"], trained["lora_parameters"]["scale"])
        except Exception as exc:  # noqa: BLE001 - any unreadable config is a refused version
            raise VersionRefused(f"{domain} {version}: cannot read adapter_config.json: {exc}") from None
        ours = (self.lora["num_layers"], self.lora["lora_parameters"]["rank"], self.lora["lora_parameters"]["scale"])
        if tuple(theirs) != ours:
            raise VersionRefused(f"{domain} {version}: trained with LoRA (layers, rank, scale) {tuple(theirs)}, "
                                 f"the registry serves {ours}: set [kd] in config.toml to match")

    def refresh(self, domain: str | None = None) -> None:
        """Serve the current version of each domain whose manifest names a version not yet serving.
        A broken manifest changes nothing: the domain keeps serving what it served (logged once)."""
        for d in [domain] if domain else self.domains:
            try:
                version = current_version(self.home, d) or BASE
            except ManifestError as exc:
                if self.broken_manifests.get(d) != str(exc):
                    self.broken_manifests[d] = str(exc)
                    log.error("%s; %s keeps serving %s", exc, d, self.next_version(d))
                continue
            self.broken_manifests.pop(d, None)
            if version == self.next_version(d) or (d, version) in self.refused:
                continue
            if version == BASE:
                adapter = self._base
            else:
                try:
                    adapter = Adapter(version, self.load_version(d, version))
                except VersionRefused as exc:
                    self.refused[(d, version)] = str(exc)
                    log.error("refused %s; %s keeps serving %s", exc, d, self.next_version(d))
                    continue
            with self._state_lock:
                self._serving[d] = adapter
                self.swapped_at[(d, version)] = time.time()
            log.info("%s now serves %s", d, version)

    def _current(self, domain: str) -> Adapter:
        with self._state_lock:
            return self._serving[domain]

    def next_version(self, domain: str) -> str:
        """The version a call of the domain made now runs on."""
        check_domain(domain, self.domains)
        return self._current(domain).version

    def serving(self, domain: str) -> tuple[str, Adapter]:
        """(version, adapter) a call of the domain made now runs on."""
        check_domain(domain, self.domains)
        adapter = self._current(domain)
        return adapter.version, adapter

    # -- the public surface --------------------------------------------------------------------

    def get(self, domain: str) -> Neuron:
        check_domain(domain, self.domains)
        return Neuron(self, domain)

    @contextmanager
    def pinned(self, domain: str, version: str | None = None):
        """A neuron that keeps one version for a multi-call agent task: the one serving now, or
        `version`, a kept version of the domain (loaded and checked like a promoted one)."""
        adapter = self.serving(domain)[1]
        if version not in (None, adapter.version):
            adapter = self._base if version == BASE else Adapter(version, self.load_version(domain, version))
        yield Neuron(self, domain, pin=adapter)

    # -- watching, and the figures for `conch doctor` ------------------------------------------

    def _start_watching(self, poll_seconds: float) -> None:
        def on_path(path: Path) -> None:
            if path.name == MANIFEST and path.parent.name in self.domains:
                self.refresh(path.parent.name)

        # only the manifests matter: one non-recursive watch per domain folder
        self._observer = watch([private_dir(domain_dir(self.home, d)) for d in self.domains], on_path)

        def poll():  # filesystem events can be lost; the manifest is small
            written = 0.0
            while not self._stop.wait(poll_seconds):
                try:
                    self.refresh()
                    if time.monotonic() - written >= STATS_EVERY_S:
                        self.write_stats()
                        written = time.monotonic()
                except Exception:  # noqa: BLE001 - a bad moment on disk must not stop the watcher
                    log.exception("refresh failed")

        self._poller = threading.Thread(target=poll, name="conch-neurons-poll", daemon=True)
        self._poller.start()

    def write_stats(self) -> None:
        private_dir(self.stats_path.parent)
        atomic_write_json(self.stats_path, {**self.stats(), "at": time.time()})

    def close(self) -> None:
        """Stop serving: calls still queued or running end with EngineClosed; the watchers and the
        MLX thread are stopped and joined. Twice is harmless; a registry still open when the
        interpreter exits is closed then (before it finalizes: see conch_dna.system.mlx_thread)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        _open_registries.discard(self)
        self._stop.set()
        stop_watching(self._observer, self._poller)
        self.mlx.close()
        self.deferral.close()
        self.stats_path.unlink(missing_ok=True)

    def __enter__(self) -> NeuronRegistry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_open_registries: weakref.WeakSet[NeuronRegistry] = weakref.WeakSet()


@atexit.register
def _close_open_registries() -> None:
    # registered after conch_dna.system.mlx_thread's hook, so it runs first: the watchers stop before
    # the MLX threads are closed under them
    for registry in list(_open_registries):
        registry.close()
