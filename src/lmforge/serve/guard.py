"""Who may talk to the server from a browser: the Host header and the Origin of cross-site requests.

A server on 127.0.0.1 is reachable from every web page its user opens. Two attacks follow, and this ASGI
middleware (outermost but for the request counter) refuses both, on every route:

- DNS rebinding: a page on evil.example re-points its own name at 127.0.0.1 and then reads the answers as
  same-origin. Its requests carry `Host: evil.example`. So a Host that is a name must be one the server
  knows: `localhost` (and `*.localhost`, which browsers never resolve elsewhere), the names given with
  `--allowed-hosts` (`*` allows any), and the machine's own names when it listens beyond loopback. A Host
  that is an IP address is always accepted: a rebinding attack needs a name, and a page can read no answer
  from an address that is not its own origin.
- Blind cross-site requests (CSRF): any page can POST a "simple" request (a form, text/plain) that runs a
  generation or, with other routes, changes state, even though it cannot read the answer. Browsers send an
  `Origin` header with every such request, so a request whose Origin is neither this server itself (the
  chat page) nor named with `--cors-origin` (`*`: any) is refused with a 403. A named origin also gets CORS
  headers and preflight (OPTIONS) answers, so a web app there can use the API. Clients that are not
  browsers send no Origin and pass.

Both refusals are in OpenAI's error shape (400 invalid_host, 403 cross_origin_refused).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost",)


def machine_names(bind_host: str) -> list[str]:
    """Host names that reach this server besides IP literals: the bound name itself, and the machine's own
    names when it listens beyond loopback (0.0.0.0, ::, or a LAN address)."""
    names = []
    try:
        ip = ipaddress.ip_address(bind_host.strip("[]"))
    except ValueError:
        return [bind_host.lower()]  # bound to a name
    if not ip.is_loopback:
        for name in (socket.gethostname(), socket.getfqdn()):
            if name and name.lower() not in names:
                names.append(name.lower())
    return names


def _host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _origin_host(origin: str) -> str | None:
    """'http://127.0.0.1:8000' -> '127.0.0.1:8000' (default ports dropped); None if it is not a URL origin."""
    try:
        u = urlsplit(origin)
        port = u.port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    default = {"http": 80, "https": 443}[u.scheme]
    return host if port in (None, default) else f"{host}:{port}"


def _same_host(origin_host: str, host_header: str) -> bool:
    h = host_header.strip().lower()
    for suffix in (":80", ":443"):
        h = h.removesuffix(suffix)
    return origin_host.lower() == h


class Guard:
    """Pure ASGI: checks Host and Origin before the app sees the request; adds CORS headers for allowed
    origins. allowed_hosts: names accepted besides IP literals and localhost ("*": any). cors_origins:
    origins (scheme://host[:port]) whose pages may call the API ("*": any)."""

    def __init__(self, app, allowed_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()):
        self.app = app
        self.hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.origins = {o.strip().rstrip("/").lower() for o in cors_origins if o.strip()}

    def host_ok(self, host: str | None) -> bool:
        if host is None or "*" in self.hosts:
            return True  # HTTP/1.0 without Host: no browser sends that
        name = _host_name(host)
        return (_is_ip(name) or name in LOOPBACK_NAMES or name.endswith(".localhost") or name in self.hosts)

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/").lower() in self.origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host")
        if not self.host_ok(host):
            return await _refuse(send, 400, f"The Host header {host!r} is not one this server answers to (a "
                                            "defence against DNS rebinding). Start it with --allowed-hosts "
                                            f"{_host_name(host or '')} to accept that name.", "invalid_host")
        origin = headers.get("origin")
        if origin is None:
            return await self.app(scope, receive, send)
        oh = _origin_host(origin)
        if oh is not None and host is not None and _same_host(oh, host):
            return await self.app(scope, receive, send)  # the server's own page
        if not self.origin_allowed(origin):
            return await _refuse(send, 403, f"Cross-origin requests from {origin!r} are refused. Start the server "
                                            f"with --cors-origin {origin} to let pages of that site use the API.",
                                 "cross_origin_refused")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            asked = headers.get("access-control-request-headers", "authorization, content-type")
            await send({"type": "http.response.start", "status": 204, "headers": cors + [
                (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                (b"access-control-allow-headers", asked.encode("latin-1")),
                (b"access-control-max-age", b"600")]})
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


async def _refuse(send, status: int, message: str, code: str) -> None:
    kind = "permission_error" if status == 403 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
