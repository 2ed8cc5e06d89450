"""ConfigService as a Python API: apply order, demo seeding, parsing helpers, Hitachi auth mapping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.rest_harness import FakeEngine, aio

from pyscsi_target.config.errors import ConflictError, NotFoundError, ValidationError
from pyscsi_target.config.model import SealedError
from pyscsi_target.config.portal_groups import is_local_address
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore
from rest.hnas_view import patch_target, target_auth


def _service(tmp_path: Path) -> tuple[ConfigService, FakeEngine]:
    engine = FakeEngine()
    return ConfigService(ConfigStore(tmp_path), engine), engine


def test_is_local_address() -> None:
    assert is_local_address("127.0.0.1") and is_local_address("0.0.0.0") and is_local_address("::")
    assert not is_local_address("203.0.113.7")


@aio
async def test_every_change_is_persisted_then_applied(tmp_path: Path) -> None:
    service, engine = _service(tmp_path)
    await service.start(default_portals=["127.0.0.1:3260", "[::1]:3260"])
    assert engine.last.portal_groups[1].listen == ["127.0.0.1:3260", "[::1]:3260"]
    t = await service.create_target({"name": "t"})
    assert engine.last.targets[t.id].name == "t"
    # The engine shares the committed objects, which are sealed: nobody can change them behind
    # the service's back; a change of the engine's collections does not reach the service's.
    with pytest.raises(SealedError):
        engine.last.targets[t.id].name = "mutated"
    del engine.last.targets[t.id]
    assert service.model.targets[t.id].name == "t"
    assert ConfigStore(tmp_path).load().targets[t.id].name == "t"
    with pytest.raises(NotFoundError):
        await service.update_target(99, {"alias": "x"})
    with pytest.raises(ValidationError) as err:
        await service.create_target({"name": "Bad Name"})
    assert set(err.value.errors) == {"name"}
    with pytest.raises(ConflictError):
        await service.create_target({"name": "t"})


@aio
async def test_demo_seed_is_idempotent(tmp_path: Path) -> None:
    service, engine = _service(tmp_path)
    await service.start(default_portals=["127.0.0.1:3260"], demo=True)
    m = engine.last
    assert [t.name for t in m.targets.values()] == ["demo"]
    (extent,) = m.extents.values()
    assert Path(extent.path) == tmp_path / "extents" / "demo.img"
    assert Path(extent.path).stat().st_size == 1 << 30
    assert m.luns_of_target(1) == {0: extent}
    assert [(g.portal_group, g.initiator_group, g.auth_type) for g in m.target_groups.values()] == [(1, None, "None")]
    service2 = ConfigService(ConfigStore(tmp_path), FakeEngine())
    await service2.start(default_portals=["0.0.0.0:3260"], demo=True)
    assert service2.model == service.model  # nothing added twice, default portals not re-seeded


@aio
async def test_concurrent_mutations_are_serialized(tmp_path: Path) -> None:
    service, engine = _service(tmp_path)
    await service.start(default_portals=["127.0.0.1:3260"])
    results = await asyncio.gather(
        *(service.create_target({"name": f"n{i % 5}"}) for i in range(20)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 5 and all(isinstance(r, ConflictError) for r in results if isinstance(r, Exception))
    assert sorted(t.id for t in ok) == [1, 2, 3, 4, 5]


@aio
async def test_hnas_auth_never_touches_a_shared_group(tmp_path: Path) -> None:
    service, engine = _service(tmp_path)
    await service.start(default_portals=["127.0.0.1:3260"])
    shared = await service.create_auth_credential({"tag": 1, "user": "u", "secret": "sharedsecret"})
    for name in ("a", "b"):
        t = await service.create_target({"name": name})
        await service.create_target_group({"target": t.id, "portal_group": 1, "auth_type": "CHAP", "auth_group": 1})
    assert target_auth(service.model, service.model.targets[1]) == (True, "sharedsecret")
    await patch_target(service, 1, {"secret": "own-secret-1"})
    m = service.model
    assert m.auth_credentials[shared.id].secret == "sharedsecret"
    new_tag = m.target_groups[1].auth_group
    assert new_tag != 1 and [c.user for c in m.auth_group(new_tag)] == ["a"]
    assert target_auth(m, m.targets[1]) == (True, "own-secret-1")
    assert target_auth(m, m.targets[2]) == (True, "sharedsecret")
    # Deleting the target leaves other targets' state alone.
    await service.delete_target(1)
    assert target_auth(service.model, service.model.targets[2]) == (True, "sharedsecret")


@aio
async def test_hnas_enable_reuses_an_existing_group_for_every_portal(tmp_path: Path) -> None:
    service, engine = _service(tmp_path)
    await service.start(default_portals=["127.0.0.1:3260"])
    await service.create_portal_group({"listen": ["127.0.0.1:3261"]})
    await service.create_auth_credential({"tag": 5, "user": "u", "secret": "sharedsecret"})
    t = await service.create_target({"name": "a"})
    await service.create_target_group({"target": t.id, "portal_group": 1, "auth_group": 5})
    await service.create_target_group({"target": t.id, "portal_group": 2})
    await patch_target(service, t.id, {"enable_authentication": True})
    groups = service.model.groups_of_target(t.id)
    assert [(g.auth_type, g.auth_group) for g in groups] == [("CHAP", 5), ("CHAP", 5)]
    assert target_auth(engine.last, engine.last.targets[t.id]) == (True, "sharedsecret")
    # A target not exported yet keeps the setting and its own secret for the groups to come.
    bare = await service.create_target({"name": "bare"})
    with pytest.raises(ValidationError):  # no secret to enable with: refused, nothing changed
        await patch_target(service, bare.id, {"enable_authentication": True})
    assert len(service.model.auth_credentials) == 1 and not service.model.targets[bare.id].auth_required
    await patch_target(service, bare.id, {"enable_authentication": True, "secret": "x" * 12})
    m = service.model
    assert m.targets[bare.id].auth_required and target_auth(m, m.targets[bare.id]) == (True, "x" * 12)
    g = await service.create_target_group({"target": bare.id, "portal_group": 2})
    assert (g.auth_type, g.auth_group) == ("CHAP", m.targets[bare.id].auth_group) and g.auth_group != 5


@aio
async def test_a_refused_change_leaves_no_file_behind(tmp_path: Path) -> None:
    service, engine = _service(tmp_path)
    await service.start(default_portals=["127.0.0.1:3260"])
    path = tmp_path / "extents" / "e.img"
    engine.fail_next = OSError("engine says no")
    with pytest.raises(ValidationError, match="engine says no"):
        await service.create_extent({"name": "e", "path": "e.img", "filesize": "1MB"})
    assert not path.exists() and not service.model.extents and not ConfigStore(tmp_path).load().extents
    e = await service.create_extent({"name": "e", "path": "e.img", "filesize": "1MB"})
    assert path.stat().st_size == 1 << 20
    # The file goes only once the deletion took effect.
    engine.fail_next = OSError("engine says no")
    with pytest.raises(ValidationError):
        await service.delete_extent(e.id, delete_file=True)
    assert path.exists() and e.id in service.model.extents
    await service.delete_extent(e.id, delete_file=True)
    assert not path.exists() and not service.model.extents
