"""Façade tables and the generated OpenAPI document: the tables, the responses and the
document cannot drift apart, and a new resource is a table, a handler and its operations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.rest_harness import FN, HN, aio, harness

from pyscsi_target.alerts import Alert
from pyscsi_target.config.fields import Field, Integer, Text
from pyscsi_target.config.model import ConfigModel, Extent, PortalGroup, Target
from rest import freenas_tables
from rest.freenas import RESOURCES
from rest.hnas import ISCSI_TARGET
from rest.openapi import Operation, Response, new_doc
from rest.tables import Column, Table


def _sample(cls: type) -> object:
    """A model object with every field at its default (ids 1)."""
    kwargs = {
        f.name: 1 if f.type in ("int", int) else "x"
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return cls(**kwargs)


def test_every_table_shows_what_its_schema_says() -> None:
    model = ConfigModel()
    for res in RESOURCES:
        obj = _sample(res.kind.cls)
        shown = res.table.serialize(model, obj)
        assert list(shown) == list(res.table.output_schema()["properties"]), res.name
        assert shown["id"] == 1
    for table, obj in (
        (freenas_tables.GLOBAL_CONFIGURATION, model.global_config),
        (freenas_tables.ISCSI_SERVICE, None),
        (freenas_tables.SYSTEM_VERSION, None),
        (freenas_tables.SYSTEM_ALERT, Alert("pool:/x", "WARNING", "m", 1.5)),
        (ISCSI_TARGET, Target(id=1, name="t")),
    ):
        assert list(table.serialize(model, obj)) == list(table.output_schema()["properties"]), table.name


def test_api_names_map_both_ways() -> None:
    for res in RESOURCES:
        table = res.table
        names = [c.api for c in table.columns] + [a for c in table.columns for a in c.aliases]
        assert len(names) == len(set(names)), res.name
        for col in table.columns:
            if col.field is None:
                continue
            for api in (col.api, *col.aliases):
                assert table.to_model({api: "v", "unknown": 1, "id": 9}, drop_null=False) == {col.field.attr: "v"}
            assert table.errors_to_api({col.field.attr: ["m"]}) == {col.api: ["m"]}
        assert table.errors_to_api({"__all__": ["m"], "nonsense": ["n"]}) == {"__all__": ["m", "n"]}
        assert table.to_model({c.api: None for c in table.columns}, drop_null=True) == {}
    # /v9: create-only fields are ignored on PATCH, a derived name's errors are the alias's.
    assert ISCSI_TARGET.to_model({"virtualServerId": 2, "name": "n"}, drop_null=True, create=False) == {}
    assert ISCSI_TARGET.errors_to_api({"name": ["bad"]}) == {"alias": ["bad"]}


def test_extent_shows_zvol_disks_as_zvol() -> None:
    e = Extent(id=1, name="z", type="Disk", disk="zvol/tank/z", path="/dev/zvol/tank/z")
    assert freenas_tables.EXTENT.serialize(ConfigModel(), e)["iscsi_target_extent_type"] == "ZVOL"
    pg = PortalGroup(id=1, tag=1, listen=["127.0.0.1:3260"])
    shown = freenas_tables.PORTAL.serialize(ConfigModel(), pg)["iscsi_target_portal_ips"]
    assert shown == pg.listen and shown is not pg.listen  # a response never aliases the model


@aio
async def test_document_covers_every_route(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        assert h.client is not None
        doc = (await h.call("GET", "/api/openapi.json", auth=False))[1]
        routes = {
            (r.method, r.resource.canonical.rstrip("/"))
            for r in h.client.server.app.router.routes()
            if r.resource is not None and r.method != "HEAD"
        }
    documented = {(m.upper(), p.rstrip("/")) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    assert routes - {("GET", "/api/openapi.json")} == documented
    schemas = doc["components"]["schemas"]
    for res in RESOURCES:
        assert schemas[res.table.name] == res.table.output_schema()
        assert set(schemas[res.table.name + "Input"]["properties"]) == {
            c.api for c in res.table.columns if c.field is not None
        }
        assert "required" not in schemas[res.table.name + "Update"]  # PUT is partial
    post = doc["paths"][f"{FN}/extent/"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ExtentInput"}
    assert set(doc["paths"][HN]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {
        "accessConfig", "alias", "comment", "secret", "virtualServerId", "enableAuthentication", "regenerateGUN", "name"
    }


@aio
async def test_a_new_resource_is_a_table_a_handler_and_its_operations() -> None:
    """What issues 11, 12 and 15 will do: no edit of openapi.py or of the other resources."""
    things = {1: {"id": 1, "name": "one", "size": 5}}
    table = Table(
        "Thing",
        (
            Column("id", show=lambda model, t: t["id"], schema={"type": "integer"}),
            Column("name", Field("name", Text(max_len=8)), show=lambda model, t: t["name"], example="two"),
            Column("size", Field("size", Integer(lo=0)), show=lambda model, t: t["size"]),
        ),
    )

    async def list_things(request: web.Request) -> web.Response:
        return web.json_response([table.serialize(ConfigModel(), t) for t in things.values()])

    app = web.Application()
    doc = new_doc()
    doc.add(
        app,
        Operation(
            "GET", "/api/pyscsi/v1/things/", list_things, "list_things", "pyscsi",
            {200: Response("Things", {"type": "array", "items": doc.component("Thing", table.output_schema())})},
        ),
    )
    document = doc.document()
    assert document["paths"]["/api/pyscsi/v1/things/"]["get"]["operationId"] == "list_things"
    assert document["components"]["schemas"]["Thing"]["required"] == ["id", "name", "size"]
    assert table.input_schema()["properties"]["name"] == {"type": "string", "maxLength": 8, "example": "two"}
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for path in ("/api/pyscsi/v1/things", "/api/pyscsi/v1/things/"):  # trailing slash optional
            resp = await client.get(path)
            assert resp.status == 200 and await resp.json() == [{"id": 1, "name": "one", "size": 5}]


@aio
async def test_new_namespaces_under_api_need_credentials(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, body, headers = await h.call("GET", "/api/pyscsi/v2/sessions/", auth=False)
        assert status == 401 and "WWW-Authenticate" in headers
        assert (await h.call("GET", "/api/pyscsi/v2/sessions/"))[0] == 404
        assert (await h.call("GET", "/api/openapi.json", auth=False))[0] == 200
