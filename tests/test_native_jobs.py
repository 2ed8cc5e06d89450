"""Jobs with progress in the native namespace: extent creation (sparse, preallocated,
zero-filled), growth, raw image import, cancellation, and SANITIZE progress as jobs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from support.rest_harness import FN, Harness, aio, basic, harness

from pyscsi_target.jobs import FAILED, RUNNING, JobRegistry, SanitizeJobs

NATIVE = "/api/pyscsi/v1"
GiB = 1 << 30


async def wait_job(h: Harness, location: str, timeout: float = 120.0) -> tuple[dict[str, Any], list[float]]:
    """Poll a job until it ends; returns it and the percentages seen while it ran."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job, _ = await h.call("GET", location)
        assert status == 200, job
        if job["state"] != RUNNING:
            return job, seen
        seen.append(job["percent"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {location} still running after {timeout}s: {job}")


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".partial-" in p.name)


@aio
async def test_zero_filled_4gib_extent_reports_progress(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        path = tmp_path / "extents" / "big.img"
        try:
            status, job, headers = await h.call(
                "POST", f"{NATIVE}/extents", {"name": "big", "path": "big.img", "filesize": "4GB", "allocation": "zero"}
            )
            assert status == 202 and job["state"] == RUNNING and job["total"] == 4 * GiB, job
            assert headers["Location"] == f"{NATIVE}/jobs/{job['id']}"
            started = time.monotonic()
            job, seen = await wait_job(h, headers["Location"])
            elapsed = time.monotonic() - started
            assert job["state"] == "succeeded" and job["percent"] == 100.0, job
            between = sorted({p for p in seen if 0 < p < 100})
            assert len(between) >= 2, f"no progress seen in {elapsed:.1f}s: {seen}"
            assert seen == sorted(seen)  # never goes backwards
            st = os.stat(path)
            assert st.st_size == 4 * GiB and st.st_blocks * 512 >= 4 * GiB  # written, not sparse
            extent = job["result"]["extent"]
            status, body, _ = await h.call("GET", f"{FN}/extent/{extent}/")
            assert status == 200 and body["iscsi_target_extent_filesize"] == "4GB"
            assert body["iscsi_target_extent_path"] == str(path)
            assert leftovers(path.parent) == []
        finally:
            path.unlink(missing_ok=True)  # 4 GiB: not left for pytest's retention


@aio
async def test_preallocated_extent_and_growth(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, job, headers = await h.call(
            "POST", f"{NATIVE}/extents",
            {"name": "pre", "path": "sub/pre.img", "filesize": 64 << 20, "allocation": "preallocate",
             "blocksize": 4096},
        )
        assert status == 202, job
        job, _ = await wait_job(h, headers["Location"])
        assert job["state"] == "succeeded", job
        path = tmp_path / "extents" / "sub" / "pre.img"
        assert os.stat(path).st_blocks * 512 >= 64 << 20
        extent = job["result"]["extent"]
        status, job, headers = await h.call("POST", f"{NATIVE}/extents/{extent}/resize",
                                            {"filesize": "128MB", "allocation": "zero"})
        assert status == 202, job
        job, _ = await wait_job(h, headers["Location"])
        assert job["state"] == "succeeded" and job["result"]["size"] == 128 << 20, job
        assert os.path.getsize(path) == 128 << 20 and os.stat(path).st_blocks * 512 >= 128 << 20
        assert h.engine.last.extents[extent].filesize == "128MB"  # applied to the engine
        status, usage, _ = await h.call("GET", f"{NATIVE}/extents")
        assert usage[0]["size"] == 128 << 20 and usage[0]["allocated"] >= 128 << 20
        # Shrinking, or a size that is not a multiple of the block size, is refused up front.
        for size, field in (("64MB", "filesize"), (128 * (1 << 20) + 512, "filesize")):
            status, body, _ = await h.call("POST", f"{NATIVE}/extents/{extent}/resize", {"filesize": size})
            assert status == 400 and field in body["fields"], body
        status, body, _ = await h.call("POST", f"{NATIVE}/extents/99/resize", {"filesize": "1GB"})
        assert status == 404, body


@aio
async def test_create_is_validated_before_any_work(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        root = tmp_path / "extents"
        (root / "exists.img").write_bytes(b"\0" * 4096)
        cases = [
            ({"name": "a", "path": "exists.img", "filesize": "1MB"}, 400, "path"),
            ({"name": "a", "path": "a.img", "filesize": "1MB", "allocation": "thick"}, 400, "allocation"),
            ({"name": "a", "path": "../a.img", "filesize": "1MB"}, 400, "path"),
            ({"name": "a", "path": "a.img", "filesize": "1000"}, 400, "filesize"),
            ({"name": "a", "path": "a.img", "filesize": "1PB", "allocation": "zero"}, 400, "filesize"),
            ({"path": "a.img", "filesize": "1MB"}, 400, "name"),
        ]
        for body, want, field in cases:
            status, out, _ = await h.call("POST", f"{NATIVE}/extents", body)
            assert status == want and field in out["fields"], (body, out)
        assert sorted(p.name for p in root.iterdir()) == ["exists.img"]
        status, out, _ = await h.call("POST", f"{FN}/extent/", {"iscsi_target_extent_name": "taken",
                                                                  "iscsi_target_extent_path": "t.img",
                                                                  "iscsi_target_extent_filesize": "1MB"})
        assert status == 201
        status, out, _ = await h.call("POST", f"{NATIVE}/extents", {"name": "taken", "path": "b.img",
                                                                   "filesize": "1MB"})
        assert status == 409 and out["fields"] == {"name": ["Extent name must be unique"]}, out
        status, out, _ = await h.call("POST", f"{NATIVE}/extents", raw=b"[1]")
        assert status == 400 and out["error"]


@aio
async def test_cancel_leaves_nothing_behind(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, job, headers = await h.call(
            "POST", f"{NATIVE}/extents", {"name": "c", "path": "c.img", "filesize": "8GB", "allocation": "zero"}
        )
        assert status == 202
        await asyncio.sleep(0.3)
        status, cancelling, _ = await h.call("DELETE", headers["Location"])
        assert status == 202 and cancelling["message"] == "cancelling", cancelling
        job, _ = await wait_job(h, headers["Location"])
        assert job["state"] == "cancelled" and 0 < job["done"] < 8 * GiB, job
        assert list((tmp_path / "extents").iterdir()) == []
        assert (await h.call("GET", f"{FN}/extent/"))[1] == []
        # A finished job can be forgotten; then it is gone.
        assert (await h.call("DELETE", headers["Location"]))[0] == 204
        assert (await h.call("GET", headers["Location"]))[0] == 404
        assert (await h.call("DELETE", f"{NATIVE}/jobs/nosuch"))[0] == 404


@aio
async def test_job_outlives_the_client_that_started_it(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        assert h.client is not None
        url = str(h.client.make_url(f"{NATIVE}/extents"))
        async with aiohttp.ClientSession(headers=basic()) as session:  # a separate client, closed at once
            async with session.post(url, json={"name": "d", "path": "d.img", "filesize": "256MB",
                                               "allocation": "zero"}) as resp:
                assert resp.status == 202
                location = resp.headers["Location"]
        job, _ = await wait_job(h, location)
        assert job["state"] == "succeeded" and os.path.getsize(tmp_path / "extents" / "d.img") == 256 << 20


async def _chunks(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@aio
async def test_import_raw_image_keeps_holes(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        image = bytearray(24 << 20)
        image[:4096] = os.urandom(4096)
        image[20 << 20 : (20 << 20) + 512] = b"x" * 512
        status, out, _ = await h.call("POST", f"{NATIVE}/extents/import?name=img&path=img.raw&dry_run=true"
                                              f"&size={len(image)}")
        assert status == 200 and out["size"] == len(image) and not (tmp_path / "extents" / "img.raw").exists()
        status, job, _ = await h.call("POST", f"{NATIVE}/extents/import?name=img&path=img.raw&blocksize=4096",
                                      raw=bytes(image), headers={"Content-Type": "application/octet-stream"})
        assert status == 201 and job["state"] == "succeeded" and job["percent"] == 100.0, job
        path = tmp_path / "extents" / "img.raw"
        assert path.read_bytes() == image
        assert os.stat(path).st_blocks * 512 < 4 << 20  # the zero runs stayed holes
        extent = h.engine.last.extents[job["result"]["extent"]]
        assert extent.blocksize == 4096 and extent.filesize == str(len(image))
        # An image that is not a multiple of the block size, and a body that ends early.
        status, out, _ = await h.call("POST", f"{NATIVE}/extents/import?name=odd&path=odd.raw", raw=b"x" * 1000)
        assert status == 400 and out["error"].startswith("size: ") and "size" in out["fields"], out
        assert h.client is not None
        resp = await h.client.post(f"{NATIVE}/extents/import?name=short&path=short.raw&size={2 << 20}",
                                   data=_chunks(b"y" * (1 << 20)), headers=basic())
        out = await resp.json()
        assert resp.status == 400 and "ended after 1048576 of 2097152" in out["error"], out
        assert out["job"]["state"] == FAILED
        assert sorted(p.name for p in (tmp_path / "extents").iterdir()) == ["img.raw"]
        status, out, _ = await h.call("POST", f"{NATIVE}/extents/import?name=big&path=big.raw&size=x", raw=b"")
        assert status == 400 and "size" in out["fields"]


def test_sanitize_progress_as_jobs() -> None:
    class Unit:
        def __init__(self, sanitizing: bool, failed: bool, progress: float) -> None:
            self.sanitizing, self.sanitize_failed, self.sanitize_progress = sanitizing, failed, progress

    units = [("a", Unit(True, False, 0.25)), ("b", Unit(False, False, 0.0)), ("c", Unit(False, True, 0.5))]

    async def run() -> None:
        registry = JobRegistry()
        registry.add_source(SanitizeJobs(lambda: units))
        jobs = {j.id: j for j in registry.list()}
        assert set(jobs) == {"sanitize-a", "sanitize-c"}
        assert jobs["sanitize-a"].percent == 25.0 and jobs["sanitize-a"].state == RUNNING
        assert jobs["sanitize-c"].state == FAILED
        assert registry.get("sanitize-a").kind == "sanitize"
        try:
            registry.cancel("sanitize-a")
        except Exception as exc:  # noqa: BLE001
            assert getattr(exc, "status", None) == 409
        else:
            raise AssertionError("a SANITIZE was cancelled")
        await registry.close()

    asyncio.run(run())


@aio
async def test_import_client_vanishing_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        assert h.client is not None
        url = h.client.make_url(f"{NATIVE}/extents/import?name=gone&path=gone.raw")
        reader, writer = await asyncio.open_connection(url.host, url.port)
        auth = basic()["Authorization"]
        writer.write(f"POST {url.path_qs} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                     f"Content-Length: {16 << 20}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        writer.write(b"z" * (1 << 20))
        await writer.drain()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (await h.call("GET", f"{NATIVE}/jobs"))[1]:
            await asyncio.sleep(0.05)
        writer.close()  # the client goes away with 15 MiB unsent
        jobs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            jobs = (await h.call("GET", f"{NATIVE}/jobs"))[1]
            if jobs and jobs[0]["state"] != RUNNING:
                break
            await asyncio.sleep(0.05)
        assert [j["state"] for j in jobs] == [FAILED], jobs
        assert list((tmp_path / "extents").iterdir()) == []
        assert h.service.model.extents == {}


def test_sanitize_in_the_daemon_is_a_job_with_progress(tmp_path: Path) -> None:
    """The daemon wires the SCSI layer's SANITIZE progress into the job list: an initiator's
    SANITIZE OVERWRITE (IMMED) of the demo LU shows as a running job, then ends."""
    import struct

    from support.daemon import Daemon, wait_for
    from support.rawclient import login_session

    with Daemon(tmp_path / "state") as d:
        c = login_session("127.0.0.1", d.port, d.iqn)
        try:
            while c.scsi(bytes(6)).status:  # clear the power-on unit attention
                pass
            param = struct.pack(">BBH", 0x01, 0, 512) + bytes(512)  # one pass, a zero pattern
            r = c.scsi(struct.pack(">BBBBBBBHB", 0x48, 0x81, 0, 0, 0, 0, 0, len(param), 0), data=param)
            assert r.status == 0, r.sense.hex()
            seen: list[dict[str, Any]] = []

            def sanitize_job() -> bool:
                jobs = d.rest("GET", "jobs", prefix="/api/pyscsi/v1")
                seen.extend(j for j in jobs if j["kind"] == "sanitize")
                return bool(seen)

            assert wait_for(sanitize_job, timeout=30), "no sanitize job listed"
            assert seen[0]["id"] == "sanitize-demo" and seen[0]["state"] == RUNNING
            assert wait_for(lambda: c.scsi(bytes(6)).status == 0, timeout=120), "SANITIZE did not end"
            assert not [j for j in d.rest("GET", "jobs", prefix="/api/pyscsi/v1") if j["kind"] == "sanitize"]
        finally:
            c.close()
