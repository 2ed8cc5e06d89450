"""iSNS (RFC 4171): registers this target with the servers of ``iscsi_isns_servers``.

Layers, bottom up: ``wire`` (PDU header and TLV attributes, declared with construct),
``messages`` (requests, responses, the server's ESI/SCN), ``connection`` (a sans-IO
client connection: bytes in, typed events out), ``registration`` (the desired state, a
pure function of the configuration), ``plan`` (the requests from one state to another)
and ``client`` (asyncio: one reconcile loop per server, refresh, backoff).

Wiring: the daemon (pyscsi_target/daemon.py ``serve``) calls ``isns.update(desired_state(
engine.model, engine.bound_portals(), entity_id=...))`` from the engine's ``on_applied`` hook,
``isns.start()`` once the API is up and ``await isns.close()`` (deregisters, at most 5 s) before
the engine shuts down.

``update`` and ``start`` return at once; nothing here waits on an iSNS server.
"""

from .client import IsnsClient, ServerState
from .registration import (
    DesiredState,
    Node,
    Portal,
    Registration,
    default_entity_id,
    desired_state,
)

__all__ = [
    "DesiredState",
    "IsnsClient",
    "Node",
    "Portal",
    "Registration",
    "ServerState",
    "default_entity_id",
    "desired_state",
]
