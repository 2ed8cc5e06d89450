"""REST/config test harness: a ConfigService over a temporary state dir with a recording engine.

``FakeEngine`` is a test double of server.engine.Engine's config-facing API: it records every
applied model, reports configurable session counts and can be told to fail the next apply.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from pyscsi_target.config.model import ConfigModel
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore
from rest import make_app

ADMIN = ("admin", "s3cret-pass")
FN = "/api/v1.0/services/iscsi"
HN = "/v9/storage/iscsi-targets"


def basic(user: str = ADMIN[0], password: str = ADMIN[1]) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class FakeEngine:
    def __init__(self) -> None:
        self.applied: list[ConfigModel] = []
        self.sessions: dict[int, int] = {}
        self.fail_next: Exception | None = None

    async def apply(self, model: ConfigModel) -> None:
        await asyncio.sleep(0)  # a real engine awaits listeners; let other requests interleave
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.applied.append(model)

    def session_count(self, target_id: int) -> int:
        return self.sessions.get(target_id, 0)

    @property
    def last(self) -> ConfigModel:
        return self.applied[-1]

    @property
    def model(self) -> ConfigModel:
        """The model last applied (the real Engine has the same attribute)."""
        return self.applied[-1]


async def run_tool(*cmd: str, timeout: float = 30) -> tuple[int, str]:
    """Run an initiator tool (iscsi-inq, iscsi-ls, qemu-io...) without blocking the loop the
    target under test runs on; returns (exit status, stdout and stderr together)."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), timeout))[0].decode()
    return proc.returncode or 0, out


def aio(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an async test function with asyncio.run (no pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


class Harness:
    def __init__(
        self,
        state_dir: Path,
        engine: Any,
        store: ConfigStore,
        service: ConfigService,
        client: TestClient | None,
        base_url: str = "",
        session: Any = None,
    ) -> None:
        self.state_dir = state_dir
        self.engine = engine
        self.store = store
        self.service = service
        self.client = client
        self.base_url = base_url
        self.session = session
        self.real = session is not None

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any, Any]:
        hdrs = dict(basic() if auth else {})
        hdrs.update(headers or {})
        kwargs: dict[str, Any] = {"headers": hdrs, "allow_redirects": False}
        if raw is not None:
            kwargs["data"] = raw
            hdrs.setdefault("Content-Type", "application/json")
        elif body is not None:
            kwargs["json"] = body
        if self.session is not None:
            resp = await self.session.request(method, self.base_url + path, **kwargs)
        else:
            assert self.client is not None
            resp = await self.client.request(method, path, **kwargs)
        text = await resp.text()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        return resp.status, data, resp.headers


@contextlib.asynccontextmanager
async def harness(
    state_dir: Path,
    *,
    portals: tuple[str, ...] = ("127.0.0.1:3260",),
    extent_roots: list[Path] | None = None,
    real_engine: bool = False,
) -> AsyncIterator[Harness]:
    """A ConfigService + REST app on loopback.

    ``real_engine``: the daemon's own pieces (server.engine.Engine with real portals and LUNs,
    the API on a real TCP port); otherwise a FakeEngine and aiohttp's test server.
    """
    if real_engine:
        async with _real_harness(state_dir, portals, extent_roots) as h:
            yield h
        return
    engine = FakeEngine()
    store = ConfigStore(state_dir)
    service = ConfigService(store, engine, extent_roots=extent_roots)
    await service.start(default_portals=portals)
    app = make_app(service, store, admin=ADMIN)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Harness(state_dir, engine, store, service, client)
    finally:
        await client.close()
        store.close()


@contextlib.asynccontextmanager
async def _real_harness(
    state_dir: Path, portals: tuple[str, ...], extent_roots: list[Path] | None
) -> AsyncIterator[Harness]:
    import aiohttp

    from pyscsi_target.server.engine import Engine
    from rest import start_api

    from .net import free_port

    store = ConfigStore(state_dir)
    engine = Engine(state_dir, pr_store=store.pr_store)
    service = ConfigService(store, engine, extent_roots=extent_roots)
    runner = None
    try:
        await service.start(default_portals=portals)
        port = free_port()
        runner = await start_api(make_app(service, store, admin=ADMIN), "127.0.0.1", port)
        async with aiohttp.ClientSession() as session:
            yield Harness(state_dir, engine, store, service, None, f"http://127.0.0.1:{port}", session)
    finally:
        if runner is not None:
            await runner.cleanup()
        await engine.shutdown()
        store.close()
