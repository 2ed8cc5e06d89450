"""The daemon: one event loop (uvloop) running the iSCSI engine and the REST API.

Start-up order: state database -> engine -> config service (seeds an empty state dir and
applies the model, which starts the portals) -> REST API -> ``api-endpoint.json`` for a
local CLI -> READY=1 to systemd.  SIGTERM/SIGINT stop in the reverse order: STOPPING=1,
the API first (no more changes), then the engine, which asks every session to log out,
lets in-flight commands finish or aborts them, and flushes the LUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from .api_endpoint import ApiEndpoint, local_url
from .cluster.member import ClusterMember, GatewayOptions
from .cluster.rados import ClusterSettings
from .config.backups import AutoBackup
from .config.service import ConfigService
from .config.store import ADMIN_PASSWORD_FILE, ConfigStore, StateDbError
from .iscsi.write_budget import DEFAULT_TOTAL as DEFAULT_WRITE_BUDGET
from .isns import IsnsClient, default_entity_id, desired_state
from .isns.registration import DesiredState, Registration
from .jobs import SanitizeJobs
from .server.admission import raise_fd_limit
from .server.engine import Engine
from .server.portal_groups import check_bindable
from .systemd import Notifier
from .values import format_listen

log = logging.getLogger("pyscsi_target")

# EX_CONFIG (sysexits.h): restarting cannot help; the unit's RestartPreventExitStatus= names it.
EXIT_BAD_STATE = 78
STATUS_INTERVAL = 10.0  # seconds between STATUS= refreshes (sent only when the text changes)
# Seconds between re-reads of block-device sizes (one ioctl per Disk LU): a zvol or LV grown
# underneath reaches the initiators as CAPACITY DATA HAS CHANGED without a reload.
SIZE_RESCAN_INTERVAL = 10.0


@dataclass
class DaemonOptions:
    state_dir: Path
    portals: list[tuple[str, int]]
    api: tuple[str, int]
    extent_roots: list[Path]
    api_cert: Path | None = None
    api_key_file: Path | None = None
    demo: bool = False
    ceph: ClusterSettings = field(default_factory=ClusterSettings)  # RBD extents' defaults
    gateway: GatewayOptions | None = None  # one gateway of a cluster (serve --cluster)
    write_budget: int = DEFAULT_WRITE_BUDGET  # bytes of WRITE data all sessions may hold at once


def _status_line(engine: Engine, service: ConfigService, api_url: str) -> str:
    model = service.model
    portals = ", ".join(format_listen(h, p) for h, p in engine.listen_addresses()) or "no portal"
    return (  # counts only: this runs every STATUS_INTERVAL, whatever the number of sessions
        f"{len(model.targets)} target(s), {len(model.lun_maps)} LUN(s), {len(engine.connections)} connection(s); "
        f"portals {portals}; API {api_url}"
    )


async def _refresh_status(notifier: Notifier, engine: Engine, service: ConfigService, api_url: str) -> None:
    last = ""
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        text = _status_line(engine, service, api_url)
        if text != last:
            notifier.status(text)
            last = text


def _reload(engine: Engine) -> None:
    changed = engine.logical_units.rescan_sizes()
    log.info("SIGHUP: device sizes re-read, %d LU(s) changed%s", len(changed),
             f" ({', '.join(changed)})" if changed else "")


async def _watch_sizes(engine: Engine) -> None:
    while True:
        await asyncio.sleep(SIZE_RESCAN_INTERVAL)
        engine.logical_units.rescan_sizes()  # each LU that changed logs it


async def serve(opts: DaemonOptions, ready: asyncio.Event | None = None) -> int:
    from rest.app import make_app, ssl_context_from_files, start_api  # aiohttp only when serving
    from rest.native import JOBS_KEY

    notifier = Notifier.from_env()
    notifier.status("opening the state database")
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    store = ConfigStore(opts.state_dir)  # StateDbError if it exists but is empty or damaged
    backups = AutoBackup(store.path)
    raise_fd_limit()  # before the engine sizes its descriptor reserve from it
    engine = Engine(opts.state_dir, pr_store=store.pr_store, ceph=opts.ceph, write_budget=opts.write_budget)
    service = ConfigService(store, engine, extent_roots=opts.extent_roots)
    service.ceph = opts.ceph
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (systemctl reload): re-read device sizes now, as FreeNAS's `ctld reload` after a
    # zvol grew (democratic-csi's volume expansion).
    loop.add_signal_handler(signal.SIGHUP, _reload, engine)

    isns = IsnsClient()
    entity_id = default_entity_id(opts.state_dir)

    def publish_isns() -> None:  # every apply, whether or not every portal bound
        if not engine.model.global_config.isns_servers.strip():
            # No server to register with: skip building the registration (every target's portals),
            # which would cost every change in proportion to the configuration's size.
            isns.update(DesiredState((), Registration(entity_id)))
            return
        isns.update(desired_state(engine.model, engine.bound_portals(), entity_id=entity_id))

    engine.on_applied.append(publish_isns)
    engine.on_applied.append(backups.changed)  # the first apply (start-up) takes one at once
    runner = None
    status_task: asyncio.Task[None] | None = None
    sizes_task: asyncio.Task[None] | None = None
    member = ClusterMember(opts.gateway, opts.ceph) if opts.gateway is not None else None
    try:
        default_portals = [format_listen(h, p) for h, p in opts.portals]
        if member is not None:
            notifier.status("joining the gateway cluster")
            await member.connect()
            await member.join(service, store, engine)
            default_portals = []  # this gateway's own portal group is made by member.start
        if store.is_empty():
            # A first start whose portal address is taken (another target on 3260) stops here,
            # with one line and an untouched state dir: the next start still seeds it (and --demo).
            for host, port in opts.portals if member is None else ():
                check_bindable(host, port)
        notifier.status("applying the configuration (portals, targets, LUNs)")
        await service.start(default_portals=default_portals, demo=opts.demo)
        if member is not None:
            await member.start(service, engine, opts.portals)
        notifier.status("starting the REST API")
        ssl_ctx = ssl_context_from_files(opts.api_cert, opts.api_key_file) if opts.api_cert else None
        app = make_app(service, store)
        app[JOBS_KEY].add_source(SanitizeJobs(lambda: ((lu.settings.name, lu) for lu in engine.logical_units.all())))
        runner = await start_api(app, opts.api[0], opts.api[1], ssl_ctx)
        api_port = runner.addresses[0][1] if runner.addresses else opts.api[1]
        api_url = local_url("https" if ssl_ctx else "http", opts.api[0], api_port)
        ApiEndpoint(
            url=api_url,
            user=os.environ.get("PYSCSI_TARGET_ADMIN_USER") or "admin",
            pid=os.getpid(),
            cafile=str(opts.api_cert.resolve()) if opts.api_cert else None,
            password_file=None
            if os.environ.get("PYSCSI_TARGET_ADMIN_PASSWORD")
            else str(opts.state_dir / ADMIN_PASSWORD_FILE),
        ).write(opts.state_dir)
        # What exists now (modules, the API, the configuration and its runtime) lives as long as
        # the daemon: out of the cyclic collector's way, so that a full collection scans only
        # what was created since.  With 1000 targets a full collection otherwise held the event
        # loop 20-45 ms, a stall every I/O in flight waited out.
        gc.collect()
        gc.freeze()
        log.info("pyscsi-target ready (state dir %s)", opts.state_dir)
        isns.start()
        # Every portal listens (engine.apply awaited the listeners) and so does the API.
        notifier.ready(_status_line(engine, service, api_url))
        notifier.start_watchdog()
        status_task = loop.create_task(_refresh_status(notifier, engine, service, api_url))
        sizes_task = loop.create_task(_watch_sizes(engine))
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down")
        notifier.stopping(f"stopping: logging out {len(engine.connections)} connection(s)")
    finally:
        for task in (status_task, sizes_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        ApiEndpoint.remove(opts.state_dir, os.getpid())
        if runner is not None:
            await runner.cleanup()
        await isns.close()  # deregisters (bounded) while the portals still exist
        await engine.shutdown()
        if member is not None:
            await member.stop()  # after the LUs closed: the others take them over at once
        await backups.close()
        store.close()
        await notifier.close()
    return 0


def run(opts: DaemonOptions) -> int:
    import uvloop

    try:
        return uvloop.run(serve(opts))
    except StateDbError as exc:  # one line, no traceback: the message says what to do
        log.error("cannot start: %s", exc)
        Notifier.from_env().status("cannot start: the state database is empty or damaged")
        return EXIT_BAD_STATE
    except OSError as exc:  # a portal or the API address cannot be bound
        log.error("cannot start: %s", exc)
        Notifier.from_env().status(f"cannot start: {exc}")
        return 1
