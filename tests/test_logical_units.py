"""server/logical_units.py: a config Extent becomes LuSettings and a backstore; the LU
table follows the configuration (open, reconfigure, reopen, close)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from test_scsi_support import MemoryPrStore, make_extent

from pyscsi_target.config import model as M
from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.registry import ScsiRegistry
from pyscsi_target.scsi.settings import LuSettings
from pyscsi_target.server.logical_units import LogicalUnits, lu_settings, naa_of, requested_size
from pyscsi_target.server.model_index import ModelIndex


def test_extent_to_settings() -> None:
    ext = M.Extent(id=7, name="x", path="/tmp/x.img", filesize="1.5GB", blocksize=4096, rpm="7200",
                   naa="0x6589CFC000000AB1", xen=True, ro=True, insecure_tpc=False, avail_threshold=80)
    s = lu_settings(ext)
    assert s == LuSettings(name="x", naa=bytes.fromhex("6589cfc000000ab1"), serial="6589cfc000000ab1",
                           block_size=4096, read_only=True, rpm=7200, physical_block_size=4096, xen=True,
                           insecure_tpc=False, avail_threshold=80)
    assert s.lbppbe == 0 and requested_size(ext) == 1610612736
    small = lu_settings(M.Extent(id=8, name="y", path="/tmp/y.img", serial="SER1", rpm="SSD"))
    assert small.lbppbe == 3 and small.rpm == 1 and small.serial == "SER1" and small.avail_threshold == 0
    assert lu_settings(M.Extent(id=8, name="y", path="/tmp/y.img", pblocksize=True)).lbppbe == 0
    assert lu_settings(M.Extent(id=8, name="y", path="/tmp/y.img", rpm="Unknown")).rpm == 0
    # no naa configured: a stable locally assigned NAA 3 designator
    derived = naa_of(M.Extent(id=8, name="y", path="/tmp/y.img"))
    assert derived == naa_of(M.Extent(id=8, name="y", path="/tmp/y.img")) and derived[0] >> 4 == 3
    assert requested_size(M.Extent(id=9, name="d", type="Disk", path="/dev/null", filesize="1GB")) == 0


def test_settings_reject_what_the_device_model_cannot_report() -> None:
    naa = bytes(8)
    for bad in (dict(block_size=520), dict(naa=b"short"), dict(serial="x" * 33),
                dict(physical_block_size=256), dict(physical_block_size=6144), dict(avail_threshold=101)):
        kw: dict[str, object] = {"name": "n", "naa": naa, "serial": "s", **bad}
        with pytest.raises(ValueError):
            LuSettings(**kw)  # type: ignore[arg-type]


def test_lu_table_follows_the_model(tmp_path: Path) -> None:
    async def main() -> None:
        registry = ScsiRegistry()
        lus = LogicalUnits(registry, MemoryPrStore())
        ext = make_extent(tmp_path, size=8 << 20)
        model = M.ConfigModel(targets={1: M.Target(id=1, name="t")}, extents={ext.id: ext},
                              lun_maps={1: M.LunMap(id=1, target=1, extent=ext.id, lunid=0)})
        detached: list[object] = []

        def apply(model: M.ConfigModel) -> set[int]:
            return lus.apply(model, ModelIndex.of(model), set(model.extents) | {ext.id}, detached.append)

        assert apply(model) == {ext.id} and lus.failed == set()
        lu = lus.get(ext.id)
        assert lu is not None and registry.lus[lu.naa] is lu and lu.num_blocks == (8 << 20) // 512
        lu.attach_nexus(("iqn.x,i,0x1", 1), ua=None)
        # a changed size and identity: the same LU, with the unit attentions
        model = model.copy()
        model.extents[ext.id] = dataclasses.replace(ext, filesize=str(16 << 20), serial="NEWSERIAL")
        assert apply(model) == set()
        assert lus.get(ext.id) is lu and lu.num_blocks == (16 << 20) // 512 and lu.serial == "NEWSERIAL"
        assert lu.ua[("iqn.x,i,0x1", 1)] == [S.INQUIRY_DATA_HAS_CHANGED, S.CAPACITY_DATA_HAS_CHANGED]
        # a new block size needs a new LU
        model = model.copy()
        model.extents[ext.id] = dataclasses.replace(model.extents[ext.id], blocksize=4096)
        assert apply(model) == {ext.id}
        new = lus.get(ext.id)
        assert new is not None and new is not lu and lu.closed and detached == [lu] and new.block_size == 4096
        # unmapped: closed and out of the registry
        model = model.copy()
        model.lun_maps.clear()
        assert apply(model) == {ext.id}
        assert lus.get(ext.id) is None and new.closed and registry.lus == {}
        # an extent that cannot be opened is reported (and retried by every later apply), the others are served
        bad = M.Extent(id=99, name="bad", path=str(tmp_path / "missing" / "x.img"), filesize="1MB")
        model = model.copy()
        model.extents[99] = bad
        model.lun_maps[2] = M.LunMap(id=2, target=1, extent=99, lunid=1)
        assert apply(model) == set() and lus.failed == {99}
        (tmp_path / "missing").mkdir()
        assert lus.apply(model, ModelIndex.of(model), set(), detached.append) == {99} and lus.failed == set()
        await lus.close()

    asyncio.run(main())
