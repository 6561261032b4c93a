"""``--metrics HOST:PORT``: the node's figures in Prometheus' text format (prometheus-client).

The endpoint is a trio task of the daemon (``serve_metrics``), not prometheus-client's HTTP
thread: a scrape builds the status document (mirrorfs.node.status_model) on the trio thread,
between two awaits, so it sees the shippers, the receiver and the FUSE request counters as
they are at one instant and never races the loop. Only ``GET /metrics`` (and ``/``) is
answered, one request per connection, with a deadline; the endpoint has no authentication,
so an address off this machine is refused unless ``--metrics-insecure``.

    curl -s http://127.0.0.1:9101/metrics | grep mirrorfs_
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from mirrorfs.fuse.request_stats import BOUNDS, REQUEST_STATS, RequestStats
from mirrorfs.node.status_model import STAGES

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
_STATES = ("connecting", "waiting", "initial-sync", "resyncing", "streaming",
           "disconnected", "out-of-sync", "fenced", "error")  # fmt: skip


class MetricsAddressError(ValueError):
    """A --metrics address that cannot be used (one line)."""


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) with an IP address or ``localhost``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise MetricsAddressError(f"invalid --metrics address {text!r} (expected HOST:PORT)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise MetricsAddressError(f"invalid port in --metrics {text!r}") from None
    if not 0 < port < 65536:
        raise MetricsAddressError(f"port {port} of --metrics {text!r} is out of range (1-65535)")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise MetricsAddressError(
                f"invalid host in --metrics {text!r} (an IP address or localhost)"
            ) from None
    return host, port


def metrics_argv(address: tuple[str, int]) -> str:
    """``HOST:PORT`` again, for the command line of a detached daemon."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def check_metrics_policy(address: tuple[str, int] | None, insecure: bool) -> None:
    """Refuse an unauthenticated endpoint off this machine unless asked for."""
    if address is not None and not insecure and not is_loopback(address[0]):
        raise MetricsAddressError(
            f"--metrics {address[0]}:{address[1]} is not a loopback address and the endpoint "
            "has no authentication (add --metrics-insecure to serve it anyway)"
        )


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"mirrorfs_{name}", doc, labels=labels or [])


