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

from neurons.registry import Neuron, NeuronRegistry, VersionRefused

__all__ = ["Neuron", "NeuronRegistry", "VersionRefused", "get", "pinned", "registry"]

_registry: NeuronRegistry | None = None
_lock = threading.Lock()


def registry() -> NeuronRegistry:
    """The process's registry, created on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = NeuronRegistry()
        return _registry


def get(domain: str) -> Neuron:
    return registry().get(domain)


def pinned(domain: str):
    return registry().pinned(domain)
