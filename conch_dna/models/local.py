"""The models already on this machine: Ollama's store, LM Studio's folder, the Hugging Face cache and
the directories conch imported; a name like `ollama:qwen2.5:7b-instruct` resolved to its file.

    ollama:NAME[:TAG]            $OLLAMA_MODELS (default ~/.ollama/models): manifests/<registry>/<namespace>/
                                 <name>/<tag> name the blob of media type application/vnd.ollama.image.model
    lmstudio:PUBLISHER/REPO[/FILE.gguf]   ~/.lmstudio/models (older: ~/.cache/lm-studio/models)
    hf:ORG/NAME                  the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub)
    a path                       a .gguf file or an mlx-lm directory

Nothing here loads weights: a GGUF is described from its header, a directory from its config.json.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from conch_dna.models.gguf.importer import describe

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_LIBRARY = ("registry.ollama.ai", "library")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


class ModelNotFound(LookupError):
    """A model name that names nothing on this machine; the message says where it looked."""


@dataclass
class LocalModel:
    source: str  # ollama, lmstudio, hf, imported
    name: str  # what `conch models import` takes (or, for an mlx-lm directory, config.toml)
    path: str
    kind: str  # gguf or mlx
    architecture: str | None
    size_bytes: int
    quantization: str | None
    usable: bool  # a GGUF conch can import, or an mlx-lm directory mlx_lm.load takes as it is
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def lmstudio_roots() -> list[Path]:
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


# -- Ollama -------------------------------------------------------------------------------------------------------


def _ollama_name(parts: tuple[str, ...]) -> str:
    """(registry, namespace, model, tag) -> Ollama's own short name: qwen2.5:7b, user/model:tag, host/ns/m:tag."""
    registry, namespace, model, tag = parts
    if (registry, namespace) == OLLAMA_LIBRARY:
        return f"{model}:{tag}"
    if registry == OLLAMA_LIBRARY[0]:
        return f"{namespace}/{model}:{tag}"
    return f"{registry}/{namespace}/{model}:{tag}"


def _ollama_blob(root: Path, manifest: Path) -> Path:
    """The model blob a manifest names, checked: a sha256 digest inside the store's blobs folder."""
    try:
        data = json.loads(manifest.read_text())
        layers = [x for x in data["layers"] if x.get("mediaType") == OLLAMA_MODEL_LAYER]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelNotFound(f"{manifest} is not an Ollama manifest: {exc}") from None
    if not layers:
        raise ModelNotFound(f"{manifest} names no model layer ({OLLAMA_MODEL_LAYER})")
    match = _DIGEST.match(str(layers[0].get("digest", "")))
    if not match:
        raise ModelNotFound(f"{manifest}: its model layer's digest {layers[0].get('digest')!r} is not sha256")
    blob = root / "blobs" / f"sha256-{match.group(1)}"
    if not blob.is_file():
        raise ModelNotFound(f"{manifest} names blob {blob.name}, which is not in {root / 'blobs'}")
    return blob


def ollama_models() -> list[tuple[str, Path]]:
    root = ollama_root()
    manifests = root / "manifests"
    found = []
    for manifest in sorted(manifests.glob("*/*/*/*")) if manifests.is_dir() else []:
        if manifest.is_file():
            try:
                found.append((_ollama_name(manifest.relative_to(manifests).parts), _ollama_blob(root, manifest)))
            except ModelNotFound:
                continue
    return found


