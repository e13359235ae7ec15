"""Heads: what the relay writes before a body, and the relay's own answers.

The request head sent to an instance and the response head sent to the client, each
with the hop-by-hop fields dropped and the framing the relay writes itself; the checks
a request head must pass on its way (one Host, an origin-form target); chunk framing;
the status lines; and the balancer's canned replies (400, 431, 502, 503). A response
head the relay cannot pass on faithfully raises `BadResponse`."""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any, Final

import httptools

if TYPE_CHECKING:
    from rolehost.balancer.proxy.backend import _ResponseParser
    from rolehost.balancer.proxy.client import HttpClient, Request


# Final: mypyc then reads these as statics, not from the module's dict on every use.
# Hop-by-hop headers, and the framing headers the proxy writes itself.
_HOP: Final = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
               b"upgrade", b"transfer-encoding", b"content-length"}
# Their lengths: most headers are told apart from them without lowering and hashing.
_HOP_LENGTHS: Final = frozenset(len(name) for name in _HOP)
# A request head larger than this (its fields: names and values, a chunked body's
# trailer fields too) is answered 431, a response head (its reason and fields, its
# interim answers' and trailer's too) fails as a 502: httptools keeps a field whole
# until it ends, and the relay the head, so nothing else bounds them. nginx takes 32 KiB
# at most (large_client_header_buffers 4 8k), HAProxy about 15 KiB (tune.bufsize 16k).
HEAD_LIMIT: Final = 64 * 1024
# More header fields than this (trailer fields too) are answered 431, or a response's
# fail as a 502: each costs the relay work however small (16,000 of them, on 4
# connections, took the controller's CPU). Apache's LimitRequestFields and HAProxy's
# tune.http.maxhdr (101, for responses too) are the same 100.
MAX_FIELDS: Final = 100
# A request target longer than this is answered 414: nginx's and Apache's 8 KiB (a
# request line over large_client_header_buffers' 8k, LimitRequestLine's 8190).
URL_LIMIT: Final = 8 * 1024


class Refused(Exception):
    """Raised in a parser callback: the request is answered `answer`, and the connection
    closes after it (httptools raises its own error, with this one as its context)."""

    def __init__(self, status: int, why: bytes) -> None:
        super().__init__(why.decode())
        self.answer = _reply_bytes(status, why)


class BadResponse(Exception):
    """An instance's response head that the relay will not pass on: over a bound, or
    framed or spelt so that the client could read it otherwise than the relay did. Raised
    in a response parser's callback (httptools raises its own error, with this one as its
    context) or while the head is rewritten; the request fails as if the instance had
    closed, and the connection to it is closed."""


# What a status line's reason may hold (RFC 9112, 4: HTAB, SP, VCHAR, obs-text): httptools
# passes NUL, DEL and other controls on, and the relay writes the reason to the client.
_BAD_REASON: Final = re.compile(rb"[^\t\x20-\x7e\x80-\xff]")


def _check_reason(reason: bytes) -> None:
    if _BAD_REASON.search(reason) is not None:
        raise BadResponse("a control character in the response's reason phrase")


def _check_coding(response: _ResponseParser, coding: bytes) -> None:
    """A response's Transfer-Encoding (all its fields, joined): chunked at most once, and
    last (RFC 9112, 6.1). The relay re-chunks what it relays: `chunked, chunked` or
    `chunked, gzip` would reach the client with chunked twice, for it to unwrap once or
    twice. In an HTTP/1.0 response the framing is faulty by definition: the response is
    relayed as parsed, and the connection is not reused."""
    codings = [token.strip() for token in coding.lower().split(b",")]
    chunked = codings.count(b"chunked")
    if chunked > 1 or (chunked and codings[-1] != b"chunked"):
        raise BadResponse("a response chunked twice, or not last")
    if response.parser.get_http_version() == "1.0":
        response.keep_alive = False


def _count(headers: list[tuple[bytes, bytes]], usual: bytes, lowered: bytes) -> int:
    """How many fields are named `usual`, in any case (`lowered`: the same, lower case).
    A loop, not sum() of a generator (an object per call), and the usual spelling tried
    before lowering: it runs for every request."""
    count = 0
    for name, _ in headers:
        if len(name) == len(usual) and (name == usual or name.lower() == lowered):
            count += 1
    return count


