"""Prometheus metrics at `<internal_prefix>metrics`, summed over every worker of the gateway.

The request path counts with plain integers on objects it holds anyway (`gateway/counters.py`,
`RequestFlow`, `TokenCache`, the writers); nothing here runs per request. A scrape takes a
`snapshot` of those numbers (a JSON-able mapping), adds the other workers' latest snapshots and
hands the sum to prometheus-client, whose custom collector renders the text exposition format.

With `workers: N` each worker is its own process, so each one writes its snapshot every
`SHARE_INTERVAL` into a directory the supervisor made for them (`<pid>.json`, replaced
atomically), and whichever worker a scrape reaches answers for all: its own numbers as they are
now, the others' as of their last write (a second old at most). A worker writes once more as it
stops; the counters of a worker that is gone stay in the sum (so totals never go back when one
is restarted), its gauges do not.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from gateway.counters import Buckets
from gateway.mqtt.front import MqttFront
from gateway.proxy.flow import RequestFlow
from gateway.store.cache import TokenCache
from gateway.store.health import StoreMonitor
from gateway.store.tokens import TokenStore
from gateway.writers.logs import LogWriter
from gateway.writers.tokenlogs import RedisLogSink
from gateway.writers.usage import UsageMeter

log = logging.getLogger("gateway.metrics")
CONTENT_TYPE = CONTENT_TYPE_LATEST
SHARE_INTERVAL = 1.0
# How a gauge of several workers adds up: per-process quantities are summed; what every worker
# sees of the same shared state takes the worst (`min` of an up/down, `max` of a lag).
SUM, MIN, MAX = "sum", "min", "max"


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str  # counter, gauge (with its SUM/MIN/MAX), histogram
    help: str
    labels: tuple[str, ...] = ()
    merge: str = SUM


FAMILIES = {family.name: family for family in (
    Family("gateway_requests", "counter", "Requests served, by front and status class", ("front", "code")),
    Family("gateway_refusals", "counter",
           "Replies the gateway made itself instead of the upstream's (refusals and upstream failures), by kind",
           ("reason",)),
    Family("gateway_upstream_latency_seconds", "histogram",
           "From a request sent upstream to the head of its reply"),
    Family("gateway_cache_hits", "counter", "Token lookups answered from the in-process cache"),
    Family("gateway_cache_misses", "counter", "Token lookups that waited for the store"),
    Family("gateway_cache_entries", "gauge", "Token records (and unknown keys) cached, all workers"),
    Family("gateway_store_batch_seconds", "histogram", "Round trips of the batched store traffic (loads, writes)"),
    Family("gateway_store_probe_seconds", "histogram", "Round trips of the store probe (one a second)"),
    Family("gateway_store_up", "gauge", "1 when the token store answers its probe (0 if any worker's fails)",
           merge=MIN),
    Family("gateway_store_outages", "counter", "Times a worker found the token store unreachable"),
    Family("gateway_invalidation_live", "gauge", "1 when the invalidation channel is subscribed (every worker)",
           merge=MIN),
    Family("gateway_invalidation_lag_seconds", "gauge",
           "Time for a message published on the invalidation channel to be heard back (worst worker)", merge=MAX),
    Family("gateway_log_lines_written", "counter", "Log records written (request log and events)"),
    Family("gateway_log_lines_dropped", "counter",
           "Log records dropped: the queue was full, or the token logs could not be kept while the store was away",
           ("stage",)),
    Family("gateway_usage_blocks", "counter", "Tokens blocked for their account's usage (event 20)"),
    Family("gateway_usage_blocked_tokens", "gauge", "Tokens blocked now", merge=MAX),
    Family("gateway_open_connections", "gauge", "Open client connections, all workers"),
    Family("gateway_mqtt_sessions", "gauge", "Open MQTT sessions (accepted by the broker), all workers"),
    Family("gateway_mqtt_connects", "counter", "MQTT CONNECTs answered, by CONNACK outcome", ("outcome",)),
    Family("gateway_mqtt_messages", "counter", "MQTT PUBLISH packets passed, by direction", ("direction",)),
    Family("gateway_mqtt_bytes", "counter", "Bytes of the MQTT PUBLISH packets passed, by direction",
           ("direction",)),
    Family("gateway_mqtt_refusals", "counter",
           "MQTT packets refused for the token's rights: publishes, subscriptions (per filter), deliveries withheld",
           ("kind",)),
    Family("gateway_workers", "gauge", "Worker processes whose numbers are in this answer"),
)}
SEPARATOR = "\x1f"  # between a key's name and labels: label values are ids, never text


def key(name: str, **labels: str) -> str:
    return SEPARATOR.join([name, *(f"{label}={value}" for label, value in labels.items())])


def split_key(text: str) -> tuple[str, dict[str, str]]:
    name, *pairs = text.split(SEPARATOR)
    return name, dict(pair.split("=", 1) for pair in pairs)


def histogram(buckets: Buckets) -> dict[str, Any]:
    return {"bounds": list(buckets.bounds), "counts": list(buckets.counts), "sum": buckets.total}


@dataclass(slots=True)
class Sources:
    """The objects of one worker whose numbers the metrics are."""

    flow: RequestFlow
    cache: TokenCache
    store: TokenStore
    monitor: StoreMonitor
    logs: LogWriter
    token_logs: RedisLogSink | None
    usage: UsageMeter
    connections: Callable[[], int]
    mqtt: Callable[[], MqttFront | None] = lambda: None  # the MQTT front, when configured


def snapshot(sources: Sources) -> dict[str, Any]:
    """This worker's numbers now, as JSON-able mappings of `key` to value."""
    flow, cache, monitor = sources.flow, sources.cache, sources.monitor
    counters: dict[str, float] = {}
    for front, counts in (("fast", flow.fast), ("aiohttp", flow.aiohttp), ("decision", flow.decision)):
        for code, count in counts.by_class().items():
            counters[key("gateway_requests", front=front, code=code)] = count
    for reason, count in flow.refusals.items():
        counters[key("gateway_refusals", reason=reason)] = count
    counters[key("gateway_cache_hits")] = cache.hits
    counters[key("gateway_cache_misses")] = cache.misses
    counters[key("gateway_store_outages")] = monitor.outages
    counters[key("gateway_log_lines_written")] = sources.logs.written
    counters[key("gateway_log_lines_dropped", stage="queue")] = sources.logs.dropped
    counters[key("gateway_log_lines_dropped", stage="token_logs")] = (
        sources.token_logs.dropped if sources.token_logs is not None else 0)
    counters[key("gateway_usage_blocks")] = sources.usage.blocks
    mqtt = sources.mqtt()
    if mqtt is not None:
        mqtt_counters(mqtt, counters)
    lag = monitor.invalidation_lag()
    gauges: dict[str, float] = {
        key("gateway_cache_entries"): len(cache),
        key("gateway_open_connections"): sources.connections(),
        key("gateway_store_up"): 1 if monitor.available else 0,
        key("gateway_invalidation_live"): 1 if monitor.invalidation_live() else 0,
        key("gateway_usage_blocked_tokens"): len(sources.usage.blocked),
        key("gateway_workers"): 1,
    }
    if mqtt is not None:
        gauges[key("gateway_mqtt_sessions")] = sum(len(group) for group in mqtt.by_digest.values())
    if lag is not None:
        gauges[key("gateway_invalidation_lag_seconds")] = lag
    histograms = {
        key("gateway_upstream_latency_seconds"): histogram(flow.upstream_latency),
        key("gateway_store_batch_seconds"): histogram(sources.store.batch_latency),
        key("gateway_store_probe_seconds"): histogram(monitor.probe_latency),
    }
    return {"pid": os.getpid(), "counters": counters, "gauges": gauges, "histograms": histograms}


