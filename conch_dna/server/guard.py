"""Who may call the API: the user's own programs, not a web page in the user's browser.

Loopback is no wall: any page the browser shows can send a request to 127.0.0.1 (a "simple" POST needs
no preflight), and a page whose name is rebound to 127.0.0.1 (DNS rebinding) can read the answers.
Each request is therefore refused, before anything else reads it, when:

- its `Host` is not the bound address, `localhost`, a loopback address or a name in [server] allowed_hosts
  (what a rebound page sends is its own name);
- it carries an `Origin` not in [server] allowed_origins, or `Sec-Fetch-Site: cross-site` (what a browser
  adds to a page's requests, and a program does not);
- a bearer token is set and the request does not carry it;
- a POST's body is not declared as JSON (`application/json`), or, for `/v1/traces`, as JSON lines: a type
  a page can only send after a CORS preflight, which this server never grants.
"""

from __future__ import annotations

import hmac
import ipaddress

from conch_dna.server import wire

from starlette.responses import JSONResponse

JSON_TYPES = ("application/json",)
JSON_LINES_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/json-lines",
                    "application/jsonlines")
TRACES_PATH = "/v1/traces"
_WILDCARDS = ("0.0.0.0", "::", "")


def host_name(host_header: str) -> str:
    """The name of a Host header, without its port: "127.0.0.1:8321" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class RequestGuard:
    """ASGI middleware that refuses what did not come from the user's own programs (see the module)."""

    def __init__(self, app, bound_host: str, token: str | None = None, allowed_hosts: list[str] = (),
                 allowed_origins: list[str] = ()):
        self.app, self.token = app, token
        self.bound_host = bound_host.strip("[]").lower()
        self.allowed_hosts = {h.lower() for h in allowed_hosts} | {self.bound_host}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        # bound to every address (only possible with a token): the clients' names for this machine are not known
        self.any_host = self.bound_host in _WILDCARDS and bool(token)

    def refusal(self, method: str, path: str, headers: dict[bytes, bytes]) -> wire.APIError | None:
        """Why this request is refused, or None."""
        host = headers.get(b"host")
        if host is not None and not self.any_host:
            name = host_name(host.decode("latin-1"))
            if name not in self.allowed_hosts and not is_loopback_name(name):
                return wire.APIError(403, f"Host {name!r} is not this server's name: requests must be addressed to "
                                     "localhost, a loopback address or a name in [server] allowed_hosts",
                                     code="host_refused")
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").rstrip("/").lower() not in self.allowed_origins:
            return wire.APIError(403, f"requests from web pages are refused (Origin {origin.decode('latin-1')!r}); "
                                 "allow a page's origin with [server] allowed_origins", code="origin_refused")
        if headers.get(b"sec-fetch-site", b"").lower() == b"cross-site" and not self.allowed_origins:
            return wire.APIError(403, "cross-site requests from a browser are refused", code="origin_refused")
        if self.token:
            sent = headers.get(b"authorization", b"")
            if not hmac.compare_digest(sent, f"Bearer {self.token}".encode()):
                return wire.APIError(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                                     type="authentication_error", code="invalid_api_key")
        if method == "POST":
            declared = media_type(headers.get(b"content-type", b"").decode("latin-1"))
            wanted = JSON_LINES_TYPES if path == TRACES_PATH else JSON_TYPES
            if declared not in wanted:
                return wire.APIError(415, f"POST {path} takes Content-Type {' or '.join(wanted[:2])}, "
                                     f"not {declared or 'none'!r}", code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if (error := self.refusal(scope["method"], scope["path"], headers)) is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
