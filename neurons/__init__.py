"""Agent code's entry point: `neurons.get('thinking')` gives the best validated student for a domain.

    import neurons
    n = neurons.get("thinking")
    print(n.version, n.generate("Why does ice float? Explain it to a child."))
    with neurons.pinned("task") as n:       # one version for a whole multi-call task
        ...

The registry (one per process, for $CONCH_HOME) loads the student base once and hot-swaps each
domain's newest promoted adapter without a restart; see neurons.registry.
"""

from __future__ import annotations

import threading

from conch_dna.settings.config import load_config
from conch_dna.system.domains import check_domain
from conch_dna.system.home import conch_home

from neurons.registry import Answer, Neuron, NeuronRegistry, VersionRefused

__all__ = ["Answer", "Neuron", "NeuronRegistry", "VersionRefused", "get", "pinned", "registry"]

_registry: NeuronRegistry | None = None
_lock = threading.Lock()


def registry() -> NeuronRegistry:
    """The process's registry, created on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = NeuronRegistry()
        return _registry


def _check_before_loading(domain: str) -> None:
    """An unknown domain fails on its name at once, before the first call loads the student."""
    if _registry is None:
        check_domain(domain, load_config(conch_home()).domains)


def get(domain: str) -> Neuron:
    """The neuron of `domain`: the newest promoted adapter, hot-swapped; raises UnknownDomainError."""
    _check_before_loading(domain)
    return registry().get(domain)


def pinned(domain: str, version: str | None = None):
    """A context manager: a neuron that keeps one version (the current one, or `version`) for a
    multi-call task."""
    _check_before_loading(domain)
    return registry().pinned(domain, version)
