"""The Kafka source's memory of each node's last applied content, and its scan of a poll for
repeats of it: the per-record loop of telemetry ingest, written so that mypyc can compile it.

Most node reports repeat their node's last content (a periodic resync: only the envelope,
sequence and time, is new). For those the source needs the node's sequence-gate slot and the
envelope's sequence and time, nothing else; finding them is the one loop every record of a
poll passes through (`KafkaSource._process`). This module is that loop and the record it
compares against (`Content`), and nothing else, so that it can be compiled with mypyc:
`make install` builds `fleetd.sources.repeats_native` from it (`fleetd.native`), and the
source uses the compiled module when it was built from this very file, else this one.

Two scans with one contract, each the faster where it runs: `skip_repeats` decodes each
repeat's envelope inline (compiled: ~0.4 µs a record less than the other; interpreted it is
the slower), `skip_repeats_rests` leaves the envelopes to one vectorized decode of the poll
(`codec.decode_envelope_rests`; what the interpreted source uses). A test checks that the two
agree record for record.
"""

from __future__ import annotations

import array
from typing import Any, Final

from fleetd.sources.codec import gpu_fields, node_offset_in_tail, pod_fields
from fleetd.sources.updates import GpuDevice, NodeUpdate, PodObserved

#: `Content.gpu_fields` of a content whose GPUs' bytes match its update's GPUs, not split.
SPLIT_LATER: Final[tuple[()]] = ()
#: What `Content` knows of a content's bytes: (spec, gpus_at, pod_fields, gpu_fields).
Layout = tuple[bytes | None, int, list[bytes] | None, list[bytes] | tuple[()] | None]
UNKNOWN_LAYOUT: Final[Layout] = (None, -1, None, None)

#: The `observed_unix_ms` field's tag in a record's envelope (field 3, varint).
_TIME_TAG: Final = 0x18


class Content:
    """A node's last applied content, by Kafka key: its report's `node` field bytes. (A
    plain class, not a frozen dataclass: one is made per new node, and cheaper; a change of
    the node's content updates it in place, `replace`.)"""

    __slots__ = ("cluster", "gpu_fields", "gpus_at", "head", "head_len", "name", "partition",
                 "pod_fields", "slot", "spec", "tail", "update")  # fmt: skip

    def __init__(
        self,
        cluster: str,
        name: str,
        slot: int,
        head: bytes,
        tail: bytes,
        update: NodeUpdate,
        layout: Layout,
        partition: int,
    ) -> None:
        self.cluster = cluster
        self.name = name
        #: The partition its records come from (`forget_partitions`).
        self.partition = partition
        #: The node's gate cell's slot in the source's `SequenceColumn`: repeats move it.
        self.slot = slot
        #: `codec.envelope_head(cluster)`: a repeat starts with it.
        self.head = head
        self.head_len = len(head)
        self.tail = tail
        #: The update applied for it.
        self.update = update
        #: Its node bytes before the pods (`codec.pods_start`; None: not laid out so);
        #: where its GPUs begin in them (`codec.gpus_start`, -1: not laid out so); its
        #: pods' bytes (`codec.pod_fields`), matching `update.pods` (None: not split yet);
        #: its GPUs' bytes (`codec.gpu_fields`), matching `update.gpus` (None: they do not
        #: match, `SPLIT_LATER`: they do, not split yet).
        self.spec: bytes | None = layout[0]
        self.gpus_at: int = layout[1]
        self.pod_fields: list[bytes] | None = layout[2]
        self.gpu_fields: list[bytes] | tuple[()] | None = layout[3]

    def replace(self, tail: bytes, update: NodeUpdate, layout: Layout) -> None:
        """The node's new content (same cluster, name and slot)."""
        self.tail = tail
        self.update = update
        self.spec, self.gpus_at, self.pod_fields, self.gpu_fields = layout

    def known_pods(self) -> dict[bytes, PodObserved]:
        """The content's pods by their bytes (`codec.pods_from_fields`)."""
        fields = self.pod_fields
        if fields is None:
            spec = self.spec
            assert spec is not None
            at = node_offset_in_tail(self.tail)
            fields = self.pod_fields = pod_fields(self.tail, at + len(spec))
        pods = self.update.pods
        if fields is None or pods is None or len(fields) != len(pods):
            return {}  # (never: the content parsed this way)
        return dict(zip(fields, pods, strict=True))

    def known_gpus(self) -> dict[bytes, GpuDevice]:
        """The content's GPUs by their bytes, when known (`codec.gpus_from_fields`)."""
        fields = self.gpu_fields
        spec = self.spec
        if fields is SPLIT_LATER and spec is not None:
            # (Split when first needed: GPU changes are rare, and the slices cost memory.)
            fields = self.gpu_fields = gpu_fields(spec, self.gpus_at, len(spec))
        if not isinstance(fields, list) or len(fields) != len(self.update.gpus):
            return {}
        return dict(zip(fields, self.update.gpus, strict=True))


