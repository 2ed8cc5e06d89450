"""Extent creation, growth and image import as jobs with progress.

Each operation is validated up front with the extent validator (the same rules and
messages as a plain create or update), then the file work runs in a job worker thread,
and only a finished file is handed to ``ConfigService``, which commits the extent as any
other change.  A new file is built under a temporary name beside its final path and linked
into place when complete, so neither a failure nor a crash leaves a half-filled file under
an extent's name; a grown file is truncated back if the growth does not complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Mapping

from pyscsi_target.config.errors import Errors, ValidationError
from pyscsi_target.config.extent_allocation import (
    ALLOCATIONS,
    SPARSE,
    ImageWriter,
    create_allocated,
    extend_allocated,
    publish,
)
from pyscsi_target.config.extents import build_extent
from pyscsi_target.config.model import Extent
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.transaction import EXTENTS, copy_of, lookup
from pyscsi_target.jobs import Job, JobRegistry

Fields = Mapping[str, object]


def _check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise ValidationError({"allocation": [f"Select a valid choice: {', '.join(ALLOCATIONS)}."]})


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise ValidationError({"path": [f"{path} already exists: this creates a new file (an existing file "
                                        "becomes an extent through a plain create)."]})


def preview_new_file_extent(service: ConfigService, fields: Fields) -> tuple[Extent, int]:
    """Validate a new File extent whose file this job will create; returns it and its size."""
    raw_path = fields.get("path")
    if isinstance(raw_path, str):  # said first: the size rules would otherwise talk about that file
        resolved = service.roots.resolve_file(Errors(), raw_path)
        if resolved is not None:
            _refuse_existing(resolved)
    e, size = build_extent(service.model.copy(), service.roots, fields, Extent(id=0, name="", filesize=""), None)
    if e.type != "File":
        raise ValidationError({"type": ["Only File extents have a file to create."]})
    _refuse_existing(e.path)
    if not size:
        raise ValidationError({"filesize": ["Give the size of the new file."]})
    return e, size


def check_space(path: str, needed: int) -> None:
    """Preallocation and zero-fill need the space now: refuse what the filesystem cannot hold."""
    probe = os.path.dirname(path)
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or "/").free
    if needed > free:
        raise ValidationError({"filesize": [f"{needed} bytes do not fit: the filesystem has {free} bytes free."]})


def _temporary_name(final: str) -> str:
    head, tail = os.path.split(final)
    return os.path.join(head, f".{tail}.partial-{secrets.token_hex(4)}")


def _claims(e: Extent) -> list[str]:
    return [f"path:{e.path}", f"name:{e.name}"]


async def _commit_new(service: ConfigService, fields: Fields, e: Extent, size: int) -> dict[str, object]:
    """Add the extent over its now complete file; remove the file if the change is refused."""
    try:
        saved = await service.create_extent({**fields, "path": e.path})
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(e.path)
        raise
    return {"extent": saved.id, "name": saved.name, "path": saved.path, "size": size}


def start_create(service: ConfigService, jobs: JobRegistry, fields: Fields, allocation: str) -> Job:
    """A job creating a File extent's file ``allocation``-style, then the extent."""
    _check_allocation(allocation)
    e, size = preview_new_file_extent(service, fields)
    if allocation != SPARSE:
        check_space(e.path, size)

    async def work(job: Job) -> dict[str, object]:
        tmp = _temporary_name(e.path)

        def fill() -> None:
            os.makedirs(os.path.dirname(e.path), exist_ok=True)
            create_allocated(tmp, size, allocation, job.advance)
            job.check()  # a cancel that came during the last step still wins
            publish(tmp, e.path)

        job.message = f"allocating {size} bytes ({allocation})"
        await jobs.in_thread(fill)
        job.message = "adding the extent"
        return await _commit_new(service, fields, e, size)

    return jobs.start("extent-create", f"create extent {e.name} ({allocation}, {size} bytes)", size, work,
                      claims=_claims(e))


def start_create_rbd(service: ConfigService, jobs: JobRegistry, fields: Fields) -> Job:
    """A job creating an RBD extent: its image is made (or grown) if needed, then the extent."""
    e = build_extent(service.model.copy(), service.roots, fields, Extent(id=0, name="", filesize=""), None)[0]
    if e.type != "RBD":
        raise ValidationError({"type": ["Expected RBD."]})

    async def work(job: Job) -> dict[str, object]:
        job.message = f"preparing the image {e.path}"
        saved = await service.create_extent(fields)
        job.advance(1)
        return {"extent": saved.id, "name": saved.name, "path": saved.path}

    return jobs.start("extent-create", f"create RBD extent {e.name} ({e.path})", 1, work, claims=_claims(e))


