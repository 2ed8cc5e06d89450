"""iSNS (RFC 4171): registers this target with the servers of ``iscsi_isns_servers``.

Layers, bottom up: ``wire`` (PDU header and TLV attributes, declared with construct),
``messages`` (requests, responses, the server's ESI/SCN), ``connection`` (a sans-IO
client connection: bytes in, typed events out), ``registration`` (the desired state, a
pure function of the configuration), ``plan`` (the requests from one state to another)
and ``client`` (asyncio: one reconcile loop per server, refresh, backoff).

Wiring into the daemon (pyscsi_target/daemon.py ``serve``)::

    from .isns import IsnsClient, default_entity_id, desired_state

    isns = IsnsClient()
    eid = default_entity_id(opts.state_dir)

    def publish_isns() -> None:  # after every Engine.apply, whether or not every portal bound
        bound = {key: (lst.host, lst.port) for key, lst in engine._listeners.items()}
        isns.update(desired_state(engine.model, bound, entity_id=eid))

    await service.start(...)   # applies the model: portals bound
    publish_isns()
    isns.start()
    ...
    await isns.close()         # at shutdown, before engine.shutdown(): deregisters, at most 5 s

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
    parse_isns_servers,
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
    "parse_isns_servers",
]
