"""The FastAPI app of `ffkv serve`: four pages (plain HTML shell + one vanilla JS file + CSS, all served from
the package) and the JSON API they use.

Safety: the app never reads a path from a request (static files come from the package's own folder, by a
fixed mount); every parameter is validated (unknown layer/key -> 404, malformed -> 422, both as JSON
``{"error": ...}``); the Host header must always name a loopback address (localhost, 127.0.0.0/8, ::1), the
address the server is bound to or a name added with `--allowed-host` (this stops DNS-rebinding pages from
reaching the server, remote or not); a server given a token (always, on a non-loopback address) answers only
requests that carry it (``Authorization: Bearer TOKEN``, or the cookie set when a page is opened once with
``?token=TOKEN``; else 401); request bodies are capped before anything parses them (413); model runs wait in a
bounded queue (503 when it is full or a run waited too long); pages get a Content-Security-Policy that allows
nothing but this server (no CDN, no inline script).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import cookie_parser

from ..errors import FfkvError
from .debugger import Intervention
from .service import (
    MAX_INTERVENTIONS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    QUEUE_SIZE,
    QUEUE_TIMEOUT,
    BadRequest,
    Busy,
    NotFound,
    Service,
    Unavailable,
)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 64 * 1024
"""Largest request body read (a run's prompt, at most 2000 characters, and 64 interventions need far less)."""
MAX_LIMIT = 200
MAX_QUERY_CHARS = 200
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
PAGES = {"overview": "Overview", "memory": "Memory", "search": "Search", "debug": "Prompt debugger",
         "notfound": "Not found"}


class InterventionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: StrictInt
    key: StrictInt
    mode: Literal["off", "set"]
    value: float | None = Field(default=None, allow_inf_nan=False)

    def to_intervention(self) -> Intervention:
        return Intervention(self.layer, self.key, self.mode, self.value)


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    interventions: list[InterventionIn] = Field(default_factory=list, max_length=MAX_INTERVENTIONS)
    top: StrictInt = Field(default=10, ge=1, le=50)


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    interventions: list[InterventionIn] = Field(default_factory=list, max_length=MAX_INTERVENTIONS)
    max_new_tokens: StrictInt = Field(default=20, ge=1, le=MAX_NEW_TOKENS)


def _host_name(header: str) -> str:
    """'[::1]:8000' -> '::1'; 'localhost:8000' -> 'localhost'."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def normal_host(name: str) -> str:
    """A host name or address as the Host check compares it: lower case, without brackets or a trailing dot; an
    IP address in its canonical form ('::0001' -> '::1')."""
    name = name.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def is_loopback(host: str) -> bool:
    """localhost, ::1 and the whole of 127.0.0.0/8."""
    name = normal_host(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or :: (every interface)."""
    try:
        return ipaddress.ip_address(normal_host(host)).is_unspecified
    except ValueError:
        return False


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


_DIGITS = re.compile(r"[0-9]{1,18}")


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Guard:
    """The outermost layer of the app (plain ASGI): refuses a request whose Host header names neither a loopback
    address nor an accepted name (400); with a token, one that does not carry it (401); one whose body is larger
    than ``max_body`` bytes, by its Content-Length or as it streams in, before anything parses it (413); adds the
    security headers to every response."""

    def __init__(self, app, allowed_hosts: Iterable[str] = (), token: str | None = None,
                 max_body: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body = max_body
        self.allowed = {normal_host(h) for h in allowed_hosts if h}
        self.token = token.encode() if token else None
        # named by the token, so that two servers on one host (cookies ignore the port) keep their own
        self.cookie = "ffkv_token_" + hashlib.sha256(self.token).hexdigest()[:12] if token else None

    def _matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode("utf-8", "replace"), self.token)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._matches(credentials.strip()):
            return True
        return self._matches(cookie_parser(headers.get("cookie", "")).get(self.cookie))

    def _token_response(self, scope, headers: Headers):
        """None when the request may go on; else the response: a page opened with the right ?token= is
        redirected to the same address without it, setting the cookie; anything else unauthorized is 401."""
        query = QueryParams(scope.get("query_string", b""))
        given = query.get("token")
        is_page = scope["method"] in ("GET", "HEAD") and not scope["path"].startswith("/api/")
        if given is not None and is_page and self._matches(given):
            rest = urlencode([(k, v) for k, v in query.multi_items() if k != "token"])
            path = "/" + scope["path"].lstrip("/")  # never '//host': that would leave this server
            response = RedirectResponse(quote(path) + ("?" + rest if rest else ""), status_code=303)
            response.set_cookie(self.cookie, self.token.decode(), httponly=True, samesite="lax", path="/")
            return response
        if self._authorized(headers):
            return None
        response = _error(401, "this server needs its token: send `Authorization: Bearer TOKEN`, or open a page "
                               "once with ?token=TOKEN (the token is printed when `ffkv serve` starts)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def host_ok(self, header: str) -> bool:
        name = normal_host(_host_name(header))
        return bool(name) and (is_loopback(name) or name in self.allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        headers = Headers(scope=scope)
        if not self.host_ok(headers.get("host", "")):
            await _error(400, "this server only answers requests addressed to localhost or a name it was given "
                              "(Host header; `ffkv serve --allowed-host NAME` adds one)")(scope, receive, send_secured)
            return
        if self.token is not None:
            refused = self._token_response(scope, headers)
            if refused is not None:
                await refused(scope, receive, send_secured)
                return
        too_large = _error(413, f"the request body is larger than {self.max_body} bytes")
        length = headers.get("content-length")
        if length is not None:
            if not _DIGITS.fullmatch(length.strip()):
                await _error(400, "the Content-Length header is not a number")(scope, receive, send_secured)
                return
            if int(length) > self.max_body:
                await too_large(scope, receive, send_secured)
                return
        # read the whole (bounded) body here, whatever Content-Length said, then hand it to the app
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await too_large(scope, receive, send_secured)
                return
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send_secured)


def create_app(service: Service, allowed_hosts: Iterable[str] = (), token: str | None = None,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The app around a loaded ``Service``. ``allowed_hosts``: names (or addresses) accepted in the Host header
    besides the loopback ones; ``token``: required on every request (pages, static files and API) when given;
    ``max_body``: the largest request body, in bytes."""
    app = FastAPI(title="ffkv", docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages use a CDN
    app.state.service = service
    app.add_middleware(Guard, allowed_hosts=tuple(allowed_hosts), token=token, max_body=max_body)
    shell = (STATIC / "shell.html").read_text()

    def page(name: str, status: int = 200) -> HTMLResponse:
        html = shell.replace("__PAGE__", name).replace("__TITLE__", PAGES[name])
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/api/") or exc.status_code != 404:
            return _error(exc.status_code, str(exc.detail))
        return page("notfound", 404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/api/"):
            return page("notfound", 404)
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(x for x in first["loc"] if x not in ("body", "query", "path"))
        return _error(422, f"invalid request: {where + ': ' if where else ''}{first['msg']}", detail=errors)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        if request.url.path.startswith("/api/"):
            return _error(404, str(exc))
        return page("notfound", 404)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return _error(422, str(exc))

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        response = _error(503, str(exc))
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable):
        return _error(503, str(exc))

    # -- pages ---------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def overview_page():
        return page("overview")

    @app.get("/memory/{layer}/{key}", response_class=HTMLResponse)
    def memory_page(layer: int, key: int):
        service.check_memory(layer, key)
        return page("memory")

    @app.get("/memory")
    def jump(m: str = Query(default="", max_length=40)):
        """The jump box without JavaScript: /memory?m=LAYER:KEY."""
        try:
            layer, key = (int(x) for x in m.replace("/", ":").split(":"))
        except ValueError:
            return page("notfound", 404)
        service.check_memory(layer, key)
        return RedirectResponse(f"/memory/{layer}/{key}", status_code=303)

    @app.get("/search", response_class=HTMLResponse)
    def search_page():
        return page("search")

    @app.get("/debug", response_class=HTMLResponse)
    def debug_page():
        return page("debug")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- API -----------------------------------------------------------------------------------------------
    @app.get("/api/health")
    def health():
        return {"ok": True}

    @app.get("/api/overview")
    def overview():
        return service.overview()

    @app.get("/api/memory/{layer}/{key}")
    def memory(layer: int, key: int, n: int = Query(default=10, ge=1, le=1000)):
        return service.memory(layer, key, n)

    @app.get("/api/search")
    def search(promotes: str | None = Query(default=None, min_length=1, max_length=MAX_QUERY_CHARS),
               text: str | None = Query(default=None, min_length=1, max_length=MAX_QUERY_CHARS),
               concept: str | None = Query(default=None, min_length=1, max_length=MAX_QUERY_CHARS),
               limit: int = Query(default=20, ge=1, le=MAX_LIMIT),
               projection: Literal["raw", "normed"] = "raw",
               min_sim_corr: float | None = Query(default=None, ge=-1, le=1, allow_inf_nan=False),
               min_f1: float | None = Query(default=None, ge=0, le=1, allow_inf_nan=False),
               kind: Literal["shallow", "semantic", "both", "none"] | None = None):
        """A plain `def`: FastAPI runs it in its thread pool, so a concept search's embedding (and the first
        one's loading of the embedder) never blocks the event loop."""
        if sum(q is not None for q in (promotes, text, concept)) != 1:
            return _error(422, "give exactly one of promotes=TOKEN, text=QUERY or concept=QUERY")
        if concept is None and (min_sim_corr is not None or min_f1 is not None or kind is not None):
            return _error(422, "min_sim_corr, min_f1 and kind filter a concept search only (concept=QUERY)")
        if promotes is not None:
            return service.search_promotes(promotes, projection, limit)
        if concept is not None:
            return service.search_concept(concept, limit, min_sim_corr, min_f1, kind)
        return service.search_text(text, limit)

    @app.post("/api/run")
    def run(body: RunIn):
        return service.run(body.prompt, [iv.to_intervention() for iv in body.interventions], body.top)

    @app.post("/api/generate")
    def generate(body: GenerateIn):
        return service.generate(body.prompt, [iv.to_intervention() for iv in body.interventions],
                                body.max_new_tokens)

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    def unknown(rest: str):
        return _error(404, "no such API endpoint")

    return app


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FfkvError(f"cannot listen on {host} port {port}: {exc.strerror or exc}")


def serve(atlas: str, host: str = "127.0.0.1", port: int = 8000, allowed_hosts: Iterable[str] = (),
          token: str | None = None, model: str | None = None, device: str = "cpu", dtype: str = "float32",
          queue_size: int = QUEUE_SIZE, queue_timeout: float = QUEUE_TIMEOUT) -> None:
    """Load the atlas and its model, build the search index if needed, and serve until interrupted. The Host
    header must name a loopback address, ``host`` itself (unless it is 0.0.0.0 or ::) or one of ``allowed_hosts``.
    On a non-loopback ``host`` every request needs ``token`` (a new random one, printed, when not given)."""
    import uvicorn

    _check_port(host, port)  # before the model loads: a busy port is a one-line error, not a traceback later
    service = Service(atlas, model=model, device=device, dtype=dtype, progress=True, queue_size=queue_size,
                      queue_timeout=queue_timeout)
    if token is None and not is_loopback(host):
        token = new_token()
    accepted = list(allowed_hosts) + ([] if is_unspecified(host) or is_loopback(host) else [host])
    app = create_app(service, allowed_hosts=accepted, token=token)
    shown = f"[{host}]" if ":" in host else host
    print(f"ffkv: serving {service.atlas.path} on http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    if token is not None:
        print(f"ffkv: every request needs the token {token}: open http://{shown}:{port}/?token={token} once "
              "in a browser, or send `Authorization: Bearer TOKEN`", flush=True)
    if is_unspecified(host) and not accepted:
        print("ffkv: only requests addressed to a loopback name are answered; add --allowed-host NAME for each "
              "name or address clients use to reach this machine", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