def mqtt_counters(front: MqttFront, counters: dict[str, float]) -> None:
    counts = front.counts
    for outcome, count in counts.connects.items():
        counters[key("gateway_mqtt_connects", outcome=outcome)] = count
    for direction, messages, size in (("to_broker", counts.messages_in, counts.bytes_in),
                                      ("to_client", counts.messages_out, counts.bytes_out)):
        counters[key("gateway_mqtt_messages", direction=direction)] = messages
        counters[key("gateway_mqtt_bytes", direction=direction)] = size
    for kind, count in (("publish", counts.refused_publishes), ("subscribe", counts.refused_subscriptions),
                        ("deliver", counts.withheld)):
        counters[key("gateway_mqtt_refusals", kind=kind)] = count


def merge(snapshots: list[dict[str, Any]], live: Callable[[int], bool]) -> dict[str, Any]:
    """The sum of several workers' snapshots; gauges only of the workers still running (`live`)."""
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    histograms: dict[str, dict[str, Any]] = {}
    for each in snapshots:
        for name, value in each["counters"].items():
            counters[name] = counters.get(name, 0) + value
        if live(int(each["pid"])):
            for name, value in each["gauges"].items():
                rule = FAMILIES[split_key(name)[0]].merge
                if name not in gauges:
                    gauges[name] = value
                elif rule == SUM:
                    gauges[name] += value
                else:
                    gauges[name] = min(gauges[name], value) if rule == MIN else max(gauges[name], value)
        for name, value in each["histograms"].items():
            held = histograms.get(name)
            if held is None or held["bounds"] != value["bounds"]:  # another build's buckets: the newest wins
                histograms[name] = {"bounds": value["bounds"], "counts": list(value["counts"]), "sum": value["sum"]}
            else:
                held["counts"] = [a + b for a, b in zip(held["counts"], value["counts"], strict=True)]
                held["sum"] += value["sum"]
    return {"counters": counters, "gauges": gauges, "histograms": histograms}


