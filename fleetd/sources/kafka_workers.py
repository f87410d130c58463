"""Telemetry from Kafka decoded in worker processes (`sources.kafka.workers: N`).

One Python process decodes at most one core's worth of records. With N workers, each is a
`KafkaSource` in its own process, a member of fleetd's consumer group: Kafka splits the
topic's partitions among them (and hands a dead worker's partitions to the others). A
worker decodes, validates, dead-letters and gates its records as the in-process source
does, then ships each batch of updates to the daemon over a socket; the daemon applies
them to the fleet state, its single writer, and acknowledges; the worker commits a poll's
offsets only once its batch was acknowledged, so nothing is committed before it is
applied. The daemon:
- treats the workers as one source: readiness waits until every worker caught up with its
  partitions (a cluster's `ClusterSynced` of one worker is held back until then: the
  cluster's nodes are spread over every partition), the consumer group is judged on the
  union of the workers' assignments (a partition held by none of them went to another
  consumer), the broker is reachable while every worker says so;
- forwards the workers' source metrics (records by outcome, dead letters, consumer lag) to
  its own registry;
- restarts a worker that exits (with backoff; logged and counted): the replacement starts
  where the state has its partitions (the workers share how far they applied), and the
  state's sequence gate drops what it reads again.

Messages are length-prefixed pickles over a socket pair made for each worker (`_Link`;
the workers are spawned, never forked: the daemon runs threads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
import multiprocessing
import operator
import pickle
import signal
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import TopicPartition

from fleetd.sources import collector, updates
from fleetd.sources.base import Backoff, UpdateSink
from fleetd.sources.kafka import SOURCE, KafkaSource, KafkaSourceSettings
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import ClusterSynced, Update

log = logging.getLogger(__name__)

#: How long partitions may be held by none of the workers before that is reported as a
#: group shared with another consumer (the workers hear of a rebalance one after another).
GROUP_SETTLE_S = 5.0
#: How long a stopping worker may take to leave before it is terminated.
STOP_TIMEOUT_S = 10.0
#: The worker metrics forwarded to the daemon's: family name -> `SourceMetrics` attribute.
_FORWARDED = {
    "fleetd_telemetry_records": "telemetry_records",
    "fleetd_dead_letters": "dead_letters",
    "fleetd_inventories_abandoned": "inventories_abandoned",
    "fleetd_kafka_consumer_lag_messages": "consumer_lag",
}


def _fast_pickling() -> tuple[dict[type, Callable[..., Any]], dict[type, Callable[..., Any]]]:
    """Pickle reducers of the frozen slotted update values, and their constructors.

    Pickled as dataclasses do it, each value is rebuilt through `__setstate__`, which asks
    `dataclasses.fields` for its fields every time (~5 µs a `NodeUpdate`: most of the
    daemon's share of a batch). Here it is (rebuild, (class, field values)): the values
    read by one `attrgetter`, the value made by `updates.fast_constructor`."""
    reducers: dict[type, Callable[..., Any]] = {}
    constructors: dict[type, Callable[..., Any]] = {}
    for cls in vars(updates).values():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            continue
        if cls.__module__ != updates.__name__ or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            continue
        try:
            constructors[cls] = updates.fast_constructor(cls)
        except TypeError:
            continue  # (not laid out for it: pickled the usual way)
        names = [f.name for f in dataclasses.fields(cls)]
        get = (
            operator.attrgetter(*names)
            if len(names) > 1
            else (lambda o, n=names[0]: (getattr(o, n),))
        )
        reducers[cls] = functools.partial(_reduce, cls, get)
    return reducers, constructors


def _reduce(cls: type, get: Callable[[Any], tuple[Any, ...]], value: Any) -> tuple[Any, ...]:
    return (_rebuild, (cls, get(value)))


def _rebuild(cls: type, values: tuple[Any, ...]) -> Any:
    return _CONSTRUCTORS[cls](*values)


_REDUCERS, _CONSTRUCTORS = _fast_pickling()


#: A link's memo (every object sent, so that sent again it is a reference) starts afresh
#: after this many messages or bytes sent, whichever comes first: it keeps what it holds
#: alive, on both sides.
MEMO_MESSAGES = 256
MEMO_BYTES = 32 * 1024 * 1024
_HEADER = struct.Struct("!IB")  # (body length, 1 when the memo starts afresh)


class _Feed:
    """The file an Unpickler reads, refilled with each message's body (the Unpickler keeps
    its file, and with it its memo, from one message to the next)."""

    def __init__(self) -> None:
        self._body = io.BytesIO()

    def refill(self, body: bytes) -> None:
        self._body = io.BytesIO(body)

    def read(self, size: int = -1) -> bytes:
        return self._body.read(size)

    def readinto(self, buffer: Any) -> int:
        return self._body.readinto(buffer)

    def readline(self) -> bytes:
        return self._body.readline()


class _Link:
    """Messages over one socket in each direction: pickles that share one memo per
    direction, so an object sent again (a node's unchanged labels, GPUs, pods: the Kafka
    source reuses the last update's values for what did not change) travels as a reference,
    costs nothing to rebuild and arrives as the same object, which the state's short paths
    recognise. Framed by length; the update values pickle through `fast_constructor`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._out = io.BytesIO()
        self._pickler: pickle.Pickler | None = None
        self._sent = 0
        self._bytes = 0
        self._feed = _Feed()
        self._unpickler: pickle.Unpickler | None = None

    async def send(self, message: object) -> None:
        """Send `message` (pickled and written at once: concurrent senders keep the order
        of the memo)."""
        fresh = self._pickler is None or self._sent >= MEMO_MESSAGES or self._bytes >= MEMO_BYTES
        if fresh:
            self._pickler = pickle.Pickler(self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._pickler.dispatch_table = _REDUCERS
            self._sent = self._bytes = 0
        assert self._pickler is not None
        self._sent += 1
        out = self._out
        out.seek(0)
        out.truncate()
        try:
            self._pickler.dump(message)
        except BaseException:
            # (What it memoised before failing was never sent: the memos would disagree.)
            self._pickler = None
            raise
        body = out.getvalue()
        self._bytes += len(body)
        self._writer.write(_HEADER.pack(len(body), fresh) + body)
        # (Inside a worker's poll, which paused the collector: a daemon that reads slowly can
        # hold this wait.)
        with collector.running():
            await self._writer.drain()

    async def receive(self) -> Any:
        """The next message (asyncio.IncompleteReadError at the end of the stream)."""
        length, fresh = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
        body = await self._reader.readexactly(length)
        if fresh or self._unpickler is None:
            self._unpickler = pickle.Unpickler(self._feed)
        self._feed.refill(body)
        return self._unpickler.load()

    def close(self) -> None:
        self._writer.close()


def _metric_samples(
    metrics: SourceMetrics, held: set[int]
) -> list[tuple[str, str, dict[str, str], float]]:
    """(family, kind, labels, value) of the forwarded metrics' samples; the consumer lag of
    the partitions in `held` only (a partition that went to another worker is that one's
    to report: this one's last figure for it would flap with the other's)."""
    out = []
    for family in metrics.registry.collect():
        if family.name not in _FORWARDED:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if family.type == "gauge" and int(sample.labels.get("partition", -1)) not in held:
                continue
            out.append((family.name, family.type, dict(sample.labels), float(sample.value)))
    return out


# ------------------------------------------------------------------------------- worker side


class _ParentSink:
    """The worker's `UpdateSink`: a batch goes to the daemon at once; `settled` waits until
    the daemon acknowledged every batch sent (before the worker commits)."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._sent = 0
        self._acked = 0
        self._acks = asyncio.Condition()

    async def apply(self, updates: Sequence[Update]) -> None:
        self._sent += 1
        await self._link.send(("apply", self._sent, list(updates)))

    async def settled(self) -> None:
        sent = self._sent
        async with self._acks:
            await self._acks.wait_for(lambda: self._acked >= sent)

    async def acknowledged(self, number: int) -> None:
        async with self._acks:
            self._acked = number
            self._acks.notify_all()


def worker_main(
    settings: KafkaSourceSettings, index: int, sock: socket.socket, logging_config: Any
) -> None:
    """A worker process: a `KafkaSource` feeding the daemon over `sock` until the daemon
    closes it (or goes away). `logging_config`: the daemon's `LoggingConfig` (None: plain
    warnings)."""
    from fleetd.daemon import configure_logging

    # Ctrl-C in a terminal reaches the whole process group: the daemon decides, and closes
    # the link when it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if logging_config is not None:
        configure_logging(logging_config)
    else:
        logging.basicConfig(level=logging.WARNING)
    asyncio.run(_work(settings, index, sock))


async def _work(settings: KafkaSourceSettings, index: int, sock: socket.socket) -> None:
    from fleetd.daemon import freeze_startup_heap

    link = _Link(*await asyncio.open_connection(sock=sock))
    # A client id per worker: the group's assignors order members by id (client id first),
    # so each worker gets the same partitions again after a rejoin, and with them the nodes
    # it remembers.
    settings = dataclasses.replace(settings, client_id=f"{settings.client_id}-w{index}")
    sink = _ParentSink(link)
    source = KafkaSource(settings, sink, metrics=SourceMetrics(), slot_space=f"{SOURCE}/w{index}")
    outbox: asyncio.Queue[object] = asyncio.Queue()
    source.on_connection = lambda ok, reason: outbox.put_nowait(("connection", ok, reason))
    source.on_progress = lambda _: outbox.put_nowait(("progress", source.behind_records))
    source.on_assigned = lambda held, all_: outbox.put_nowait(("assigned", held, all_))
    source.on_handled = lambda n, offsets: outbox.put_nowait(
        (
            "handled",
            n,
            {(tp.topic, tp.partition): offset for tp, offset in offsets.items()},
            _metric_samples(source.metrics, source.held_partitions),
            source.first_batch_at,
        )
    )

    async def post() -> None:
        while True:
            await link.send(await outbox.get())

    async def synced() -> None:
        await source.ready.wait()
        freeze_startup_heap()  # (what the daemon does when it turns ready)
        outbox.put_nowait(("ready",))

    background = [asyncio.ensure_future(post()), asyncio.ensure_future(synced())]
    consuming = asyncio.ensure_future(source.run())
    listening = asyncio.ensure_future(link.receive())
    try:
        while True:
            await asyncio.wait(
                {listening, consuming, background[0]}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in (consuming, background[0]):
                if task.done():
                    task.result()  # (its error ends the worker: the daemon starts another)
                    raise RuntimeError("the Kafka source stopped")
            if not listening.done():
                continue
            try:
                message = listening.result()
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the daemon closed the link (or is gone): stop
            if message[0] == "ack":
                await sink.acknowledged(message[1])
            elif message[0] == "offsets":  # (what the other workers applied)
                source.applied_elsewhere(
                    {TopicPartition(t, p): offset for (t, p), offset in message[1].items()}
                )
            elif message[0] == "topic":  # (benchmarks: the same worker on another topic)
                consuming.cancel()
                await asyncio.gather(consuming, return_exceptions=True)
                source.settings = dataclasses.replace(source.settings, topic=message[1])
                source.first_batch_at = None
                consuming = asyncio.ensure_future(source.run())
            listening = asyncio.ensure_future(link.receive())
    finally:
        for task in (*background, consuming, listening):
            task.cancel()
        await asyncio.gather(*background, consuming, listening, return_exceptions=True)
        link.close()


# ------------------------------------------------------------------------------- daemon side


@dataclasses.dataclass
class _Worker:
    index: int
    #: Restart delays: growing while the worker exits without progress (a record that
    #: crashes it every time), reset by a committed poll.
    backoff: Backoff
    process: Any = None
    link: _Link | None = None
    ready: bool = False
    connected: tuple[bool, str] | None = None
    behind_records: int = 0
    held: set[int] = dataclasses.field(default_factory=set)
    partitions: set[int] = dataclasses.field(default_factory=set)
    #: Whether this run of the worker has reported an assignment yet.
    partitions_seen: bool = False
    metrics_seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = dataclasses.field(
        default_factory=dict
    )


class KafkaWorkers:
    """N `KafkaSource` worker processes as one source feeding `sink` (see the module).

    The same surface as `KafkaSource` for the daemon, tests and benchmarks: `run`, `ready`,
    `on_connection`, `on_progress`, `records_handled` / `wait_handled`, `first_batch_at`,
    `metrics` (the workers' forwarded), `group_conflict`.
    """

    def __init__(
        self,
        settings: KafkaSourceSettings,
        sink: UpdateSink,
        *,
        workers: int,
        metrics: SourceMetrics | None = None,
        logging_config: Any = None,
        restart_backoff: Backoff | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        #: Each worker's settings: the group shared, required clusters judged here.
        self.settings = dataclasses.replace(
            settings, shared_group=True, required_clusters=frozenset()
        )
        self.required_clusters = settings.required_clusters
        self.sink = sink
        self.metrics = metrics if metrics is not None else SourceMetrics()
        self.logging_config = logging_config
        self.ready = asyncio.Event()
        self.on_connection: Callable[[bool, str], None] | None = None
        self.on_progress: Callable[[str], None] | None = None
        self.records_handled = 0
        #: perf_counter() when the first worker's first poll returned (benchmarks time from
        #: it; set to None to time from the next poll on).
        self.first_batch_at: float | None = None
        self.progress = asyncio.Condition()
        self.group_conflict = ""
        self.restarts = 0
        self._on_restart = on_restart
        self._workers = [
            _Worker(i, backoff=restart_backoff or Backoff(0.5, 30.0)) for i in range(workers)
        ]
        self._held_markers: dict[str, ClusterSynced] = {}
        self._synced_clusters: set[str] = set()
        self._connected: bool | None = None
        self._settling: asyncio.TimerHandle | None = None
        #: (topic, partition) -> the offset every record below which the state has.
        self._applied: dict[tuple[str, int], int] = {}

    async def run(self) -> None:
        """Run (and restart) the workers until cancelled; then stop them."""
        serving = [asyncio.ensure_future(self._serve(w)) for w in self._workers]
        try:
            await asyncio.gather(*serving)
        except BaseException:
            # (Cancelled: gather cancelled them, and each is stopping its worker. Failed:
            # gather leaves the others running.)
            for task in serving:
                if not task.done() and not task.cancelling():
                    task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
            raise
        finally:
            if self._settling is not None:
                self._settling.cancel()
                self._settling = None

    async def retarget(self, topic: str) -> None:
        """Have every worker consume `topic` from now on, keeping what it remembers
        (benchmarks: an initial sync on one topic, then the measured records on another)."""
        self.settings = dataclasses.replace(self.settings, topic=topic)
        for w in self._workers:
            if w.link is not None:
                await w.link.send(("topic", topic))

    async def wait_handled(self, count: int) -> None:
        """Wait until at least `count` records were handled (committed by the workers; a
        record read again by a worker that took its partition over counts again)."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.records_handled >= count)

    async def wait_applied(self, topic: str, ends: dict[int, int]) -> None:
        """Wait until every partition of `topic` in `ends` was applied up to its offset
        there (tests and benchmarks: every record of a topic is in the state)."""

        def done() -> bool:
            return all(self._applied.get((topic, p), 0) >= end for p, end in ends.items())

        async with self.progress:
            await self.progress.wait_for(done)

    # -- one worker ------------------------------------------------------------------------

    async def _serve(self, w: _Worker) -> None:
        context = multiprocessing.get_context("spawn")
        while True:
            ours, theirs = socket.socketpair()
            w.process = context.Process(
                target=worker_main,
                args=(self.settings, w.index, theirs, self.logging_config),
                name=f"fleetd-kafka-worker-{w.index}",
                daemon=True,
            )
            w.process.start()
            theirs.close()
            link = w.link = _Link(*await asyncio.open_connection(sock=ours))
            try:
                if self._applied:
                    # (A replacement starts where the state is, not at the beginning.)
                    await link.send(("offsets", dict(self._applied)))
                await self._listen(w, link)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            except (pickle.UnpicklingError, EOFError, ValueError, struct.error) as exc:
                log.error("kafka worker %d sent what does not decode (%r): restarting it",
                          w.index, exc)  # fmt: skip
            finally:
                w.link = None
                link.close()  # (the worker sees the end of its link and stops)
                await asyncio.shield(self._stop(w))
            # The worker left on its own: say so, and start another.
            self.restarts += 1
            if self._on_restart is not None:
                self._on_restart()
            delay = w.backoff.next_delay_s()
            log.error("kafka worker %d exited (code %s); restarting in %.1fs",
                      w.index, w.process.exitcode, delay)  # fmt: skip
            # (Its partitions go to the other workers meanwhile: it is left out of the
            # group's assignment until it reports again, and counts as down until then: its
            # partitions are not read until the group moved them.)
            if w.connected is not None:
                w.connected = (False, f"kafka worker {w.index} exited; restarting")
            w.held, w.partitions, w.behind_records = set(), set(), 0
            w.partitions_seen = False
            w.metrics_seen = {}  # (the next process counts from 0)
            self._report_connection()
            await asyncio.sleep(delay)

    async def _stop(self, w: _Worker) -> None:
        """Wait for the worker process to leave (its link is closed); terminate, then kill,
        one that does not."""
        process = w.process
        await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
        if process.is_alive():
            log.warning("kafka worker %d did not stop; terminating it", w.index)
            process.terminate()
            await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join)

    async def _listen(self, w: _Worker, link: _Link) -> None:
        while True:
            message = await link.receive()
            kind = message[0]
            if kind == "apply":
                await self._apply(message[2])
                await link.send(("ack", message[1]))
            elif kind == "handled":
                await self._share_offsets(w, message[2])
                self._forward_metrics(w, message[3])
                # (perf_counter is the system's monotonic clock: the same in every process.)
                first = message[4]
                if first is not None and (
                    self.first_batch_at is None or first < self.first_batch_at
                ):
                    self.first_batch_at = first
                async with self.progress:
                    self.records_handled += message[1]
                    self.progress.notify_all()
                w.backoff.reset()  # (it made progress: a later exit restarts it soon)
            elif kind == "ready":
                w.ready = True
                await self._check_ready()
            elif kind == "assigned":
                w.held, w.partitions, w.partitions_seen = message[1], message[2], True
                self._check_group()
            elif kind == "connection":
                w.connected = (message[1], message[2])
                self._report_connection()
            elif kind == "progress":
                w.behind_records = message[1]
                if self.on_progress is not None and not self.ready.is_set():
                    behind = sum(x.behind_records for x in self._workers)
                    self.on_progress(f"{behind:,} records to read" if behind else "")

    # -- the workers as one source ---------------------------------------------------------

    async def _share_offsets(self, w: _Worker, offsets: dict[tuple[str, int], int]) -> None:
        """Tell the other workers how far `w` applied its partitions: one of them assigned
        a partition later (a rebalance, a worker replaced) starts there, not at its
        beginning (the state is the daemon's, and has what `w` applied)."""
        if not offsets:
            return
        for key, offset in offsets.items():
            if offset > self._applied.get(key, 0):
                self._applied[key] = offset
        for other in self._workers:
            if other is not w and other.link is not None:
                await other.link.send(("offsets", offsets))

    async def _apply(self, updates: list[Update]) -> None:
        markers = [u for u in updates if type(u) is ClusterSynced]
        if markers:
            # A cluster is synced once every worker is: its markers are held back until
            # then, and passed on once (each worker that sees the cluster sends one).
            updates = [u for u in updates if type(u) is not ClusterSynced]
            for marker in markers:
                if marker.cluster in self._synced_clusters:
                    continue
                if self.ready.is_set():
                    self._synced_clusters.add(marker.cluster)
                    updates.append(marker)
                else:
                    self._held_markers[marker.cluster] = marker
        if updates:
            await self.sink.apply(updates)
        if not self.ready.is_set():
            await self._check_ready()  # (a required cluster's first records, at last)

    async def _check_ready(self) -> None:
        if self.ready.is_set() or not all(w.ready for w in self._workers):
            return
        # (A worker sends a cluster's marker with its initial sync, or, once synced, with
        # the cluster's first records: the clusters seen.)
        if self.required_clusters - self._held_markers.keys() - self._synced_clusters:
            return  # (checked again with every batch until they came)
        markers = [self._held_markers[c] for c in sorted(self._held_markers)]
        self._held_markers.clear()
        self._synced_clusters.update(m.cluster for m in markers)
        if markers:
            await self.sink.apply(markers)
        log.info("kafka: initial sync done in %d workers (clusters %s)",
                 len(self._workers), ", ".join(sorted(self._synced_clusters)))  # fmt: skip
        self.ready.set()

    def _check_group(self) -> None:
        """Judge the group on the union of the workers' assignments. Partitions missing from
        it while the group rebalances (each worker hears of its share at its own moment)
        are no conflict: one is reported when partitions are still missing
        `GROUP_SETTLE_S` later."""
        missing = self._missing_partitions()
        if not missing:
            if self._settling is not None:
                self._settling.cancel()
                self._settling = None
            self._set_conflict("")
        elif not self.group_conflict and self._settling is None:
            loop = asyncio.get_running_loop()
            self._settling = loop.call_later(GROUP_SETTLE_S, self._group_settled)

    def _group_settled(self) -> None:
        self._settling = None
        missing = self._missing_partitions()
        conflict = ""
        if missing:
            conflict = (
                f"consumer group {self.settings.group_id!r} is shared: partitions "
                f"{', '.join(map(str, missing))} of {self.settings.topic} went to a consumer "
                f"that is none of this fleetd's "
                f"{len(self._workers)} workers; every fleetd needs a group_id of its own"
            )
        self._set_conflict(conflict)

    def _missing_partitions(self) -> list[int]:
        """Partitions of the topic no worker holds, once every running worker has reported
        an assignment (before that, none: the group is still forming)."""
        if any(w.partitions_seen is False for w in self._workers):
            return []
        partitions: set[int] = set()
        held: set[int] = set()
        for w in self._workers:
            partitions |= w.partitions
            held |= w.held
        return sorted(partitions - held)

    def _set_conflict(self, conflict: str) -> None:
        if conflict != self.group_conflict:
            if conflict:
                log.error("kafka: %s", conflict)
            else:
                log.info("kafka: every partition of %s is held by the workers again",
                         self.settings.topic)  # fmt: skip
            self.group_conflict = conflict
            self._report_connection()

    def _report_connection(self) -> None:
        known = [w.connected for w in self._workers if w.connected is not None]
        if not known:
            return  # (no worker has said yet)
        down = [reason for ok, reason in known if not ok]
        ok = not down and not self.group_conflict
        reason = down[0] if down else self.group_conflict
        if ok != self._connected:
            self._connected = ok
            if self.on_connection is not None:
                self.on_connection(ok, reason)

    def _forward_metrics(
        self, w: _Worker, samples: list[tuple[str, str, dict[str, str], float]]
    ) -> None:
        """The worker's counters added (what grew since its last report; from 0 after a
        restart) and its gauges set in this process's metrics."""
        for family, kind, labels, value in samples:
            metric = getattr(self.metrics, _FORWARDED[family]).labels(**labels)
            if kind == "counter":
                key = (family, tuple(sorted(labels.items())))
                last = w.metrics_seen.get(key, 0.0)
                grown = value - last if value >= last else value
                w.metrics_seen[key] = value
                if grown > 0:
                    metric.inc(grown)
            else:
                metric.set(value)
