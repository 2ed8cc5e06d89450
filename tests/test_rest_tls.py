"""The API over TLS (--api-cert/--api-key-file) with the same authentication."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from support.net import free_port
from support.rest_harness import ADMIN, FN, FakeEngine, aio, basic

from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore
from rest import make_app, ssl_context_from_files, start_api


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@aio
async def test_api_over_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    store = ConfigStore(tmp_path / "state")
    service = ConfigService(store, FakeEngine())
    await service.start(default_portals=["127.0.0.1:3260"])
    port = free_port()
    runner = await start_api(
        make_app(service, store, admin=ADMIN), "127.0.0.1", port, ssl_context_from_files(cert, key)
    )
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        client_ctx.check_hostname = False
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}{FN}/portal/", headers=basic(), ssl=client_ctx) as r:
                assert r.status == 200 and (await r.json())[0]["iscsi_target_portal_ips"] == ["127.0.0.1:3260"]
            async with session.get(f"https://127.0.0.1:{port}{FN}/portal/", ssl=client_ctx) as r:
                assert r.status == 401
    finally:
        await runner.cleanup()
        store.close()