def skip_repeats(
    records: list[Any],
    i: int,
    end: int,
    contents: dict[bytes, Content],
    taken: dict[Any, Any],
    slots: array.array[int],
    sequences: array.array[int],
    times_ms: array.array[int],
    odd: list[int],
) -> int:
    """Scan `records[i:end]` (aiokafka's records: `key`, `value`) while each is a repeat:
    its key's remembered `Content` (in `contents`), its value that content's envelope head,
    then an envelope, then that content's tail byte for byte, and its key not in `taken`
    (a record of it earlier in the poll went another way). Returns the index of the first
    record that is not (`end`: none).

    For each repeat, its content's slot, its envelope's sequence and its time (ms, 0 when
    absent) are appended to `slots`, `sequences`, `times_ms`, when the envelope is the usual
    one: varint(sequence > 0), then optionally the time field (tag 0x18, varint), nothing
    else, varints of at most 9 bytes (`codec.decode_envelope_rests` accepts exactly these).
    A repeat whose envelope is anything else is appended to `odd` by index: the caller
    decodes it in full (and dead-letters what is bad)."""
    while i < end:
        rec = records[i]
        key = rec.key
        memo = contents.get(key)
        if memo is None:
            return i
        found = rec.value
        if found is None:
            return i
        value: bytes = found
        tail = memo.tail
        if not (value.endswith(tail) and value.startswith(memo.head)) or key in taken:
            return i
        at = memo.head_len
        stop = len(value) - len(tail)
        sequence, at = _varint(value, at, stop)
        time_ms = 0
        if 0 < at < stop and value[at] == _TIME_TAG:
            time_ms, at = _varint(value, at + 1, stop)
        if at == stop and sequence > 0:
            slots.append(memo.slot)
            sequences.append(sequence)
            times_ms.append(time_ms)
        else:
            odd.append(i)
        i += 1
    return end


def _varint(data: bytes, at: int, stop: int) -> tuple[int, int]:
    """The varint of at most 9 bytes at `data[at:stop]` and where it ends; (0, -1) when there
    is none. (The twin of `codec._varint_at`, bounded by `stop` and kept here: called from
    the compiled loop, the interpreted one would cost more than the loop saves.)"""
    value = 0
    shift = 0
    while at < stop and shift < 63:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    return 0, -1


def skip_repeats_rests(
    records: list[Any],
    i: int,
    end: int,
    contents: dict[bytes, Content],
    taken: dict[Any, Any],
    slots: array.array[int],
    rests: list[bytes],
    candidates: list[Any],
) -> int:
    """`skip_repeats` with each repeat's envelope left undecoded: its bytes after the head
    appended to `rests` (for `codec.decode_envelope_rests`, the whole poll at once), the
    record to `candidates`, its content's slot to `slots`. (What the interpreted source
    runs: the loop kept to the fewest steps a record.)"""
    find = contents.get
    add_slot = slots.append
    add_rest = rests.append
    add_candidate = candidates.append
    for j in range(i, end):
        rec = records[j]
        memo = find(rec.key)  # (None for a key None)
        if memo is None or (value := rec.value) is None:
            return j
        if not (value.endswith(tail := memo.tail) and value.startswith(memo.head)):
            return j
        if rec.key in taken:
            return j
        add_candidate(rec)
        add_slot(memo.slot)
        # (The tail's length from the tail just compared: its header is in cache.)
        add_rest(value[memo.head_len : len(value) - len(tail)])
    return end
