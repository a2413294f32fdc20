"""`conch serve`: the neurons and the EGO behind an OpenAI-compatible HTTP API, on loopback.

    conch serve                                  # http://127.0.0.1:8321/v1
    client = openai.OpenAI(base_url="http://127.0.0.1:8321/v1", api_key="-")
    client.chat.completions.create(model="thinking", messages=[{"role": "user", "content": "Why?"}])

`model` names what answers: "thinking" is the domain's newest validated student (hot-swapped),
"thinking@v0003" a kept version of it, "ego/thinking" (or a name in [ego] aliases) the teacher,
whose answer is then recorded as a trace of the domain. The teacher is an upstream
OpenAI-compatible server ([ego] upstream_url) or the config's teacher, loaded in this process.
`POST /v1/traces` takes JSONL trace lines from agents on other machines, through the inbox's ingest
(refused with [server] accept_traces = false). A host other than loopback is refused unless a bearer
token is set ([server] token_env); with a token, every request must carry it. Requests from web pages
(an Origin, a foreign Host, a body not declared as JSON) are refused (conch_dna.server.guard); every
connection, body and intake is bounded (conch_dna.server.connections, [server]). Message contents are
never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import conch_dna.server.wire as wire
from conch_dna.models.versions import list_versions
from conch_dna.server.cascade import AUTO_PREFIX, CascadeAnswers
from conch_dna.server.connections import Waiting, connection_cap, guarded_protocol, rate_limit_server_logs
from conch_dna.server.guard import RequestGuard, is_loopback_name
from conch_dna.server.intake import TraceIntake
from conch_dna.server.students import StudentAnswers
from conch_dna.server.teacher import TeacherAnswers
from conch_dna.settings.config import Config, load_config
from conch_dna.traces.store import TraceStore

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from neurons.registry import NeuronRegistry

log = logging.getLogger("conch.serve")
EGO_PREFIX = "ego/"
GRACE_S = 10  # on stop, answers still streaming get this long to finish before they are cut
PINNED_KEPT = 4  # pinned versions kept loaded between requests (each is one adapter's weights)
REASONS_SHOWN = 100  # refused lines of a POST of traces whose reasons the answer gives; the rest are counted
_DONE = object()


class ServeError(RuntimeError):
    """The server cannot start as asked (e.g. a public host without a bearer token)."""


def bearer_token(config: Config) -> str | None:
    """The token every request must carry, from the variable [server] token_env names; None if unset."""
    return os.environ.get(config.server.token_env) or None


def check_exposure(host: str, token: str | None, token_env: str) -> None:
    if not is_loopback_name(host.strip("[]")) and not token:
        raise ServeError(f"refusing to listen on {host}, which is not loopback, without a bearer token: "
                         f"set ${token_env} (every request must then send 'Authorization: Bearer <token>')")


class ConchAPI:
    """The endpoints, each a thin route: a model name to the students' or the teacher's answers, the model
    list, the traces' intake; the request bodies read within their bounds."""

    def __init__(self, home: Path, config: Config, registry: NeuronRegistry, token: str | None = None):
        self.home, self.config, self.registry, self.token = home, config, registry, token
        self.store = TraceStore.for_home(home, config)
        self.ego = config.ego
        self.students = StudentAnswers(registry)
        self.teacher = TeacherAnswers(home, config, self.store)
        self.cascade = CascadeAnswers(home, self.students, self.teacher)
        self.intake = TraceIntake(home, config, self.store)

    # -- routing a model name -----------------------------------------------------------------

    def route(self, model: str) -> tuple[str, str, str | None]:
        """("neuron" | "ego" | "auto", domain, version or None) for a request's `model`; 404 if unknown."""
        domains = self.registry.domains
        if model.startswith(EGO_PREFIX) and model[len(EGO_PREFIX):] in domains:
            return "ego", model[len(EGO_PREFIX):], None
        if model.startswith(AUTO_PREFIX) and model[len(AUTO_PREFIX):] in domains:
            return "auto", model[len(AUTO_PREFIX):], None
        if model in self.ego.aliases:
            return "ego", self.ego.aliases[model], None
        domain, _, version = model.partition("@")
        if domain in domains and not version:
            return "neuron", domain, None
        if domain in domains and version in list_versions(self.home, domain):
            return "neuron", domain, version
        if domain in domains:
            kept = ", ".join(list_versions(self.home, domain)) or "none"
            raise wire.APIError(404, f"model {model!r} does not exist: {domain} has no version {version!r} "
                                f"(kept: {kept})", code="model_not_found", param="model")
        raise wire.APIError(404, f"model {model!r} does not exist; known: {', '.join(domains)}, a domain@version "
                            f"(see /v1/models), ego/<domain> or auto/<domain>", code="model_not_found", param="model")

    # -- endpoints ----------------------------------------------------------------------------

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self.model_list()})

    async def model(self, request: Request) -> JSONResponse:
        name = request.path_params["model"]
        for entry in self.model_list():
            if entry["id"] == name:
                return JSONResponse(entry)
        raise wire.APIError(404, f"model {name!r} does not exist", code="model_not_found", param="model")

    def model_list(self) -> list[dict]:
        now = int(time.time())

        def entry(name: str, owner: str, **extra) -> dict:
            return {"id": name, "object": "model", "created": now, "owned_by": owner, **extra}

        out = []
        for d in self.registry.domains:
            out.append(entry(d, "conch", serving_version=self.registry.next_version(d)))
            out += [entry(f"{d}@{v}", "conch") for v in list_versions(self.home, d)]
        teacher = self.teacher.teacher_name
        out += [entry(f"{EGO_PREFIX}{d}", "conch-ego", teacher=teacher) for d in self.registry.domains]
        out += [entry(f"{AUTO_PREFIX}{d}", "conch-auto") for d in self.registry.domains]
        out += [entry(name, "conch-ego", teacher=teacher, domain=d) for name, d in self.ego.aliases.items()]
        return out

    async def chat(self, request: Request) -> Response:
        req, raw = wire.parse_request(await self._body(request))
        kind, domain, version = self.route(req.model)
        max_tokens = req.wanted_max_tokens(self.config.server.default_max_tokens, self.config.server.max_tokens)
        if kind == "neuron":
            return await self.students.answer(req, domain, version, max_tokens, request)
        if kind == "auto":
            return await self.cascade.answer(req, raw, domain, max_tokens, request)
        response = await self.teacher.answer(req, raw, domain, max_tokens)
        response.headers["x-conch-answered-by"] = "ego"
        return response

    async def stats(self, request: Request) -> JSONResponse:
        """The batch of the neurons, and per domain and version what auto/ served and deferred."""
        return JSONResponse({"neurons": self.registry.stats(), "auto": self.cascade.stats()})

    async def traces(self, request: Request) -> JSONResponse:
        return await self.intake.post(request, self._body)

    async def _body(self, request: Request, limit: int | None = None) -> bytes:
        limit = limit or self.config.server.max_request_kb * 1024
        too_large = wire.APIError(413, f"the request body is over this server's limit of {limit} bytes",
                                  code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()

        async def read() -> None:
            async for part in request.stream():
                body.extend(part)
                if len(body) > limit:
                    raise too_large

        timeout = self.config.server.body_timeout_s
        try:
            await asyncio.wait_for(read(), timeout)
        except ClientDisconnect:
            raise wire.APIError(400, "the client went away before its request was read") from None
        except asyncio.TimeoutError:
            raise wire.APIError(408, f"the request body did not arrive within {timeout:g} s ([server] "
                                "body_timeout_s)", code="request_timeout") from None
        return bytes(body)

    async def close(self) -> None:
        await self.teacher.close()


# -- the app ----------------------------------------------------------------------------------


def _error_response(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, wire.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    if isinstance(exc, HTTPException):
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        error = wire.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind)
        return JSONResponse(error.body(), status_code=exc.status_code)
    log.error("a request failed: %r", exc)
    return JSONResponse(wire.APIError(500, f"the server failed: {exc}", type="server_error").body(), status_code=500)


def create_app(api: ConchAPI, host: str | None = None):
    """The ASGI app; every request first passes RequestGuard (the bound `host`, the token, the origins)."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        await api.close()

    app = Starlette(
        routes=[Route("/v1/chat/completions", api.chat, methods=["POST"]),
                Route("/v1/traces", api.traces, methods=["POST"]),
                Route("/v1/models", api.models, methods=["GET"]),
                Route("/v1/stats", api.stats, methods=["GET"]),
                Route("/v1/models/{model:path}", api.model, methods=["GET"])],
        exception_handlers={Exception: _error_response, HTTPException: _error_response, wire.APIError: _error_response},
        lifespan=lifespan)
    settings = api.config.server
    return RequestGuard(app, host or settings.host, api.token, settings.allowed_hosts, settings.allowed_origins)


class Server:
    """`conch serve` on a thread of its own (the daemon's and the tests' way); port 0 picks a free one."""

    def __init__(self, home: str | Path, host: str | None = None, port: int | None = None,
                 registry: NeuronRegistry | None = None):
        import uvicorn

        self.home = Path(home)
        config = load_config(self.home)
        self.host = host or config.server.host
        token = bearer_token(config)
        check_exposure(self.host, token, config.server.token_env)
        self._own_registry = registry is None
        self.registry = registry or NeuronRegistry(self.home)
        self.api = ConchAPI(self.home, config, self.registry, token)
        port = config.server.port if port is None else port
        rate_limit_server_logs()
        self.connections = Waiting(connection_cap(config.server.max_connections), config.server.header_timeout_s)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.api, self.host), host=self.host, port=port,
                                                    log_level="warning", lifespan="on",
                                                    http=guarded_protocol(self.connections),
                                                    timeout_graceful_shutdown=GRACE_S))
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Server:
        self.thread = threading.Thread(target=self.server.run, name="conch-serve", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise ServeError(f"the server did not start on {self.host} (is the port in use?)")
            time.sleep(0.02)
        log.info("serving the OpenAI API on %s", self.url)
        return self

    def run(self, ready: Callable[[str], None] | None = None) -> None:
        """In the foreground until SIGINT / SIGTERM, then as stop(); `ready(url)` once it listens.
        The handlers only set a flag: the server runs on its own thread, so uvicorn installs none
        of its own (which would end the process by the signal, not with status 0)."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        try:
            if ready:
                ready(self.url)
            while not stop.wait(0.5) and self.thread.is_alive():
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Take no new connection, let the answers in flight finish (up to GRACE_S), close the
        registry. Twice is harmless."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=GRACE_S + 30)
        self._close_registry()

    def _close_registry(self) -> None:
        if self._own_registry:
            self.registry.close()
