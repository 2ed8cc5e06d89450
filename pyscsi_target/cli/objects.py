"""Commands that list, create and delete objects, each through the REST API (so the API's
validation and messages apply).  Each returns the exit status; a refused request raises
ApiError, which ``main`` prints with the API's field names turned into this command's
option names (``FIELDS``)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .client import FREENAS, NATIVE, ApiClient, ApiError, CliError
from .output import console, human_size, print_json, print_table
from .progress import progress_bar, wait

# API field name -> what the user typed, per command (for error messages).
FIELDS: dict[str, dict[str, str]] = {
    "target": {
        "iscsi_target_name": "NAME", "iscsi_target_alias": "--alias", "iscsi_target_authtype": "--auth",
        "iscsi_target_authgroup": "--auth-group", "iscsi_target_initiatorgroup": "--initiator-group",
        "iscsi_target_portalgroup": "--portal-group",
    },
    "extent": {
        "iscsi_target_extent_name": "NAME", "name": "NAME", "iscsi_target_extent_path": "--path", "path": "--path",
        "iscsi_target_extent_filesize": "--size", "filesize": "--size", "size": "FILE's size",
        "iscsi_target_extent_blocksize": "--blocksize", "blocksize": "--blocksize", "allocation": "--allocation",
        "iscsi_target_extent_rpm": "--rpm", "rpm": "--rpm", "iscsi_target_extent_comment": "--comment",
        "comment": "--comment",
    },
    "lun": {"iscsi_target": "TARGET", "iscsi_extent": "EXTENT", "iscsi_lunid": "--lun"},
    "initiator-group": {
        "iscsi_target_initiator_initiators": "--initiators", "iscsi_target_initiator_auth_network": "--networks",
        "iscsi_target_initiator_comment": "--comment",
    },
    "chap": {
        "iscsi_target_auth_tag": "TAG", "iscsi_target_auth_user": "USER", "iscsi_target_auth_secret": "secret",
        "iscsi_target_auth_peeruser": "--peer-user", "iscsi_target_auth_peersecret": "peer secret",
    },
    "portal-group": {"iscsi_target_portal_ips": "LISTEN", "iscsi_target_portal_comment": "--comment"},
}


def _ok(message: str) -> None:
    console().print(message)


def _by_name(client: ApiClient, resource: str, key: str, ref: str, label: str) -> dict[str, Any]:
    """The object whose ``key`` is ``ref`` (or whose id is ``ref``)."""
    objs = client.list_all(resource)
    for obj in objs:
        if str(obj[key]) == ref:
            return obj
    if ref.isdigit():
        for obj in objs:
            if obj["id"] == int(ref):
                return obj
    raise CliError(f"no {label} {ref!r}")


# --- targets -----------------------------------------------------------------------------------


def target_list(client: ApiClient, args: argparse.Namespace) -> int:
    targets = client.list_all("target")
    if args.json:
        print_json(targets)
        return 0
    basename = client.request("GET", f"{FREENAS}/globalconfiguration/")["iscsi_basename"]
    rows = []
    for t in targets:
        name = t["iscsi_target_name"]
        iqn = name if name.startswith(("iqn.", "eui.", "naa.")) else f"{basename}:{name}"
        rows.append((t["id"], name, iqn, t["iscsi_target_alias"] or ""))
    print_table("Targets", ("id", "name", "IQN", "alias"), rows)
    return 0


def target_create(client: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, object] = {"iscsi_target_name": args.name}
    if args.alias:
        body["iscsi_target_alias"] = args.alias
    target = client.request("POST", f"{FREENAS}/target/", body)
    try:
        portals = client.list_all("portal")
        if args.portal_group:
            wanted = set(args.portal_group)
            chosen = [p for p in portals if p["iscsi_target_portal_tag"] in wanted]
            missing = wanted - {p["iscsi_target_portal_tag"] for p in chosen}
            if missing:
                raise CliError(f"--portal-group: no portal group with tag {', '.join(map(str, sorted(missing)))}")
        else:
            chosen = portals
        ig = None
        if args.initiator_group is not None:
            ig = _by_name(client, "authorizedinitiator", "iscsi_target_initiator_tag", str(args.initiator_group),
                          "initiator group with tag")["id"]
        for pg in chosen:
            client.request("POST", f"{FREENAS}/targetgroup/", {
                "iscsi_target": target["id"], "iscsi_target_portalgroup": pg["id"],
                "iscsi_target_initiatorgroup": ig, "iscsi_target_authtype": args.auth,
                "iscsi_target_authgroup": args.auth_group,
            })
    except BaseException:
        # All or nothing: a target that could not be exported as asked is removed again.
        client.request("DELETE", f"{FREENAS}/target/{target['id']}/")
        raise
    if args.json:
        print_json(target)
    else:
        tags = ", ".join(str(p["iscsi_target_portal_tag"]) for p in chosen) or "none"
        _ok(f"created target [bold]{args.name}[/] (id {target['id']}) on portal group(s) {tags}")
    return 0


def target_delete(client: ApiClient, args: argparse.Namespace) -> int:
    target = _by_name(client, "target", "iscsi_target_name", args.name, "target")
    client.request("DELETE", f"{FREENAS}/target/{target['id']}/")
    _ok(f"deleted target [bold]{target['iscsi_target_name']}[/] with its LUN maps and portal group bindings")
    return 0


# --- extents -----------------------------------------------------------------------------------


def extent_list(client: ApiClient, args: argparse.Namespace) -> int:
    usage = client.request("GET", f"{NATIVE}/extents/")
    if args.json:
        print_json(usage)
        return 0
    rows = [(u["id"], u["name"], u["type"], human_size(u["size"]),
             human_size(u["allocated"]) if u["allocated"] is not None else "", u["blocksize"], u["path"],
             u["error"] or "") for u in usage]
    print_table("Extents", ("id", "name", "type", "size", "allocated", "block", "path", "error"), rows)
    return 0


def _extent_fields(args: argparse.Namespace) -> dict[str, object]:
    fields: dict[str, object] = {"name": args.name, "path": args.path or f"{args.name}.img"}
    for attr in ("blocksize", "rpm", "comment"):
        if getattr(args, attr, None) is not None:
            fields[attr] = getattr(args, attr)
    if getattr(args, "ro", False):
        fields["ro"] = True
    return fields


def extent_create(client: ApiClient, args: argparse.Namespace) -> int:
    fields = _extent_fields(args)
    if args.allocation == "sparse":
        body = {f"iscsi_target_extent_{k}": v for k, v in fields.items()}
        body.update(iscsi_target_extent_type="File", iscsi_target_extent_filesize=args.size or "0")
        extent = client.request("POST", f"{FREENAS}/extent/", body)
        if args.json:
            print_json(extent)
        else:
            _ok(f"created extent [bold]{args.name}[/] (id {extent['id']}): "
                f"{extent['iscsi_target_extent_path']}, {extent['iscsi_target_extent_filesize']} (sparse)")
        return 0
    if not args.size:
        raise CliError(f"--size is required with --allocation {args.allocation}")
    job = client.request("POST", f"{NATIVE}/extents/", {**fields, "filesize": args.size, "allocation": args.allocation})
    return _follow(client, args, job, "created extent")


def _follow(client: ApiClient, args: argparse.Namespace, job: dict[str, Any], done: str) -> int:
    if args.no_wait:
        if args.json:
            print_json(job)
        else:
            _ok(f"job {job['id']} started: {job['description']}")
        return 0
    job = wait(client, job)
    if args.json:
        print_json(job)
    else:
        r = job["result"]
        _ok(f"{done} [bold]{r['name']}[/] (id {r['extent']}): {r['path']}, {human_size(r['size'])}")
    return 0


def extent_resize(client: ApiClient, args: argparse.Namespace) -> int:
    extent = _by_name(client, "extent", "iscsi_target_extent_name", args.name, "extent")
    job = client.request("POST", f"{NATIVE}/extents/{extent['id']}/resize/",
                         {"filesize": args.size, "allocation": args.allocation})
    return _follow(client, args, job, "resized extent")


def extent_delete(client: ApiClient, args: argparse.Namespace) -> int:
    extent = _by_name(client, "extent", "iscsi_target_extent_name", args.name, "extent")
    client.request("DELETE", f"{FREENAS}/extent/{extent['id']}/", {"delete": bool(args.delete_file)})
    what = " and its file" if args.delete_file else " (its file is kept)"
    _ok(f"deleted extent [bold]{extent['iscsi_target_extent_name']}[/]{what}")
    return 0


# Image formats that are not raw: importing them as raw would serve their headers as data.
_NOT_RAW = ((b"QFI\xfb", "qcow2"), (b"KDMV", "VMDK"), (b"vhdxfile", "VHDX"), (b"<<< Oracle VM", "VDI"))


def extent_import(client: ApiClient, args: argparse.Namespace) -> int:
    source = Path(args.file)
    try:
        size = source.stat().st_size
        with open(source, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from None
    for magic, kind in _NOT_RAW:
        if head.startswith(magic):
            raise CliError(f"{source} is a {kind} image, not raw: convert it first "
                           f"(qemu-img convert -O raw {source} {source.stem}.raw)")
    args.name = args.name or source.stem
    fields = _extent_fields(args)
    query = {**{k: str(v).lower() if isinstance(v, bool) else v for k, v in fields.items()}, "size": size}
    # Checked before any data is sent: a refused name or path costs nothing.
    client.request("POST", f"{NATIVE}/extents/import/", query={**query, "dry_run": "true"})

    def chunks(update: Any) -> Iterator[bytes]:
        sent = 0
        with open(source, "rb") as f:
            while block := f.read(1 << 20):
                yield block
                sent += len(block)
                update(sent)

    try:
        with progress_bar(f"uploading {source.name}", size) as update:
            job = client.request("POST", f"{NATIVE}/extents/import/", query=query, data=chunks(update), length=size)
    except KeyboardInterrupt:
        raise CliError("upload interrupted: nothing was imported") from None
    if args.json:
        print_json(job)
    else:
        r = job["result"]
        _ok(f"imported {source} into extent [bold]{r['name']}[/] (id {r['extent']}): {r['path']}, "
            f"{human_size(r['size'])}")
    return 0


# --- LUN maps ----------------------------------------------------------------------------------


def lun_list(client: ApiClient, args: argparse.Namespace) -> int:
    maps = client.list_all("targettoextent")
    if args.json:
        print_json(maps)
        return 0
    targets = {t["id"]: t["iscsi_target_name"] for t in client.list_all("target")}
    extents = {e["id"]: e["iscsi_target_extent_name"] for e in client.list_all("extent")}
    rows = sorted((targets.get(m["iscsi_target"], "?"), m["iscsi_lunid"], extents.get(m["iscsi_extent"], "?"), m["id"])
                  for m in maps)
    print_table("LUN maps", ("target", "LUN", "extent", "id"), rows)
    return 0


def lun_map(client: ApiClient, args: argparse.Namespace) -> int:
    target = _by_name(client, "target", "iscsi_target_name", args.target, "target")
    extent = _by_name(client, "extent", "iscsi_target_extent_name", args.extent, "extent")
    m = client.request("POST", f"{FREENAS}/targettoextent/", {
        "iscsi_target": target["id"], "iscsi_extent": extent["id"], "iscsi_lunid": args.lun})
    if args.json:
        print_json(m)
    else:
        _ok(f"mapped extent [bold]{args.extent}[/] to LUN {m['iscsi_lunid']} of target [bold]{args.target}[/]")
    return 0


def lun_unmap(client: ApiClient, args: argparse.Namespace) -> int:
    target = _by_name(client, "target", "iscsi_target_name", args.target, "target")
    maps = [m for m in client.list_all("targettoextent")
            if m["iscsi_target"] == target["id"] and m["iscsi_lunid"] == args.lun]
    if not maps:
        raise CliError(f"target {args.target} has no LUN {args.lun}")
    client.request("DELETE", f"{FREENAS}/targettoextent/{maps[0]['id']}/")
    _ok(f"unmapped LUN {args.lun} of target [bold]{args.target}[/] (the extent is kept)")
    return 0


# --- initiator groups, CHAP credentials, portal groups -----------------------------------------


def initiator_group_list(client: ApiClient, args: argparse.Namespace) -> int:
    groups = client.list_all("authorizedinitiator")
    if args.json:
        print_json(groups)
        return 0
    rows = [(g["iscsi_target_initiator_tag"], g["iscsi_target_initiator_initiators"],
             g["iscsi_target_initiator_auth_network"], g["iscsi_target_initiator_comment"], g["id"]) for g in groups]
    print_table("Initiator groups", ("tag", "initiators", "networks", "comment", "id"), rows)
    return 0


def initiator_group_create(client: ApiClient, args: argparse.Namespace) -> int:
    g = client.request("POST", f"{FREENAS}/authorizedinitiator/", {
        "iscsi_target_initiator_initiators": " ".join(args.initiators) if args.initiators else "ALL",
        "iscsi_target_initiator_auth_network": " ".join(args.networks) if args.networks else "ALL",
        "iscsi_target_initiator_comment": args.comment or ""})
    if args.json:
        print_json(g)
    else:
        _ok(f"created initiator group tag {g['iscsi_target_initiator_tag']} (id {g['id']})")
    return 0


def initiator_group_delete(client: ApiClient, args: argparse.Namespace) -> int:
    g = _by_name(client, "authorizedinitiator", "iscsi_target_initiator_tag", str(args.tag),
                 "initiator group with tag")
    client.request("DELETE", f"{FREENAS}/authorizedinitiator/{g['id']}/")
    _ok(f"deleted initiator group tag {args.tag} (and the portal bindings that used it: access fails closed)")
    return 0


def chap_list(client: ApiClient, args: argparse.Namespace) -> int:
    creds = client.list_all("authcredential")
    for c in creds:  # never shown, not even as JSON
        c.pop("iscsi_target_auth_secret", None)
        c.pop("iscsi_target_auth_peersecret", None)
    if args.json:
        print_json(creds)
        return 0
    rows = [(c["iscsi_target_auth_tag"], c["iscsi_target_auth_user"], c["iscsi_target_auth_peeruser"], c["id"])
            for c in creds]
    print_table("CHAP credentials", ("tag", "user", "peer user (mutual)", "id"), rows)
    return 0


def _secret(given: str | None, env: str, prompt: str) -> str:
    if given is not None:
        return given
    if os.environ.get(env):
        return os.environ[env]
    if not sys.stdin.isatty():
        raise CliError(f"no {prompt}: set {env} (standard input is not a terminal)")
    first = getpass.getpass(f"{prompt}: ")
    if getpass.getpass(f"{prompt} again: ") != first:
        raise CliError(f"the two {prompt}s differ")
    return first


def chap_create(client: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, object] = {
        "iscsi_target_auth_tag": args.tag, "iscsi_target_auth_user": args.chap_user,
        "iscsi_target_auth_secret": _secret(args.secret, "PYSCSI_TARGET_CHAP_SECRET", "CHAP secret"),
    }
    if args.peer_user:
        body["iscsi_target_auth_peeruser"] = args.peer_user
        body["iscsi_target_auth_peersecret"] = _secret(args.peer_secret, "PYSCSI_TARGET_CHAP_PEER_SECRET",
                                                       "peer secret")
    c = client.request("POST", f"{FREENAS}/authcredential/", body)
    _ok(f"created CHAP user [bold]{args.chap_user}[/] in auth group {args.tag} (id {c['id']})")
    return 0


def chap_delete(client: ApiClient, args: argparse.Namespace) -> int:
    creds = [c for c in client.list_all("authcredential")
             if c["iscsi_target_auth_tag"] == args.tag and c["iscsi_target_auth_user"] == args.chap_user]
    if not creds:
        raise CliError(f"no CHAP user {args.chap_user!r} in auth group {args.tag}")
    client.request("DELETE", f"{FREENAS}/authcredential/{creds[0]['id']}/")
    _ok(f"deleted CHAP user [bold]{args.chap_user}[/] from auth group {args.tag}")
    return 0


def portal_group_list(client: ApiClient, args: argparse.Namespace) -> int:
    pgs = client.list_all("portal")
    if args.json:
        print_json(pgs)
        return 0
    rows = [(p["iscsi_target_portal_tag"], ", ".join(p["iscsi_target_portal_ips"]),
             p["iscsi_target_portal_discoveryauthmethod"], p["iscsi_target_portal_comment"], p["id"]) for p in pgs]
    print_table("Portal groups", ("tag", "listen", "discovery auth", "comment", "id"), rows)
    return 0


def portal_group_create(client: ApiClient, args: argparse.Namespace) -> int:
    p = client.request("POST", f"{FREENAS}/portal/", {"iscsi_target_portal_ips": args.listen,
                                                      "iscsi_target_portal_comment": args.comment or ""})
    _ok(f"created portal group tag {p['iscsi_target_portal_tag']} (id {p['id']}) listening on "
        f"{', '.join(p['iscsi_target_portal_ips'])}")
    return 0


def portal_group_delete(client: ApiClient, args: argparse.Namespace) -> int:
    p = _by_name(client, "portal", "iscsi_target_portal_tag", str(args.tag), "portal group with tag")
    client.request("DELETE", f"{FREENAS}/portal/{p['id']}/")
    _ok(f"deleted portal group tag {args.tag}")
    return 0


# --- sessions, jobs ----------------------------------------------------------------------------


def sessions(client: ApiClient, args: argparse.Namespace) -> int:
    snaps = client.request("GET", f"{NATIVE}/sessions/")
    if args.json:
        print_json(snaps)
        return 0
    rows = [(s["tsih"], s["type"], s["initiator"], s["target"] or "", s["peer"] or "", s["isid"],
             f"{'CRC32C' if s['header_digest'] else 'None'}/{'CRC32C' if s['data_digest'] else 'None'}", s["tasks"])
            for s in snaps]
    print_table("Sessions", ("TSIH", "type", "initiator", "target", "peer", "ISID", "digests", "tasks"), rows)
    return 0


def job_list(client: ApiClient, args: argparse.Namespace) -> int:
    jobs = client.request("GET", f"{NATIVE}/jobs/")
    if args.json:
        print_json(jobs)
        return 0
    rows = [(j["id"], j["kind"], j["state"], f"{j['percent']:.1f}%", j["description"], j["message"]) for j in jobs]
    print_table("Jobs", ("id", "kind", "state", "done", "description", "message"), rows)
    return 0


def job_show(client: ApiClient, args: argparse.Namespace) -> int:
    print_json(client.request("GET", f"{NATIVE}/jobs/{args.id}/"))
    return 0


def job_wait(client: ApiClient, args: argparse.Namespace) -> int:
    job = wait(client, client.request("GET", f"{NATIVE}/jobs/{args.id}/"))
    if args.json:
        print_json(job)
    else:
        _ok(f"job {job['id']} succeeded: {job['description']}")
    return 0


def job_cancel(client: ApiClient, args: argparse.Namespace) -> int:
    try:
        client.request("DELETE", f"{NATIVE}/jobs/{args.id}/")
    except ApiError as exc:
        raise CliError(f"job {args.id}: {exc}") from None
    _ok(f"job {args.id}: cancel requested (or forgotten, if it had finished)")
    return 0