def resolve_ollama(name: str) -> Path:
    """The GGUF blob of `name` (model[:tag], namespace/model:tag or registry/namespace/model:tag)."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if not 1 <= len(parts) <= 3 or not all(p and p not in (".", "..") for p in parts) or "/" in tag:
        raise ModelNotFound(f"{name!r} is not an Ollama model name (e.g. qwen2.5:7b-instruct)")
    registry, namespace = OLLAMA_LIBRARY
    if len(parts) == 2:
        namespace = parts[0]
    elif len(parts) == 3:
        registry, namespace = parts[0], parts[1]
    root = ollama_root()
    manifest = root / "manifests" / registry / namespace / parts[-1] / (tag or "latest")
    if not manifest.is_file():
        known = ", ".join(n for n, _ in ollama_models()) or "none"
        raise ModelNotFound(f"Ollama has no model {name!r} in {root} (there: {known})")
    return _ollama_blob(root, manifest)


# -- LM Studio, the Hugging Face cache, imported directories ----------------------------------------------------------


def lmstudio_models() -> list[tuple[str, Path]]:
    found = []
    for root in lmstudio_roots():
        if root.is_dir():
            found += [(str(p.relative_to(root)), p) for p in sorted(root.glob("*/*/*.gguf")) if p.is_file()]
    return found


def resolve_lmstudio(name: str) -> Path:
    """The GGUF of publisher/repo (its only .gguf, or the one of a Q4_K_M name) or publisher/repo/file.gguf."""
    if ".." in Path(name).parts or name.startswith("/"):
        raise ModelNotFound(f"{name!r} is not an LM Studio model name (publisher/repo[/file.gguf])")
    for root in lmstudio_roots():
        target = root / name
        if target.is_file() and target.suffix == ".gguf":
            return target
        if target.is_dir():
            files = sorted(target.glob("*.gguf"))
            if len(files) == 1:
                return files[0]
            if files:
                raise ModelNotFound(f"LM Studio's {name} holds {len(files)} files: name one, e.g. "
                                    f"lmstudio:{name}/{files[0].name}")
    known = ", ".join(n for n, _ in lmstudio_models()) or "none"
    raise ModelNotFound(f"LM Studio has no model {name!r} in {' or '.join(map(str, lmstudio_roots()))} "
                        f"(there: {known})")


def hf_models() -> list[tuple[str, Path]]:
    found = []
    cache = hf_cache()
    for repo in sorted(cache.glob("models--*--*")) if cache.is_dir() else []:
        name = repo.name.removeprefix("models--").replace("--", "/", 1)
        for snapshot in sorted((repo / "snapshots").glob("*"))[-1:]:
            if (snapshot / "config.json").is_file():
                found.append((name, snapshot))
            found += [(f"{name}/{g.name}", g) for g in sorted(snapshot.glob("*.gguf"))]
    return found


def imported_models(home: Path) -> list[tuple[str, Path]]:
    root = home / "models"
    return [(str(p), p) for p in sorted(root.glob("*")) if (p / "config.json").is_file()] if root.is_dir() else []


def resolve(ref: str) -> Path:
    """A model reference (see the module's doc) as the path of its GGUF file or mlx-lm directory."""
    kind, sep, name = ref.partition(":")
    if sep and kind == "ollama":
        return resolve_ollama(name)
    if sep and kind == "lmstudio":
        return resolve_lmstudio(name)
    if sep and kind == "hf":
        for known, path in hf_models():
            if known == name:
                return path
        raise ModelNotFound(f"the Hugging Face cache {hf_cache()} has no {name!r}")
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelNotFound(f"no such model: {ref} (a path, or ollama:NAME:TAG, lmstudio:PUBLISHER/REPO, hf:ORG/NAME)")
    return path


# -- describing them ---------------------------------------------------------------------------------------------------


def describe_path(source: str, name: str, path: Path) -> LocalModel:
    if path.is_file():
        info = describe(path)
        return LocalModel(source, name, str(path), "gguf", info.get("architecture"), path.stat().st_size,
                          info.get("quantization"), bool(info.get("importable")), info.get("reason"))
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return LocalModel(source, name, str(path), "mlx", None, 0, None, False, f"config.json: {exc}")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    quant = config.get("quantization") or {}
    usable = size > 0
    return LocalModel(source, name, str(path), "mlx", config.get("model_type"), size,
                      f"{quant['bits']}-bit" if quant.get("bits") else config.get("torch_dtype"), usable,
                      None if usable else "no safetensors weights (not an MLX model directory)")


def list_models(home: Path) -> list[LocalModel]:
    """Every model found on this machine, by source."""
    out = []
    for source, entries in (("ollama", ollama_models()), ("lmstudio", lmstudio_models()), ("hf", hf_models())):
        out += [describe_path(source, f"{source}:{name}", path) for name, path in entries]
    out += [describe_path("imported", name, path) for name, path in imported_models(home)]
    return out


def tokenizer_of(ref: str):
    """The tokenizer of a model reference, without its weights: an mlx-lm directory's or hub id's
    (mlx-lm's loader), a GGUF file's rebuilt from its header."""
    from conch_dna.models.gguf.reader import GGUFFile
    from conch_dna.models.gguf.tokenizer import build_tokenizer
    from conch_dna.models.loading import load_tokenizer_only

    try:
        path = resolve(ref)
    except ModelNotFound:
        if ":" in ref:
            raise
        return load_tokenizer_only(ref)  # a hub id (mlx-community/...), from the local cache
    if path.is_file():
        with GGUFFile.open(path) as f:
            return build_tokenizer(f.metadata)
    return load_tokenizer_only(str(path))


def pair_check(teacher: str, student: str) -> tuple[bool, str]:
    """Whether a teacher and a student share token ids, by the rule the distiller applies."""
    from conch_dna.models.loading import VocabMismatchError, check_shared_vocab

    t, s = tokenizer_of(teacher), tokenizer_of(student)
    try:
        check_shared_vocab(t, s)
    except VocabMismatchError as exc:
        return False, str(exc)
    return True, (f"they pair: every one of the student's {len(s.get_vocab())} tokens has the teacher's id "
                  f"(teacher vocabulary {len(t.get_vocab())})")
