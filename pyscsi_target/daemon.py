"""The daemon: one event loop (uvloop) running the iSCSI engine and the REST API.

Start-up order: state database -> engine -> config service (seeds an empty state dir and
applies the model, which starts the portals) -> REST API.  SIGTERM/SIGINT stop in the
reverse order: the API first (no more changes), then the engine, which asks every
session to log out, lets in-flight commands finish or aborts them, and flushes the LUs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from .config.service import ConfigService
from .config.store import ConfigStore
from .isns import IsnsClient, default_entity_id, desired_state
from .server.engine import Engine
from .values import format_listen

log = logging.getLogger("pyscsi_target")


@dataclass
class DaemonOptions:
    state_dir: Path
    portals: list[tuple[str, int]]
    api: tuple[str, int]
    extent_roots: list[Path]
    api_cert: Path | None = None
    api_key_file: Path | None = None
    demo: bool = False


async def serve(opts: DaemonOptions, ready: asyncio.Event | None = None) -> int:
    from rest.app import make_app, ssl_context_from_files, start_api  # aiohttp only when serving

    opts.state_dir.mkdir(parents=True, exist_ok=True)
    store = ConfigStore(opts.state_dir)
    engine = Engine(opts.state_dir, pr_store=store.pr_store)
    service = ConfigService(store, engine, extent_roots=opts.extent_roots)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    isns = IsnsClient()
    entity_id = default_entity_id(opts.state_dir)

    def publish_isns() -> None:  # every apply, whether or not every portal bound
        isns.update(desired_state(engine.model, engine.bound_portals(), entity_id=entity_id))

    engine.on_applied.append(publish_isns)
    runner = None
    try:
        await service.start(default_portals=[format_listen(h, p) for h, p in opts.portals], demo=opts.demo)
        ssl_ctx = ssl_context_from_files(opts.api_cert, opts.api_key_file) if opts.api_cert else None
        runner = await start_api(make_app(service, store), opts.api[0], opts.api[1], ssl_ctx)
        log.info("pyscsi-target ready (state dir %s)", opts.state_dir)
        isns.start()
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down")
    finally:
        if runner is not None:
            await runner.cleanup()
        await isns.close()  # deregisters (bounded) while the portals still exist
        await engine.shutdown()
        store.close()
    return 0


def run(opts: DaemonOptions) -> int:
    import uvloop

    try:
        return uvloop.run(serve(opts))
    except OSError as exc:  # a portal or the API address cannot be bound
        log.error("cannot start: %s", exc)
        return 1
