"""The neuron registry: one shared student base, per-domain LoRA weights, hot-swapped between calls.

How calls are served: MLX is not thread-safe (and its arrays belong to the thread that made them),
so the registry owns one MLX thread that loads the model and runs every call. Agent threads put
their calls on its queue and read the answer's chunks back; calls are served one at a time, each
binding its domain's lora_a / lora_b into the model's LoRA layers (they stay in place; only their
weights change) and generating on exactly the weights it bound.

Hot-swap: a watchdog observer on $CONCH_HOME/adapters_kd, with a polling fallback, notices a
domain's manifest change. The new version's weights are read with numpy off the serving path and
checked against the model's LoRA parameters (names, shapes, dtype, finiteness) and the LoRA it was
trained with; a version that fails is refused, logged, and the old one keeps serving, as it does
through a broken manifest. Accepted weights are swapped in at the next call.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conch_dna.adapters import adapter_weights, apply_lora
from conch_dna.chat import prompt_tokens, to_messages
from conch_dna.config import load_config
from conch_dna.domains import check_domain
from conch_dna.fsutil import private_dir
from conch_dna.home import conch_home
from conch_dna.mlx_thread import MLXThread
from conch_dna.models import load_model
from conch_dna.versions import MANIFEST, ManifestError, current_version, domain_dir
from conch_dna.watching import stop_watching, watch

import mlx.core as mx
import numpy as np

log = logging.getLogger("conch.neurons")
BASE = "base"
_END = object()


class VersionRefused(ValueError):
    """A promoted version whose weights do not fit the serving model."""


class Neuron:
    """A domain's student: generate() / stream() on its current (or pinned) version."""

    def __init__(self, registry: NeuronRegistry, domain: str, pin: tuple[str, dict] | None = None):
        self.registry = registry
        self.domain = domain
        self._pin = pin
        self.served_version: str | None = None  # the version the last call on this neuron ran on

    @property
    def version(self) -> str:
        """The version the next call runs on."""
        return self._pin[0] if self._pin else self.registry.next_version(self.domain)

    def generate(self, prompt_or_messages, max_tokens: int = 128, **kwargs) -> str:
        """The student's answer. A string prompt gets the domain's system prompt, as in training
        (conch_dna.chat.to_messages); a list of chat messages is used as it is. `kwargs` go to
        mlx_lm.stream_generate (a sampler, for example)."""
        return "".join(self.stream(prompt_or_messages, max_tokens=max_tokens, **kwargs))

    def stream(self, prompt_or_messages, max_tokens: int = 128, **kwargs) -> Iterator[str]:
        chunks: queue.Queue = queue.Queue()
        self.registry.mlx.submit(self.registry._generate, self, prompt_or_messages, max_tokens, kwargs, chunks)
        while (item := chunks.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class NeuronRegistry:
    """Every domain's newest validated adapter over one student base, hot-swapped between calls.

    `home` defaults to $CONCH_HOME; `student` to the config's. Manifests are watched (events, and a
    poll every `poll_seconds` since events can be lost); a new version is loaded off the serving
    path and bound before the next call. Raises UnknownDomainError from get() for a domain the
    config does not have, before any weights load.
    """

    def __init__(self, home: str | Path | None = None, student: str | None = None,
                 poll_seconds: float = 0.5, watch: bool = True):
        self.home = Path(home or conch_home())
        self.config = load_config(self.home)
        self.domains = tuple(self.config.domains)
        self.mlx = MLXThread("conch-neurons")
        self._staged: dict[str, tuple[str, dict]] = {}  # loaded off the serving path, not yet bound
        self._state_lock = threading.Lock()
        self.mlx.call(self._load, student or self.config.student)
        self.swapped_at: dict[tuple[str, str], float] = {}
        self.refused: dict[tuple[str, str], str] = {}
        self.broken_manifests: dict[str, str] = {}  # domain -> what is wrong with its manifest now
        self._stop = threading.Event()
        self._observer = None
        self._poller = None
        self.refresh()
        self._apply_staged()
        if watch:
            self._start_watching(poll_seconds)

    # -- the MLX thread: everything that touches MLX runs here --------------------------------

    def _load(self, student: str) -> None:
        self.model, self.tokenizer = load_model(student)
        kd = self.config.kd
        self.lora = apply_lora(self.model, kd.lora_layers, kd.lora_rank, kd.lora_scale, 0.0)
        self.model.eval()
        own = adapter_weights(self.model)
        self.shapes = {k: tuple(v.shape) for k, v in own.items()}
        self.dtypes = {k: str(v.dtype).rpartition(".")[2] for k, v in own.items()}
        self._base = {k: mx.zeros_like(v) if k.endswith("lora_b") else v for k, v in own.items()}
        mx.eval(self._base)
        self._serving: dict[str, tuple[str, dict]] = {d: (BASE, self._base) for d in self.domains}

    def _generate(self, neuron: Neuron, prompt_or_messages, max_tokens: int, kwargs: dict, chunks) -> None:
        from mlx_lm import stream_generate

        try:
            self._apply_staged()
            version, weights = neuron._pin or self._serving[neuron.domain]
            self.bind(weights)
            neuron.served_version = version
            prompt = prompt_tokens(self.tokenizer, to_messages(neuron.domain, prompt_or_messages))
            for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens, **kwargs):
                chunks.put(response.text)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            chunks.put(exc)
        finally:
            chunks.put(_END)

    # -- loading versions, off the serving path ------------------------------------------------

    def load_version(self, domain: str, version: str) -> dict[str, np.ndarray]:
        """A version's adapter weights as numpy arrays, checked against the model's LoRA layers."""
        from safetensors.numpy import load_file

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
        """Stage the current version of each domain whose manifest names a version not yet serving.
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
            with self._state_lock:
                known = {self.next_version(d)}
            if version in known or (d, version) in self.refused:
                continue
            if version == BASE:
                weights = None
            else:
                try:
                    weights = self.load_version(d, version)
                except VersionRefused as exc:
                    self.refused[(d, version)] = str(exc)
                    log.error("refused %s; %s keeps serving", exc, self._serving[d][0])
                    continue
            with self._state_lock:
                self._staged[d] = (version, weights)

    def _apply_staged(self) -> None:
        """Turn staged numpy weights into MLX arrays and serve them (on the MLX thread, between calls)."""
        with self._state_lock:
            staged, self._staged = self._staged, {}
            for d, (version, weights) in staged.items():
                mx_weights = self._base if weights is None else {k: mx.array(v) for k, v in weights.items()}
                self._serving[d] = (version, mx_weights)
                self.swapped_at[(d, version)] = time.time()
                log.info("%s now serves %s", d, version)

    def next_version(self, domain: str) -> str:
        """The version a call of the domain made now runs on (a staged one counts)."""
        check_domain(domain, self.domains)
        staged = self._staged.get(domain)
        return staged[0] if staged else self._serving[domain][0]

    def serving(self, domain: str) -> tuple[str, dict]:
        """(version, weights) a call made now runs on, with staged versions applied first."""
        check_domain(domain, self.domains)
        return self.mlx.call(lambda: (self._apply_staged(), self._serving[domain])[1])

    def bind(self, weights: dict) -> None:
        self.model.load_weights(list(weights.items()), strict=False)

    # -- the public surface --------------------------------------------------------------------

    def get(self, domain: str) -> Neuron:
        check_domain(domain, self.domains)
        return Neuron(self, domain)

    @contextmanager
    def pinned(self, domain: str):
        """A neuron that keeps the version it was pinned to, for a multi-call agent task."""
        yield Neuron(self, domain, pin=self.serving(domain))

    # -- watching ------------------------------------------------------------------------------

    def _start_watching(self, poll_seconds: float) -> None:
        def on_path(path: Path) -> None:
            if path.name == MANIFEST and path.parent.name in self.domains:
                self.refresh(path.parent.name)

        # only the manifests matter: one non-recursive watch per domain folder
        self._observer = watch([private_dir(domain_dir(self.home, d)) for d in self.domains], on_path)

        def poll():  # filesystem events can be lost; the manifest is small
            while not self._stop.wait(poll_seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - a bad moment on disk must not stop the watcher
                    log.exception("refresh failed")

        self._poller = threading.Thread(target=poll, name="conch-neurons-poll", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        self.mlx.close()
        stop_watching(self._observer, self._poller)
