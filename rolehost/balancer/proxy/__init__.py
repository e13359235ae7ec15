"""Relaying traffic through a balancer: HTTP/1.1 per request, TCP per connection.

HTTP: httptools parses both sides; bodies stream through in chunks (re-framed, never
buffered whole); backend connections are kept alive and reused; a request whose backend
fails before any byte of the response came back is tried once more on another instance
when that is safe (an idempotent method, or nothing of it was sent yet). An Upgrade
request (WebSocket) becomes a tunnel once the instance answers 101.

The HTTP relay is built on protocols, not streams: the usual request (body all in, an
instance in rotation with an idle keep-alive connection) goes from the client's
`data_received` to the instance's transport, and its response from the instance's
`data_received` to the client's transport, with no task, future or buffer copy in
between. Whatever has to wait goes through a task (`HttpClient._serve`).

The modules, each one concept, imported one way (each only from those listed after it):
`client` (a client's connection, its requests and bodies), `tcp` (TCP endpoints),
`tunnel` (Upgrade), `exchange` (a request's attempts on instances), `backend` (a
connection to an instance, its response parser), `heads` (head framing, hop-by-hop
fields, the relay's own replies), `peer` (what both ends of the HTTP relay are) and
`streams` (bytes piped over streams). setup.py compiles them all with mypyc, in one
group with balancer.py.
"""

from __future__ import annotations

from rolehost.balancer.proxy.backend import BackendConnection
from rolehost.balancer.proxy.client import HttpClient
from rolehost.balancer.proxy.tcp import serve_tcp

__all__ = ["BackendConnection", "HttpClient", "serve_tcp"]
