"""Fallback HTTP load generator, used only when ``wrk`` is not installed.

A bounded asyncio client on raw sockets: ``--connections`` keep-alive connections send the
GET scenario's request back to back for ``--duration`` seconds (reconnecting whenever the
server closes, as gunicorn's sync worker does after every response) and report requests
per second as JSON.  It runs in its own process, like wrk, so it does not share the GIL
with the server under test.  It is slower than wrk, so its figures are lower bounds on
what the server can do; the report says which generator produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


async def client(
    host: str, port: int, request: bytes, deadline: float, counts: dict[str, int]
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
            counts["requests"] += 1
            if not 200 <= status < 400:
                counts["non2xx"] += 1
            if close:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            counts["errors"] += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def run(
    host: str, port: int, path: str, headers: list[str], conns: int, duration: float
) -> dict[str, float]:
    head = [f"GET {path} HTTP/1.1"] + headers + ["", ""]
    request = "\r\n".join(head).encode()
    counts = {"requests": 0, "non2xx": 0, "errors": 0}
    start = time.monotonic()
    deadline = start + duration
    await asyncio.gather(*(client(host, port, request, deadline, counts) for _ in range(conns)))
    elapsed = time.monotonic() - start
    return {
        "requests": counts["requests"],
        "rps": counts["requests"] / elapsed,
        "non2xx": counts["non2xx"],
        "errors": counts["errors"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0)
    a = p.parse_args()
    result = asyncio.run(run("127.0.0.1", a.port, a.path, a.header, a.connections, a.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
