"""The commit-and-apply path at scale (config/transaction.py, config/delta.py, server/engine.py):
concurrent changes are group-committed (one transaction for a batch), a refused change fails alone,
committed objects are sealed, and the engine reconciles only what a change touched."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from support.rest_harness import FakeEngine, aio

from pyscsi_target.config.delta import ModelDelta
from pyscsi_target.config.errors import ConflictError, ValidationError
from pyscsi_target.config.model import ConfigModel, SealedError
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore
from pyscsi_target.config.transaction import TARGETS
from pyscsi_target.scsi.device import ScsiDevice
from pyscsi_target.server.engine import Engine


class CountingStore(ConfigStore):
    """A store that counts its write transactions (one per committed batch) and can fail them."""

    def __init__(self, path: Path) -> None:
        self.transactions = 0
        self.fail: Exception | None = None
        super().__init__(path)

    def transaction(self) -> Any:
        self.transactions += 1
        if self.fail is not None:
            raise self.fail
        return super().transaction()


@aio
async def test_concurrent_changes_share_one_commit(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    engine = FakeEngine()
    service = ConfigService(store, engine)
    await service.start(default_portals=["127.0.0.1:3260"])
    store.transactions = 0
    names = [f"t{i}" for i in range(40)] + ["t3", "Bad Name"]  # a duplicate and an invalid name
    results = await asyncio.gather(*(service.create_target({"name": n}) for n in names), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert [r.name for r in ok] == names[:40]
    assert isinstance(results[40], ConflictError) and isinstance(results[41], ValidationError)
    # One transaction for the first change (nothing queued yet), one for all the others.
    assert store.transactions <= 3, store.transactions
    assert len(engine.applied) <= 3
    # The refused changes took no id: ids stay dense, and the next one follows on.
    assert sorted(r.id for r in ok) == list(range(1, 41))
    assert (await service.create_target({"name": "after"})).id == 41
    reloaded = ConfigStore(tmp_path).load()
    assert sorted(t.name for t in reloaded.targets.values()) == sorted([*names[:40], "after"])


@aio
async def test_a_failed_commit_fails_the_batch_and_changes_nothing(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    service = ConfigService(store, FakeEngine())
    await service.start(default_portals=["127.0.0.1:3260"])
    await service.create_target({"name": "kept"})
    before = service.model
    store.fail = OSError(28, "No space left on device")
    results = await asyncio.gather(*(service.create_target({"name": f"x{i}"}) for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results), results
    assert service.model is before
    store.fail = None
    t = await service.create_target({"name": "x0"})
    assert t.id == 2  # the ids of the failed batch were given back
    assert sorted(x.name for x in ConfigStore(tmp_path).load().targets.values()) == ["kept", "x0"]


@aio
async def test_engine_refusal_in_a_batch_fails_only_the_culprit(tmp_path: Path) -> None:
    class PickyEngine(FakeEngine):
        async def apply(self, model: ConfigModel) -> None:
            await asyncio.sleep(0)
            if any(t.name == "refused" for t in model.targets.values()):
                raise OSError("cannot listen")
            self.applied.append(model)

    engine = PickyEngine()
    service = ConfigService(ConfigStore(tmp_path), engine)
    await service.start(default_portals=["127.0.0.1:3260"])
    await service.create_target({"name": "first"})  # the next ones queue behind nothing: start a batch
    results = await asyncio.gather(*(service.create_target({"name": n}) for n in ("a", "refused", "b")),
                                   return_exceptions=True)
    assert [getattr(r, "name", None) for r in results] == ["a", None, "b"]
    assert isinstance(results[1], ValidationError) and "could not apply" in str(results[1])
    names = {t.name for t in service.model.targets.values()}
    assert names == {"first", "a", "b"} == {t.name for t in engine.last.targets.values()}
    assert {t.name for t in ConfigStore(tmp_path).load().targets.values()} == names


@aio
async def test_committed_objects_are_sealed_and_shared(tmp_path: Path) -> None:
    engine = FakeEngine()
    service = ConfigService(ConfigStore(tmp_path), engine)
    await service.start(default_portals=["127.0.0.1:3260"])
    t = await service.create_target({"name": "t"})
    u = await service.create_target({"name": "u"})
    committed = service.model.targets[t.id]
    with pytest.raises(SealedError):
        committed.alias = "changed behind the service's back"
    t.alias = "a copy is free to change"  # results are detached copies
    await service.update_target(u.id, {"alias": "uu"})
    # The untouched target is the same object in the old and the new model: nothing was copied.
    assert service.model.targets[t.id] is committed and engine.last.targets[t.id] is committed
    delta = ModelDelta.between(engine.applied[-2], engine.last)
    assert delta.targets == {u.id} and not delta.target_groups and not delta.basename

    def edit_in_place(draft: Any) -> None:
        draft.model.targets[t.id].alias = "x"  # forgot Draft.own: refused, nothing changed

    with pytest.raises(SealedError):
        await service.change(edit_in_place)

    def edit_owned(draft: Any) -> None:
        draft.own(TARGETS, draft.model.targets[t.id]).alias = "owned"

    await service.change(edit_owned)
    assert service.model.targets[t.id].alias == "owned" and committed.alias is None


@aio
async def test_engine_touches_only_the_targets_a_change_touches(tmp_path: Path, monkeypatch: Any) -> None:
    engine = Engine(tmp_path / "engine", tune_allocator=False)
    service = ConfigService(ConfigStore(tmp_path), engine)
    await service.start(default_portals=["127.0.0.1:0"])
    pg = next(iter(service.model.portal_groups))
    for i in range(200):
        t = await service.create_target({"name": f"t{i:03d}"})
        await service.create_target_group({"target": t.id, "portal_group": pg})
    ext = await service.create_extent({"name": "e", "type": "File", "path": "e.img", "filesize": "1MB"})
    calls: list[str] = []
    def spy(name: str) -> Any:
        real = getattr(ScsiDevice, name)

        def call(self: ScsiDevice, *args: Any) -> Any:
            calls.append(f"{name} {self.target_iqn}")
            return real(self, *args)

        return call

    for name in ("set_portal_groups", "set_luns"):
        monkeypatch.setattr(ScsiDevice, name, spy(name))
    new = await service.create_target({"name": "new"})
    await service.create_target_group({"target": new.id, "portal_group": pg})
    await service.create_lun_map({"target": new.id, "extent": ext.id, "lunid": 0})
    iqn = service.model.target_iqn(service.model.targets[new.id])
    assert calls and all(c.endswith(iqn) for c in calls), calls[:5]
    assert engine.target_by_iqn(iqn) is not None and set(engine.target_by_iqn(iqn).luns) == {0}
    calls.clear()
    # The base name changes every IQN: then every target is reconciled (and renamed).
    await service.update_global({"basename": "iqn.2026-12.org.example"})
    renamed = {c.split()[1] for c in calls if c.startswith("set_portal_groups")}
    assert len(renamed) == 201 and all(n.startswith("iqn.2026-12.org.example:") for n in renamed)
    assert engine.target_by_iqn("iqn.2026-12.org.example:t000") is not None
    assert engine.target_by_iqn(iqn) is None
    # An extent change reaches the LU; a removed mapping takes the LU away from the target.
    await service.update_extent(ext.id, {"filesize": "2MB"})
    lu = engine.logical_units.get(ext.id)
    assert lu is not None and lu.num_blocks == (2 << 20) // 512
    m = next(iter(service.model.lun_maps))
    await service.delete_lun_map(m)
    assert engine.logical_units.get(ext.id) is None
    assert engine.target_by_iqn("iqn.2026-12.org.example:new").luns == {}
    await engine.shutdown()


def test_delta_by_identity() -> None:
    from pyscsi_target.config.model import Target

    a = ConfigModel(targets={1: Target(id=1, name="a"), 2: Target(id=2, name="b")})
    a.seal()
    b = a.copy()
    b.targets[2] = dataclasses.replace(a.targets[2], alias="x")
    b.targets[3] = Target(id=3, name="c")
    del b.targets[1]
    d = ModelDelta.between(a, b)
    assert d.targets == {1, 2, 3} and not d.extents and not d.basename and not d.service_enabled
    assert ModelDelta.between(a, a.copy()).targets == set()