class SnapshotCollector(Collector):
    """prometheus-client's view of a merged snapshot, taken when the registry collects."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        merged = self._source()
        families: dict[str, Metric] = {}

        def family(name: str) -> Metric:
            found = families.get(name)
            if found is None:
                spec = FAMILIES[name]
                if spec.kind == "counter":
                    found = CounterMetricFamily(name, spec.help, labels=spec.labels)
                elif spec.kind == "gauge":
                    found = GaugeMetricFamily(name, spec.help, labels=spec.labels)
                else:
                    found = HistogramMetricFamily(name, spec.help, labels=spec.labels)
                families[name] = found
            return found

        for section in ("counters", "gauges"):
            for text, value in sorted(merged[section].items()):
                name, labels = split_key(text)
                metric = family(name)
                assert isinstance(metric, (CounterMetricFamily, GaugeMetricFamily))
                metric.add_metric([labels[label] for label in FAMILIES[name].labels], value)
        for text, value in sorted(merged["histograms"].items()):
            name, labels = split_key(text)
            metric = family(name)
            assert isinstance(metric, HistogramMetricFamily)
            cumulative, buckets = 0, []
            for bound, count in zip([*value["bounds"], float("inf")], value["counts"], strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            metric.add_metric([labels[label] for label in FAMILIES[name].labels], buckets, value["sum"])
        yield from families.values()


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Metrics:
    """One worker's metrics: its `Sources`, and the directory it shares with its siblings (None
    with one worker)."""

    def __init__(self, sources: Sources, shared: str | None) -> None:
        self.sources = sources
        self.shared = Path(shared) if shared is not None else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.merged))

    def merged(self) -> dict[str, Any]:
        """This worker's numbers now and the others' latest. This worker's go to its file first:
        every file only grows and the next scrape, whichever worker it reaches, reads them all
        again, so no counter ever reads lower than at the scrape before (which Prometheus would
        take for a restart)."""
        own = snapshot(self.sources)
        self._write(own)
        return merge([own, *self._siblings(own["pid"])], process_alive)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _siblings(self, pid: int) -> list[dict[str, Any]]:
        if self.shared is None:
            return []
        found = []
        for path in self.shared.glob("*.json"):
            if path.stem == str(pid):
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                found.append(orjson.loads(path.read_bytes()))
        return found

    def share(self) -> None:
        """Write this worker's snapshot for the others (atomically: a reader never sees half)."""
        self._write(snapshot(self.sources))

    def _write(self, own: dict[str, Any]) -> None:
        if self.shared is None:
            return
        final = self.shared / f"{own['pid']}.json"
        temporary = final.with_suffix(".tmp")
        try:
            temporary.write_bytes(orjson.dumps(own))
            os.replace(temporary, final)
        except OSError as exc:  # the directory went away (the supervisor is gone): nobody to tell
            log.debug("metrics not shared (%s)", exc)

    async def run(self) -> None:
        while True:
            self.share()  # at once too: a new worker is counted before it serves
            await asyncio.sleep(SHARE_INTERVAL)