def start_resize(service: ConfigService, jobs: JobRegistry, extent_id: object, filesize: object,
                 allocation: str) -> Job:
    """A job growing a File extent to ``filesize`` with the new range ``allocation``-style."""
    _check_allocation(allocation)
    model = service.model.copy()
    current = lookup(model, EXTENTS, extent_id, "Extent")
    if current.type == "RBD":
        return _start_rbd_resize(service, jobs, current, filesize)
    if current.type != "File":
        raise ValidationError({"type": ["A Disk extent has the size of its device."]})
    e, size = build_extent(model, service.roots, {"filesize": filesize}, copy_of(current), current)
    old_size = os.path.getsize(e.path)
    if not size or size <= old_size:
        raise ValidationError({"filesize": [f"The extent is already {old_size} bytes; give a larger size."]})
    if allocation != SPARSE:
        check_space(e.path, size - old_size)

    async def work(job: Job) -> dict[str, object]:
        if allocation != SPARSE:
            job.message = f"allocating bytes {old_size}-{size} ({allocation})"
            await jobs.in_thread(lambda: extend_allocated(e.path, old_size, size, allocation, job.advance))
        else:
            job.advance(size - old_size)
        job.message = "resizing the extent"
        try:
            saved = await service.update_extent(e.id, {"filesize": filesize})
        except BaseException:
            if allocation != SPARSE:
                await jobs.in_thread(lambda: os.truncate(e.path, old_size))
            raise
        return {"extent": saved.id, "name": saved.name, "path": saved.path, "size": size}

    return jobs.start("extent-resize", f"grow extent {e.name} to {size} bytes ({allocation})", size - old_size,
                      work, claims=[f"path:{e.path}"])


def _start_rbd_resize(service: ConfigService, jobs: JobRegistry, current: Extent, filesize: object) -> Job:
    """Grow an RBD extent's image (thin: nothing to allocate); every gateway's LU sees it."""
    e = build_extent(service.model.copy(), service.roots, {"filesize": filesize}, copy_of(current), current)[0]

    async def work(job: Job) -> dict[str, object]:
        saved = await service.update_extent(e.id, {"filesize": filesize})
        job.advance(1)
        return {"extent": saved.id, "name": saved.name, "path": saved.path}

    return jobs.start("extent-resize", f"grow extent {e.name} to {e.filesize}", 1, work,
                      claims=[f"path:{e.path}"])


async def run_import(
    service: ConfigService, jobs: JobRegistry, fields: Fields, size: int, chunks: AsyncIterator[bytes]
) -> Job:
    """Import a raw image of ``size`` bytes arriving as ``chunks`` into a new File extent.

    Validation happens before the first byte is read; the job is listed while the data
    arrives (its progress is the bytes written) and fails, leaving nothing behind, if the
    data ends early or runs long.  Returns the finished job."""
    fields = {**fields, "filesize": str(size)}
    e, _size = preview_new_file_extent(service, fields)
    async def work(job: Job) -> dict[str, object]:
        tmp = _temporary_name(e.path)

        def open_writer() -> ImageWriter:
            os.makedirs(os.path.dirname(e.path), exist_ok=True)
            return ImageWriter(tmp, size)

        writer = await jobs.in_thread(open_writer)
        job.message = "receiving the image"
        try:
            offset = 0
            pending = bytearray()
            async for chunk in chunks:
                if offset + len(pending) + len(chunk) > size:
                    raise ValidationError({"__all__": [f"The image is larger than the {size} bytes announced."]})
                pending += chunk
                if len(pending) >= 4 << 20:  # hand the worker big pieces: one thread hop per 4 MiB
                    data, pending = bytes(pending), bytearray()
                    await jobs.in_thread(lambda d=data, o=offset: writer.write(o, d))  # type: ignore[misc]
                    offset += len(data)
                    job.advance(len(data))
            if pending:
                data = bytes(pending)
                await jobs.in_thread(lambda: writer.write(offset, data))
                offset += len(data)
                job.advance(len(data))
            if offset != size:
                raise ValidationError({"__all__": [f"The upload ended after {offset} of {size} bytes."]})
            job.message = "syncing the file"

            def finish() -> None:
                writer.finish()
                publish(tmp, e.path)

            await jobs.in_thread(finish)
        except BaseException:
            await jobs.in_thread(writer.abort)
            raise
        job.message = "adding the extent"
        return await _commit_new(service, fields, e, size)

    job = jobs.start("extent-import", f"import a {size}-byte image into extent {e.name}", size, work,
                     claims=_claims(e))
    return await jobs.wait(job.id)
