"""The native namespace's field tables (``/api/pyscsi/v1/``): every field name, once.

Native names are the model's own (``name``, ``filesize``, ...).  Sessions are shown from
the engine's session snapshots (``Engine.sessions()``: one dict per session), jobs from
``pyscsi_target.jobs.Job``; new fields are a row here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pyscsi_target.cluster.rados import ClusterSettings
from pyscsi_target.config.extent_allocation import ALLOCATIONS, SPARSE
from pyscsi_target.config.extents import ExtentFields as EX
from pyscsi_target.config.fields import Choice, Field, Schema, Text
from pyscsi_target.config.model import ConfigModel
from pyscsi_target.config.rbd_images import image_usage
from pyscsi_target.config.targets import TargetFields as TN
from pyscsi_target.jobs import STATES, Job

from .tables import Column, Table

NULLABLE_INT: Schema = {"type": "integer", "nullable": True}
NULLABLE_STR: Schema = {"type": "string", "nullable": True}


def snapshot(key: str, schema: Schema) -> Column:
    """A column showing ``key`` of a snapshot dict."""
    return Column(key, show=lambda model, snap: snap.get(key), schema=schema)


def attribute(name: str, schema: Schema) -> Column:
    return Column(name, show=lambda model, obj: getattr(obj, name), schema=schema)


SESSION = Table(
    "Session",
    (
        snapshot("tsih", {"type": "integer"}),
        snapshot("isid", {"type": "string"}),
        snapshot("initiator", {"type": "string"}),
        snapshot("initiator_alias", NULLABLE_STR),
        snapshot("target", NULLABLE_STR),
        snapshot("type", {"type": "string", "enum": ["Normal", "Discovery"]}),
        snapshot("peer", NULLABLE_STR),
        snapshot("exp_cmdsn", {"type": "integer"}),
        snapshot("max_cmdsn", {"type": "integer"}),
        snapshot("tasks", {"type": "integer"}),
        snapshot("header_digest", {"type": "boolean"}),
        snapshot("data_digest", {"type": "boolean"}),
        snapshot("params", {"type": "object", "additionalProperties": True,
                            "description": "the negotiated operational parameters (RFC 7143 section 13)"}),
    ),
)

# A target's native settings: the FreeNAS and Hitachi views show the rest of it.
TARGET = Table(
    "NativeTarget",
    (
        attribute("id", {"type": "integer"}),
        attribute("name", {"type": "string"}),
        Column("iqn", show=lambda model, t: model.target_iqn(t), schema={"type": "string"}),
        attribute("alias", NULLABLE_STR),
        Column("allow_warm_reset", TN.allow_warm_reset, example=False),
        Column("allow_cold_reset", TN.allow_cold_reset, example=False),
    ),
)

JOB = Table(
    "Job",
    (
        attribute("id", {"type": "string"}),
        attribute("kind", {"type": "string"}),
        attribute("description", {"type": "string"}),
        attribute("state", {"type": "string", "enum": list(STATES)}),
        attribute("percent", {"type": "number", "minimum": 0, "maximum": 100}),
        attribute("done", {"type": "integer"}),
        attribute("total", {"type": "integer"}),
        attribute("message", {"type": "string"}),
        attribute("created", {"type": "number"}),
        attribute("finished", {"type": "number", "nullable": True}),
        attribute("result", {"type": "object", "additionalProperties": True}),
        attribute("cancellable", {"type": "boolean"}),
    ),
)

ALLOCATION = Field("allocation", Choice(Text(), ALLOCATIONS))
# An extent's rules are the extent validator's; ``type`` is File (a new file) or RBD (an image,
# created when missing); imports are always File.
_EXTENT_FIELDS = (EX.name, EX.path, EX.filesize, EX.blocksize, EX.pblocksize, EX.rpm, EX.serial, EX.naa, EX.ro,
                  EX.insecure_tpc, EX.xen, EX.avail_threshold, EX.comment)
NEW_EXTENT_TYPE = Field("type", Choice(Text(), ("File", "RBD")))
_RBD_FIELDS = (EX.ceph_conf, EX.ceph_client, EX.ceph_keyring)
_EXAMPLES: Mapping[str, object] = {"name": "big0", "path": "big0.img", "filesize": "16MB"}



def _extent_column(f: Field[Any]) -> Column:
    if f.attr in _EXAMPLES:
        return Column(f.attr, f, required=True, example=_EXAMPLES[f.attr])
    return Column(f.attr, f)


EXTENT_CREATE = Table(
    "ExtentCreate", (Column("type", NEW_EXTENT_TYPE, example="File"), *(_extent_column(f) for f in _EXTENT_FIELDS),
                     Column("allocation", ALLOCATION, example=SPARSE), *(Column(f.attr, f) for f in _RBD_FIELDS))
)
EXTENT_RESIZE = Table(
    "ExtentResize",
    (Column("filesize", EX.filesize, required=True, example="32MB"), Column("allocation", ALLOCATION, example=SPARSE)),
)
# The import takes the extent's fields in the query (the body is the image); the file's size
# is the image's, so size errors are reported under "size".
IMPORT_SIZE = Column("size", EX.filesize)
EXTENT_IMPORT = Table("ExtentImport", (*(Column(f.attr, f) for f in _EXTENT_FIELDS if f.attr != "filesize"),
                                       IMPORT_SIZE))


EXTENT_USAGE = Table(
    "ExtentUsage",
    (
        attribute("id", {"type": "integer"}),
        attribute("name", {"type": "string"}),
        attribute("type", {"type": "string"}),
        attribute("path", {"type": "string"}),
        attribute("filesize", {"type": "string"}),
        attribute("blocksize", {"type": "integer"}),
        attribute("ro", {"type": "boolean"}),
        Column("size", show=lambda model, e: e.size, schema={**NULLABLE_INT, "description": "bytes now"}),
        Column("allocated", show=lambda model, e: e.allocated,
               schema={**NULLABLE_INT, "description": "bytes allocated on disk (files) or backed by RADOS objects "
                                                      "(RBD images)"}),
        Column("error", show=lambda model, e: e.error, schema=NULLABLE_STR),
    ),
)


class ExtentUsage:
    """An extent with what its file, device or RBD image measures now (blocking: a thread)."""

    def __init__(self, extent: Any, ceph: ClusterSettings | None = None) -> None:
        self._extent = extent
        self.size: int | None = None
        self.allocated: int | None = None
        self.error: str | None = None
        try:
            if extent.type == "RBD":
                self.size, self.allocated = image_usage(extent, ceph or ClusterSettings())
            elif extent.type == "File":
                st = os.stat(extent.path)
                self.size, self.allocated = st.st_size, st.st_blocks * 512
            else:
                fd = os.open(extent.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self.size = os.lseek(fd, 0, os.SEEK_END)
                finally:
                    os.close(fd)
        except OSError as exc:
            self.error = exc.strerror or str(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._extent, name)


def job_body(job: Job) -> dict[str, object]:
    return JOB.serialize(ConfigModel(), job)