def _origin_form(request: Request, hosts: int) -> None:
    """An absolute-form target (`GET http://host/path`) is passed on in origin-form, with
    its authority as the Host: a server ignores the Host field then (RFC 9112, 3.2.2),
    so the instance must not see one that says otherwise."""
    if request.url[:7].lower() != b"http://" and request.url[:8].lower() != b"https://":
        raise Refused(400, b"a request target is a path or an http(s) URL")
    try:
        # Any: httptools gives None for a part the URL lacks, which its stub does not say
        url: Any = httptools.parse_url(request.url)
    except httptools.HttpParserInvalidURLError:
        raise Refused(400, b"malformed request target") from None
    if not url.host or url.userinfo:  # userinfo is an error in an http URI (RFC 9110, 4.2.4)
        raise Refused(400, b"malformed request target")
    request.url = (url.path or b"/") + (b"?" + url.query if url.query else b"")
    host = b"[%s]" % url.host if b":" in url.host else url.host  # IPv6, bracketed again
    authority = host + (b":%d" % url.port if url.port else b"")
    headers = request.headers
    if hosts:
        headers[:] = [(n, authority if n.lower() == b"host" else v) for n, v in headers]
    else:
        headers.append((b"Host", authority))


def _has_length(request: Request) -> bool:
    """A Content-Length other than 0."""
    return any(n.lower() == b"content-length" and v.strip() not in (b"", b"0")
               for n, v in request.headers)


def _request_head(request: Request, client_ip: bytes, proto: bytes, upgrade: bool = False
                  ) -> tuple[bytes, bool]:
    """The head to send the instance, and whether the body goes chunked. `proto`: what
    the client spoke to the balancer (http, or https it terminated)."""
    # mypyc builds each `%` of bytes in one allocation; the join copies a few pieces.
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method, request.url)]
    forwarded = coding = length = b""
    named: set[bytes] | None = None
    for name, value in request.headers:
        size = len(name)
        # 15: x-forwarded-for; x-forwarded-proto has transfer-encoding's 17
        if size in _HOP_LENGTHS or size == 15:
            lowered = name.lower()
            if lowered in _HOP:
                if lowered == b"transfer-encoding":
                    coding = b"%s, %s" % (coding, value) if coding else value
                elif lowered == b"content-length":
                    length = length or value
                elif lowered == b"connection":
                    named = _named(value, named)
                if not (upgrade and lowered in (b"upgrade", b"connection")):
                    continue
            elif lowered == b"x-forwarded-for":  # the hops so far, in their order
                forwarded = b"%s, %s" % (forwarded, value) if forwarded else value
                continue
            elif lowered == b"x-forwarded-proto":
                continue  # what the client spoke to the balancer, set below
        parts.append(b"%s: %s\r\n" % (name, value))
    if named:
        parts[1:] = _without(parts[1:], named)
    forwarded = b"%s, %s" % (forwarded, client_ip) if forwarded else client_ip
    chunked = bool(coding)
    if chunked:  # its codings kept, chunked last (httptools refuses a request otherwise)
        framing = b"Transfer-Encoding: %s\r\n" % coding
    elif length:
        framing = b"Content-Length: %s\r\n" % length
    else:
        framing = b""
    parts.append(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n%s%s\r\n"
                 % (forwarded, proto, b"" if upgrade else b"Connection: keep-alive\r\n",
                    framing))
    return b"".join(parts), chunked


# What a Connection header's tokens never take away: its options, which name no other
# header field (or only a hop-by-hop one anyway), and Host, which every HTTP/1.1 request
# needs (`Connection: close, Host` would have the instance get a request without one).
_CONNECTION_OPTIONS: Final = {b"keep-alive", b"close", b"upgrade", b"host"}


def _named(connection: bytes, named: set[bytes] | None) -> set[bytes] | None:
    """Add the header fields a Connection header names to `named`: they are hop-by-hop
    too, and go no further (RFC 9110, 7.6.1). None while it names none."""
    for token in connection.lower().split(b","):
        token = token.strip()
        if token and token not in _CONNECTION_OPTIONS:
            named = named or set()
            named.add(token)
    return named


