"""Instructions the relay spends on one response's head, alone: parsed and rewritten.

    python bench/response_head.py [--responses N]

instructions.py counts a whole relayed request, and on a shared machine its figure moves
by a few percent with the health probes and timers that land in its window: too much to
see a change of a few dozen instructions. This counts only the response's side of the
relay, with nothing else running: balancer.py's response (`200 OK`, Content-Type,
Content-Length, a 6-byte body) fed N times to one `_ResponseParser` (one per kept-alive
connection, as the relay does), and its head rewritten for the client by `heads._head`.
valgrind's callgrind counts the process's instructions with N responses and with none;
the difference over N is the cost of one. Run it with the build to measure (the mypyc
one, when rolehost's extensions are built; it says which).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 6\r\n\r\nhello\n")


def relay(responses: int) -> None:
    from rolehost.balancer.proxy.backend import _ResponseParser
    from rolehost.balancer.proxy.client import Request
    from rolehost.balancer.proxy.heads import _head

    request, response = Request(), _ResponseParser()
    for _ in range(responses):
        response.reset()
        response.feed(RESPONSE)
        assert response.complete
        _head(response, request, [])


def counted(responses: int) -> int:
    """The instructions of a process that relays `responses`, under callgrind."""
    with tempfile.NamedTemporaryFile() as out:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}", sys.executable,
             __file__, "--child", str(responses)], capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no count in valgrind's output:\n{done.stderr}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=200_000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        relay(args.child)
        return
    from rolehost.balancer import relay_build

    counted(0)  # once first: what a first run compiles and caches is not counted then
    base, loaded = counted(0), counted(args.responses)
    print(f"relay: {relay_build()}")
    print(f"{args.responses} responses: {loaded - base:,} Ir, "
          f"{(loaded - base) / args.responses:,.1f} Ir per response")


if __name__ == "__main__":
    main()
