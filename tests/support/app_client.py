"""A synchronous test client for the real app: httpx over ASGITransport, lifespan included.

Starlette's TestClient warns under this httpx version (and pytest turns warnings into errors), so
the app runs on a portal thread's event loop instead — like under uvicorn, the Redis store's
connections stay on the loop that made them.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AbstractContextManager
from functools import partial
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI


class AppClient:
    """A synchronous client for one app: httpx over ASGITransport, run in a portal thread.

    The app's lifespan runs on the portal's event loop, like under uvicorn, so the Redis store's
    connections (bound to one loop) stay on the loop that made them.
    """

    def __init__(self, app: FastAPI, raise_app_exceptions: bool = True) -> None:
        self.app = app
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._lifespan: AbstractAsyncContextManager[Any] = app.router.lifespan_context(app)
        try:
            self.portal.call(self._lifespan.__aenter__)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        self._http = httpx.AsyncClient(transport=transport, base_url="http://mtrank.test")

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        response: httpx.Response = self.portal.call(partial(self._http.request, method, url, **kw))
        return response

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def close(self) -> None:
        try:
            self.portal.call(self._http.aclose)
            self.portal.call(self._lifespan.__aexit__, None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)