def _without(lines: list[bytes], named: set[bytes]) -> list[bytes]:
    """The header lines ("name: value") of the fields not in `named`."""
    return [line for line in lines if line.split(b":", 1)[0].lower() not in named]


def _chunked_last(coding: bytes) -> bytes:
    """The Transfer-Encoding of a body that goes out chunked: the codings it came with
    (gzip, ...: the relay passes them on untouched), then chunked."""
    if not coding:
        return b"chunked"
    if coding.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
        return coding
    return coding + b", chunked"


def _frame(chunk: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk


def _framing(response: _ResponseParser, request: Request, status: int) -> bytes:
    """How the body reaches the client: its length, re-chunked, or none."""
    if request.method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return b"none"
    if any(n.lower() == b"content-length" for n, _ in response.headers):
        return b"length"
    if any(n.lower() == b"transfer-encoding" for n, _ in response.headers):
        return b"chunked"
    return b"close"  # read until the backend closes; the client gets it chunked


# b"HTTP/1.1 200 OK\r\n" by status, with its reason: a few statuses and reasons in practice.
_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {}


def _head(response: _ResponseParser, request: Request, out: list[bytes]) -> bytes:
    """Append the response's head for the client to `out` (which the body joins, to go out
    in one write); its framing, as `_framing` says, but `raw` where an HTTP/1.0 client
    would get it chunked: the body as it comes, ended by closing the connection."""
    status: int = response.parser.get_status_code()
    reason = response.reason
    cached = _STATUS_LINES.get(status)
    if cached is not None and cached[0] == reason:
        line = cached[1]
    else:  # checked once for each line cached, not for every response
        _check_reason(reason)
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 256 and len(reason) <= 64:
            _STATUS_LINES[status] = (reason, line)
    first = len(out)
    out.append(line)
    length = coding = b""
    named: set[bytes] | None = None
    for name, value in response.headers:
        if len(name) in _HOP_LENGTHS:
            lowered = name.lower()
            if lowered == b"content-length":
                length = length or value
                continue
            if lowered == b"transfer-encoding":
                coding = b"%s, %s" % (coding, value) if coding else value
                continue
            if lowered in _HOP:
                if lowered == b"connection":
                    named = _named(value, named)
                continue
        out.append(b"%s: %s\r\n" % (name, value))
    if named:
        out[first + 1:] = _without(out[first + 1:], named)
    if coding:
        _check_coding(response, coding)
    connection = b"keep-alive" if request.keep_alive else b"close"
    if request.method == b"HEAD" or status == 204 or status == 304 or 100 <= status < 200:
        framing = b"none"
        if length and status >= 200 and status != 204:  # a HEAD's: what a GET would get
            out.append(b"Content-Length: %s\r\nConnection: %s\r\n\r\n" % (length, connection))
        else:
            out.append(b"Connection: %s\r\n\r\n" % connection)
    elif length:
        framing = b"length"
        out.append(b"Content-Length: %s\r\nConnection: %s\r\n\r\n" % (length, connection))
    elif request.http10:  # no chunked coding for HTTP/1.0: closing ends the body
        framing = b"raw"
        out.append(b"Connection: close\r\n\r\n")
    else:  # chunked, or read until the backend closes: the client gets it chunked
        framing = b"chunked" if coding else b"close"
        out.append(b"Transfer-Encoding: %s\r\nConnection: %s\r\n\r\n"
                   % (_chunked_last(coding), connection))
    return framing


def _reply_bytes(status: int, text: bytes, retry_after: bool = False, close: bool = True
                 ) -> bytes:
    """The balancer's own answer; `close`: the connection closes after it, and says so
    (RFC 9112, 9.6)."""
    reasons = {400: b"Bad Request", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
               501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable"}
    extra = (b"Retry-After: 1\r\n" if retry_after else b"") + (
        b"Connection: close\r\n" if close else b"")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, reasons.get(status, b"Error"), len(text), extra, text))


async def _reply(client: HttpClient, status: int, text: bytes, retry_after: bool = False,
                 close: bool = True) -> None:
    client.write(_reply_bytes(status, text, retry_after, close))
    with contextlib.suppress(ConnectionError):
        await client.drain()
