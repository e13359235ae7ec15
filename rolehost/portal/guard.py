"""Who may talk to the portal: a page that can reboot instances is a target, since any
site the user visits can make the browser send requests to 127.0.0.1.

Every request must carry the portal's token: in the first URL (`/?token=...`), then in
an HttpOnly SameSite=Strict cookie, which the browser never sends with a request another
site started. Its `Host` must name the listen address, so that a name rebound to
127.0.0.1 (DNS rebinding) reaches nothing. A request that changes something must be a
POST from the portal's own page: its `Origin` the portal's, and the token in a header,
which only a script of that origin can read from the page and set.
"""

from __future__ import annotations

import hmac
import html
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

COOKIE = "rolehost_portal"
HEADER = "x-rolehost-token"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def host_names(host: str, port: int) -> set[str]:
    """The `Host` headers that name the listen address: a loopback one is also
    `localhost`, the name a user may type."""
    shown = f"[{host}]" if ":" in host else host
    names = {shown}
    if host in ("127.0.0.1", "::1"):
        names.add("localhost")
    return {f"{name}:{port}" for name in names}


def refusal(status: int, why: str) -> bytes:
    """The page a refused request gets: what went wrong and how to get in."""
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>rolehost portal: {status}</title></head><body>
<h1>rolehost portal: access refused</h1><p>{html.escape(why)}</p>
<p>Open the address that <code>rolehost portal</code> printed on its first line,
<code>portal: http://HOST:PORT/?token=TOKEN</code>. The token is new each time the portal
starts: if you restarted it, use the new address.</p></body></html>""".encode()


class Guard:
    """ASGI middleware that refuses every request the portal's own page did not send."""

    def __init__(self, app: App, token: str, host: str, port: int) -> None:
        self.app, self.token = app, token
        self.hosts = host_names(host, port)
        self.origins = {f"http://{name}" for name in self.hosts}

    def _valid(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _hardened(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        if headers.get("host") not in self.hosts:
            await _refuse(send, 403, "this address is not the portal's (the request named "
                          "another host: a page of another site may have tried to reach it)")
            return
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header: no token from it
            cookie = SimpleCookie()
        from_cookie = cookie[COOKIE].value if COOKIE in cookie else None
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            if method != "POST":
                await _refuse(send, 405, f"{method} is not a request the portal answers")
            elif headers.get("origin") not in self.origins:
                await _refuse(send, 403, "a change must come from the portal's own page "
                              "(the request's Origin is not the portal's)")
            elif not (self._valid(headers.get(HEADER)) and self._valid(from_cookie)):
                await _refuse(send, 403, "a change must carry the portal's token")
            else:
                await self.app(scope, receive, send)
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        given = [value for key, value in query if key == "token"]
        if given:
            if not self._valid(given[0]):
                await _refuse(send, 403, "this token is not the portal's")
                return
            # The token moves to a cookie, and out of the address bar and the history.
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = scope["path"] + (f"?{rest}" if rest else "")
            await send({"type": "http.response.start", "status": 303, "headers": [
                (b"location", location.encode()),
                (b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; "
                                f"Path=/".encode()),
                (b"cache-control", b"no-store"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if from_cookie is None:
            await _refuse(send, 401, "this request carries no token")
        elif not self._valid(from_cookie):
            await _refuse(send, 403, "this token is not the portal's")
        else:
            await self.app(scope, receive, send)


# No page of the portal may be framed by another (a click on its buttons, disguised),
# and no script or style but its own runs in it.
HARDENING = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
             (b"referrer-policy", b"no-referrer"),
             (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; "
                                          b"form-action 'self'; base-uri 'none'")]


def _hardened(send: Send) -> Send:
    async def hardened(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *HARDENING]
        await send(message)

    return hardened


async def _refuse(send: Send, status: int, why: str) -> None:
    body = refusal(status, why)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
