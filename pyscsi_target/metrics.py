"""Prometheus metrics (``GET /metrics``, text exposition format), read at scrape time.

Nothing here runs per command: the transport keeps plain integer counters and fixed
histograms on the objects already on its path (iscsi/stats.py: per LUN of a target; per
session for the rare events) and the collector below turns them into metric families when
Prometheus scrapes.  prometheus-client renders the exposition format.

- I/O, per LUN of a target and per target: ``pyscsi_target_lun_*`` and
  ``pyscsi_target_target_*`` with ``op`` read/write/other: a latency histogram (its
  ``_count`` is the commands, so ``rate(..._count)`` is IOPS), bytes, commands that ended
  with a status other than GOOD; ``pyscsi_target_lun_info`` names each LUN's extent;
- sessions and connections now, logins by session type, refused logins by status;
- digest errors, Rejects by reason, task management functions by function, NOP-Outs,
  Text requests, Async Messages by event, protocol violations;
- fault rules in force and firings by kind, captures;
- the space alerts in effect and their crossings (alerts.py's ``AlertBoard``);
- any other source registered with ``Metrics.add_source`` (e.g. the CHAP and REST
  authentication guards' failure counters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from .iscsi.pdu import AsyncEvent, RejectReason, TmfFunction
from .iscsi.stats import IoStats, OpStats, bucket_bounds_seconds
from .values import LoginStatus

if TYPE_CHECKING:
    from .alerts import AlertBoard
    from .server.engine import Engine

__all__ = ["CONTENT_TYPE", "Metrics"]

# The classic text format (0.0.4), which every Prometheus version parses (Debian 12 ships 2.42).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_PREFIX = "pyscsi_target_"
_BOUNDS = [f"{b:.9g}" for b in bucket_bounds_seconds()] + ["+Inf"]
Labels = tuple[str, ...]
Reading = Mapping[Labels, float] | float


def _name(enum: type[RejectReason] | type[TmfFunction] | type[AsyncEvent], value: int) -> str:
    try:
        return enum(value).name.lower()
    except ValueError:
        return str(value)


@dataclass(frozen=True)
class Source:
    """A value read at scrape time: one number, or one per label combination."""

    name: str  # without the pyscsi_target_ prefix; a counter's name ends in _total
    documentation: str
    read: Callable[[], Reading]
    labels: Sequence[str] = ()
    kind: str = "counter"  # or "gauge"


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        engine = self.m.engine
        if engine is not None:
            yield from _io(engine)
            yield from _sessions(engine)
            yield from _workbench(engine)
        if self.m.alerts is not None:
            yield from _alerts(self.m.alerts)
        for src in self.m.sources:
            yield _source(src)


def _histogram(fam: HistogramMetricFamily, labels: list[str], op: OpStats) -> None:
    buckets = op.buckets()
    fam.add_metric(labels, list(zip(_BOUNDS, buckets, strict=True)), op.latency_ns / 1e9)


def _io(engine: Engine) -> Iterator[Metric]:
    lat = HistogramMetricFamily(_PREFIX + "lun_command_latency_seconds", "SCSI commands by LUN of a target: time "
                                "from the command's arrival to its status going out", labels=["target", "lun", "op"])
    nbytes = CounterMetricFamily(_PREFIX + "lun_bytes", "Bytes read and written by LUN of a target",
                                 labels=["target", "lun", "op"])
    errors = CounterMetricFamily(_PREFIX + "lun_command_errors", "SCSI commands that ended with a status other "
                                 "than GOOD, by LUN of a target", labels=["target", "lun", "op"])
    info = GaugeMetricFamily(_PREFIX + "lun_info", "The extent behind each LUN of a target",
                             labels=["target", "lun", "extent"])
    t_lat = HistogramMetricFamily(_PREFIX + "target_command_latency_seconds", "SCSI commands by target: time from "
                                  "the command's arrival to its status going out", labels=["target", "op"])
    t_bytes = CounterMetricFamily(_PREFIX + "target_bytes", "Bytes read and written by target",
                                  labels=["target", "op"])
    t_errors = CounterMetricFamily(_PREFIX + "target_command_errors", "SCSI commands that ended with a status "
                                   "other than GOOD, by target", labels=["target", "op"])
    for rt in engine.targets_by_id():
        total = IoStats()
        for lun, st in sorted(rt.io_stats.items()):
            for op_name, op in st.ops():
                labels = [rt.iqn, str(lun), op_name]
                _histogram(lat, labels, op)
                nbytes.add_metric(labels, op.bytes)
                errors.add_metric(labels, op.errors)
            total.read.add(st.read)
            total.write.add(st.write)
            total.other.add(st.other)
            lu = rt.luns.get(lun)
            if lu is not None:
                info.add_metric([rt.iqn, str(lun), lu.name], 1)
        for op_name, op in total.ops():
            _histogram(t_lat, [rt.iqn, op_name], op)
            t_bytes.add_metric([rt.iqn, op_name], op.bytes)
            t_errors.add_metric([rt.iqn, op_name], op.errors)
    yield from (lat, nbytes, errors, info, t_lat, t_bytes, t_errors)


def _sessions(engine: Engine) -> Iterator[Metric]:
    reg = engine.session_registry
    sessions = GaugeMetricFamily(_PREFIX + "sessions", "Live sessions by target ('' for Discovery) and type",
                                 labels=["target", "type"])
    counts: dict[tuple[str, str], int] = {}
    for rt in engine.targets_by_id():
        counts[(rt.iqn, "Normal")] = 0
    for s in reg.by_tsih.values():
        key = (s.target.iqn if s.target else "", "Discovery" if s.discovery else "Normal")
        counts[key] = counts.get(key, 0) + 1
    for (target, kind), n in sorted(counts.items()):
        sessions.add_metric([target, kind], n)
    yield sessions
    yield GaugeMetricFamily(_PREFIX + "connections", "Open TCP connections (logging in or logged in)",
                            value=len(engine.connections))
    logins = CounterMetricFamily(_PREFIX + "logins", "Successful logins by session type", labels=["type"])
    for kind in ("Normal", "Discovery"):
        logins.add_metric([kind], reg.started.get(kind, 0))
    yield logins
    failures = CounterMetricFamily(_PREFIX + "login_failures", "Refused logins by status (class and detail)",
                                   labels=["status_class", "status_detail", "status"])
    for status, n in sorted(engine.workbench.login_failures.items()):
        st = LoginStatus.of(status >> 8, status & 0xFF)
        failures.add_metric([f"{status >> 8:#04x}", f"{status & 0xFF:#04x}",
                             st.name.lower() if isinstance(st, LoginStatus) else f"{status:#06x}"], n)
    yield failures
    c = reg.totals()
    digest = CounterMetricFamily(_PREFIX + "digest_errors", "Header and data digest errors", labels=["digest"])
    for kind in ("header", "data"):
        digest.add_metric([kind], c.digest_errors.get(kind, 0))
    yield digest
    rejects = CounterMetricFamily(_PREFIX + "rejects", "Reject PDUs sent, by reason", labels=["reason"])
    for code, n in sorted(c.rejects.items()):
        rejects.add_metric([_name(RejectReason, code)], n)
    yield rejects
    tmfs = CounterMetricFamily(_PREFIX + "task_management_functions", "Task management function requests, by "
                               "function", labels=["function"])
    for code, n in sorted(c.tmfs.items()):
        tmfs.add_metric([_name(TmfFunction, code)], n)
    yield tmfs
    msgs = CounterMetricFamily(_PREFIX + "async_messages", "Asynchronous Messages sent, by event", labels=["event"])
    for code, n in sorted(c.async_messages.items()):
        msgs.add_metric([_name(AsyncEvent, code)], n)
    yield msgs
    yield CounterMetricFamily(_PREFIX + "nop_outs", "NOP-Out PDUs received", value=c.nop_outs)
    yield CounterMetricFamily(_PREFIX + "text_requests", "Text Request PDUs received", value=c.texts)
    yield CounterMetricFamily(_PREFIX + "violations", "Protocol violations of initiators in sessions (Rejects, "
                              "initiator-caused CHECK CONDITIONs) and refused logins",
                              value=c.violations + engine.workbench.login_violations.total)


def _workbench(engine: Engine) -> Iterator[Metric]:
    wb = engine.workbench
    fired = CounterMetricFamily(_PREFIX + "faults_fired", "Fault injection firings, by kind", labels=["kind"])
    for kind, n in sorted(wb.faults.fired_by_kind.items()):
        fired.add_metric([kind], n)
    yield fired
    rules = GaugeMetricFamily(_PREFIX + "fault_rules", "Fault rules, by state", labels=["state"])
    states = {"active": 0, "spent": 0, "expired": 0}
    for r in wb.faults.rules.values():
        states["expired" if r.expired() else "spent" if r.spent else "active"] += 1
    for state, n in states.items():
        rules.add_metric([state], n)
    yield rules
    yield GaugeMetricFamily(_PREFIX + "captures_running", "PDU captures running", value=len(wb.captures.running()))
    yield GaugeMetricFamily(_PREFIX + "strict_targets", "Targets in strict mode", value=len(wb.strict))


def _alerts(board: AlertBoard) -> Iterator[Metric]:
    active = GaugeMetricFamily(_PREFIX + "alerts", "Space threshold alerts in effect, by kind (pool or extent)",
                               labels=["kind"])
    now: dict[str, int] = {"pool": 0, "extent": 0}
    for alert in board.active():
        now[alert.kind] = now.get(alert.kind, 0) + 1
    for kind, n in sorted(now.items()):
        active.add_metric([kind], n)
    yield active
    crossings = CounterMetricFamily(_PREFIX + "alert_crossings", "Space thresholds crossed, by kind",
                                    labels=["kind"])
    for kind in sorted(set(now) | set(board.crossings)):
        crossings.add_metric([kind], board.crossings.get(kind, 0))
    yield crossings


def _source(src: Source) -> Metric:
    name = _PREFIX + src.name.removesuffix("_total")
    fam: CounterMetricFamily | GaugeMetricFamily
    if src.kind == "counter":
        fam = CounterMetricFamily(name, src.documentation, labels=list(src.labels))
    else:
        fam = GaugeMetricFamily(name, src.documentation, labels=list(src.labels))
    value = src.read()
    if isinstance(value, Mapping):
        for labels, v in sorted(value.items()):
            fam.add_metric(list(labels), v)
    else:
        fam.add_metric([], value)
    return fam


class Metrics:
    """The daemon's metrics: a registry of its own with one collector over the engine."""

    def __init__(self, engine: Engine | None, alerts: AlertBoard | None = None) -> None:
        self.engine = engine
        self.alerts = alerts
        self.sources: list[Source] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def add_source(self, name: str, documentation: str, read: Callable[[], Reading], labels: Sequence[str] = (),
                   kind: str = "counter") -> None:
        """Expose a value some other component keeps (read at each scrape, on the loop).

        ``read()`` returns a number, or a mapping from label values (a tuple in the order
        of ``labels``) to numbers.  A counter must never go down."""
        if kind not in ("counter", "gauge"):
            raise ValueError(f"kind must be counter or gauge, not {kind!r}")
        self.sources.append(Source(name, documentation, read, tuple(labels), kind))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
