"""Graceful shutdown: SIGTERM lets every request already in flight finish, then exits 0.

To be sure requests are in flight (read by a worker, not waiting in a socket buffer) when the
signal lands, Redis is paused with ``CLIENT PAUSE`` for 2.5 s just before they are sent: each one
parks inside the feature fetch, under a 3 s Redis deadline so it is not degraded either. SIGTERM
arrives 0.5 s into the pause; 1 s later (the supervisor has relayed it) a new connection tries
its luck while the 32 requests are still parked.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from harness.load import _Dropped, _read_response, _request_bytes
from harness.processes import LOOPBACK
from harness.stack import Stack, StackFactory, rank_bodies

pytestmark = pytest.mark.integration
CONNECTIONS, PAUSE_MS, EXIT_LIMIT_S = 32, 2500, 15.0
# uvicorn's supervisor polls for signals every 0.5 s before it relays SIGTERM to the workers:
# a connection made within that window is still served. After it, none is.
RELAY_S = 1.0


async def _send_and_read(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
) -> tuple[int, bytes, bool]:
    reader, writer = conn
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(10):
        return await _read_response(reader)


async def _late_connection(port: int, request: bytes) -> str:
    """What a client connecting after SIGTERM gets: never an answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
    except OSError as e:
        return f"refused: {type(e).__name__}"
    try:
        writer.write(request)
        async with asyncio.timeout(EXIT_LIMIT_S):
            status, _, _ = await _read_response(reader)
        return f"answered {status}"
    except (_Dropped, OSError) as e:
        return f"closed without an answer: {type(e).__name__}"
    finally:
        writer.close()


async def _scenario(stack: Stack) -> dict[str, Any]:
    port = stack.service.port
    bodies = rank_bodies(n=CONNECTIONS, candidates=30, size=10, seed=31)
    requests = [_request_bytes("/rank", b, LOOPBACK, port) for b in bodies]
    conns = [await asyncio.open_connection(LOOPBACK, port) for _ in range(CONNECTIONS)]
    warm = await asyncio.gather(
        *(_send_and_read(c, r) for c, r in zip(conns, requests, strict=True))
    )
    assert [w[0] for w in warm] == [200] * CONNECTIONS

    stack.redis.pause_clients(PAUSE_MS)
    in_flight = [
        asyncio.create_task(_send_and_read(c, r)) for c, r in zip(conns, requests, strict=True)
    ]
    await asyncio.sleep(0.5)
    assert not any(t.done() for t in in_flight), "requests finished before the signal"
    stack.service.signal(signal.SIGTERM)
    signalled = time.monotonic()
    await asyncio.sleep(RELAY_S)
    assert not any(t.done() for t in in_flight), "requests finished before the late connection"
    late = asyncio.create_task(_late_connection(port, requests[0]))
    answers = await asyncio.gather(*in_flight, return_exceptions=True)
    for _, writer in conns:
        writer.close()
    exit_code = await asyncio.to_thread(stack.service.wait, EXIT_LIMIT_S)
    return {
        "answers": answers,
        "exit_code": exit_code,
        "exit_s": time.monotonic() - signalled,
        "late": await late,
    }


def test_sigterm_drains_in_flight_requests_and_exits_zero(
    make_stack: StackFactory, report_figure: Callable[[str, str], None]
) -> None:
    stack = make_stack(MTRANK_REDIS_TIMEOUT_MS="3000")
    outcome = asyncio.run(_scenario(stack))
    report_figure("sigterm_exit_s", f"{outcome['exit_s']:.2f} (late connection: {outcome['late']})")
    answers = outcome["answers"]
    failed = [a for a in answers if not isinstance(a, tuple)]
    assert failed == [], failed[:3]
    assert [a[0] for a in answers] == [200] * CONNECTIONS
    assert all(orjson.loads(a[1])["degraded"] == [] for a in answers)
    assert all(len(orjson.loads(a[1])["items"]) == 10 for a in answers)
    assert all(a[2] for a in answers), "a drained response must say Connection: close"
    assert outcome["exit_code"] == 0
    assert outcome["exit_s"] < EXIT_LIMIT_S
    assert not outcome["late"].startswith("answered"), outcome["late"]