class NodeCollector(Collector):
    """Metric families from ``snapshot()`` (a status document) and the FUSE counters."""

    def __init__(
        self, snapshot: Callable[[], dict[str, Any]], requests: RequestStats = REQUEST_STATS
    ) -> None:
        self.snapshot = snapshot
        self.requests = requests

    def collect(self) -> Iterator[Any]:
        doc = self.snapshot()
        yield from self._node(doc)
        links = list(doc.get("targets") or [])
        if doc.get("source"):
            links.append(doc["source"])
        yield from self._links(links, "target" if doc.get("role") == "source" else "source")
        yield from self._fuse()

    def _node(self, doc: dict[str, Any]) -> Iterator[Any]:
        info = InfoMetricFamily("mirrorfs_node", "This node", labels=["role", "node_id"])
        info.add_metric([], {"role": doc["role"], "node_id": doc["node_id"],
                             "volume_uuid": doc["volume_uuid"]})  # fmt: skip
        yield info
        g = _gauge("epoch", "Current epoch of the volume")
        g.add_metric([], doc.get("epoch") or 0)
        yield g
        g = _gauge("position_seq", "Sequence numbers of this node", ["position"])
        for name in ("committed", "checkpointed", "received", "flushed", "applied"):
            value = doc.get(f"{name}_seq")
            if value is not None:
                g.add_metric([name], value)
        yield g
        g = _gauge("log_bytes", "Bytes of the SAM log")
        g.add_metric([], doc["log"]["bytes"])
        yield g
        if doc["log"].get("cap_bytes"):
            g = _gauge("log_cap_bytes", "Log kept for lagging targets (--max-log)")
            g.add_metric([], doc["log"]["cap_bytes"])
            yield g
        for name, doc_text, value in (
            ("failsafe", "1 if the volume switched to read-only failsafe", doc.get("failed")),
            ("fenced", "1 if a newer epoch fenced this source", doc.get("fenced")),
            ("mounted", "1 if the volume is mounted", doc.get("mounted")),
        ):
            g = _gauge(name, doc_text)
            g.add_metric([], 1 if value else 0)
            yield g

    def _links(self, links: list[dict[str, Any]], peer_kind: str) -> Iterator[Any]:
        labels = ["peer", "peer_kind"]
        connected = _gauge("link_connected", "1 while the link is connected", labels)
        state = _gauge("link_state", "1 for the link's current state", [*labels, "state"])
        pos = _gauge("link_position_seq", "Positions on the link", [*labels, "position"])
        lag = {
            unit: _gauge(f"link_lag_{unit}", f"Lag by stage, in {unit}", [*labels, "stage"])
            for unit in ("transactions", "bytes", "seconds")
        }
        contact = _gauge("link_last_contact_age_seconds", "Seconds since the peer was heard",
                         labels)  # fmt: skip
        rate = _gauge("link_throughput_bytes_per_second", "Bytes/s over the last seconds",
                      labels)  # fmt: skip
        nbytes = CounterMetricFamily("mirrorfs_link_bytes", "Bytes shipped (source) or "
                                     "received (target) on the link", labels=labels)  # fmt: skip
        sent = CounterMetricFamily("mirrorfs_transactions_shipped", "TXNs sent to the target",
                                   labels=labels)  # fmt: skip
        applied = CounterMetricFamily("mirrorfs_transactions_applied", "TXNs applied here "
                                      "from the source", labels=labels)  # fmt: skip
        applied_b = CounterMetricFamily("mirrorfs_applied_bytes", "Block bytes applied here "
                                        "from the source", labels=labels)  # fmt: skip
        resyncs = CounterMetricFamily("mirrorfs_resyncs", "Resyncs started", labels=labels)
        conns = CounterMetricFamily("mirrorfs_link_connections", "Connections made",
                                    labels=labels)  # fmt: skip
        for link in links:
            lv = [link["address"], peer_kind]
            connected.add_metric(lv, 1 if link["connected"] else 0)
            for s in _STATES:
                state.add_metric([*lv, s], 1 if link["state"] == s else 0)
            for name in ("source", "sent", "received", "flushed", "applied"):
                value = link.get(f"{name}_seq")
                if value is not None:
                    pos.add_metric([*lv, name], value)
            for stage in (*STAGES, "total"):
                figures = link["lag"][stage]
                for unit, key in (("transactions", "txns"), ("bytes", "bytes"),
                                  ("seconds", "seconds")):  # fmt: skip
                    if figures[key] is not None:
                        lag[unit].add_metric([*lv, stage], figures[key])
            if link["last_contact_age_seconds"] is not None:
                contact.add_metric(lv, link["last_contact_age_seconds"])
            rate.add_metric(lv, link["throughput_bps"])
            nbytes.add_metric(lv, link["bytes_transferred"])
            if link.get("txns_sent") is not None:
                sent.add_metric(lv, link["txns_sent"])
            if link.get("txns_applied") is not None:
                applied.add_metric(lv, link["txns_applied"])
                applied_b.add_metric(lv, link["bytes_applied"] or 0)
            resyncs.add_metric(lv, link.get("resyncs") or 0)
            conns.add_metric(lv, link["connections"])
        yield from (connected, state, pos, *lag.values(), contact, rate, nbytes, sent, applied,
                    applied_b, resyncs, conns)  # fmt: skip

    def _fuse(self) -> Iterator[Any]:
        count = CounterMetricFamily("mirrorfs_fuse_requests", "FUSE requests", labels=["op"])
        errors = CounterMetricFamily("mirrorfs_fuse_request_errors", "FUSE requests answered "
                                     "with an error (ENOENT included)", labels=["op"])  # fmt: skip
        hist = HistogramMetricFamily("mirrorfs_fuse_request_duration_seconds",
                                     "FUSE request latency", labels=["op"], unit="")  # fmt: skip
        for op, s in sorted(self.requests.ops.items()):
            count.add_metric([op], s.count)
            errors.add_metric([op], s.errors)
            cumulative, buckets = 0, []
            for bound, n in zip((*map(repr, BOUNDS), "+Inf"), s.buckets, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric([op], buckets, s.seconds)
        yield from (count, errors, hist)


def exposition(snapshot: Callable[[], dict[str, Any]]) -> bytes:
    """The metrics text for one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(snapshot))
    return generate_latest(registry)


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _serve_one(stream: trio.SocketStream, snapshot: Callable[[], dict[str, Any]]) -> None:
    try:
        buf = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < MAX_REQUEST:
                data = await stream.receive_some(4096)
                if not data:
                    break
                buf += data
        parts = buf.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            reply = _response("400 Bad Request", b"GET /metrics\n")
        elif parts[1].split(b"?")[0] in (b"/metrics", b"/"):
            body = exposition(snapshot)  # on the trio thread: one consistent snapshot
            reply = _response("200 OK", b"" if parts[0] == b"HEAD" else body,
                              CONTENT_TYPE_LATEST)  # fmt: skip
        else:
            reply = _response("404 Not Found", b"only /metrics here\n")
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def serve_metrics(
    address: tuple[str, int],
    snapshot: Callable[[], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoint until cancelled (``started`` with the bound port). A port that
    cannot be bound is one ERROR line: the node serves on without metrics."""
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s (going on without)", host, port,
                  exc.strerror or exc)  # fmt: skip
        task_status.started(0)
        return
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics at http://%s:%d/metrics", host, bound)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, snapshot)

    await trio.serve_listeners(handler, listeners, task_status=_Started(task_status, bound))


class _Started:
    """Passes ``started`` on with the bound port instead of serve_listeners' listeners."""

    def __init__(self, inner: trio.TaskStatus[int], port: int) -> None:
        self.inner, self.port = inner, port

    def started(self, value: object = None) -> None:
        self.inner.started(self.port)
