"""Batched asynchronous exchanges (pcpp.comm.outbox.Outbox, PCPPConfig.exchange_batch)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pcpp
from dist_workers import Case, message_log, two_modes
from pcpp.comm import Message
from pcpp.comm.base import gather_messages, neighbour_messages
from pcpp.comm.outbox import Outbox
from pcpp.exchange import Transfer
from pcpp.testing import run_distributed


class _Done:
    def __init__(self, log: list[str], index: int) -> None:
        self._log, self._index = log, index

    def wait(self) -> None:
        self._log.append(f"wait {self._index}")


class RecordingComm:
    """Records every batch it is asked to post, and every wait on one."""

    rank = 0
    world_size = 2

    def __init__(self) -> None:
        self.batches: list[list[Message]] = []
        self.log: list[str] = []

    def send_recv(self, messages: Sequence[Message], *, what: str) -> _Done:
        self.batches.append(list(messages))
        self.log.append(f"post {len(self.batches) - 1}")
        return _Done(self.log, len(self.batches) - 1)

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, *, what: str) -> _Done:
        raise AssertionError("the outbox batches send_recv exchanges only")


def _messages(layer: int, count: int) -> list[Message]:
    return [Message(peer=1, tensor=torch.zeros(1), send=bool(i % 2), tag=layer * 10 + i) for i in range(count)]


@given(counts=st.lists(st.integers(0, 3), min_size=1, max_size=40), limit=st.integers(1, 12))
def test_batches_close_after_the_same_layers_on_every_rank(counts: list[int], limit: int) -> None:
    """Batches hold ``limit`` consecutive layers (the last one fewer, posted by flush), whatever each layer sends,
    so every rank cuts the same batches; each batch carries its layers' messages in layer order, and a batch
    without messages posts nothing."""
    comm = RecordingComm()
    box = Outbox(comm)
    for layer, count in enumerate(counts):
        box.post(_messages(layer, count), f"layer {layer}", limit=limit)
    box.flush()
    groups = [counts[i : i + limit] for i in range(0, len(counts), limit)]
    expected = []
    for start, group in zip(range(0, len(counts), limit), groups, strict=True):
        tags = [m.tag for layer in range(start, start + len(group)) for m in _messages(layer, counts[layer])]
        if tags:
            expected.append(tags)
    assert [[m.tag for m in batch] for batch in comm.batches] == expected


def test_waiting_on_an_open_batch_posts_it_first() -> None:
    """A layer that waits before its batch is full posts the batch (the same layer on every rank), then waits;
    later waits on the same batch do not post again."""
    comm = RecordingComm()
    box = Outbox(comm)
    first = box.post(_messages(0, 2), "layer 0", limit=4)
    second = box.post(_messages(1, 2), "layer 1", limit=4)
    assert comm.log == []
    first.wait()
    second.wait()
    assert comm.log == ["post 0", "wait 0", "wait 0"]
    box.flush()  # nothing open: nothing posted
    assert len(comm.batches) == 1


class _Broken(RecordingComm):
    def send_recv(self, messages: Sequence[Message], *, what: str) -> _Done:
        raise RuntimeError("peer gone")


def test_a_batch_that_failed_to_post_is_never_replaced() -> None:
    """If posting raises, waiting on the batch raises PCPPError instead of posting the next layers' messages in
    its place (which would pair with the wrong messages on the peers)."""
    box = Outbox(_Broken())
    pending = box.post(_messages(0, 2), "layer 0", limit=2)
    with pytest.raises(RuntimeError, match="peer gone"):
        box.post(_messages(1, 2), "layer 1", limit=2)
    box.post(_messages(2, 2), "layer 2", limit=2)
    with pytest.raises(pcpp.PCPPError, match="never posted.*peer gone"):
        pending.wait()
    assert box.open_layers == 1


def test_a_step_that_stopped_midway_is_discarded_at_reset(caplog: pytest.LogCaptureFixture) -> None:
    """A call that raised midway leaves layers in the open batch: the next call refuses to run out of step with
    the peers, and pcpp.reset (a new image) drops the batch unposted, with a warning."""
    from pcpp.context import PatchContext

    comm = RecordingComm()
    ctx = PatchContext(pcpp.PCPPConfig(exchange_batch=4), comm, unit=1, levels=0)
    ctx.begin_step(8, 8, None)
    transfer = Transfer("test", _messages(0, 2))
    pending = ctx.exchange.post(pcpp.LayerKind.CONV, transfer, "layer 0", defer=True)  # the step raises here
    with pytest.raises(pcpp.PCPPError, match="stopped midway"):
        ctx.begin_step(8, 8, None)
    ctx.request_reset()
    with caplog.at_level("WARNING", logger="pcpp.exchange_service"):
        ctx.begin_step(8, 8, None)
    assert "dropped the unsent exchanges of 1 layers" in caplog.text
    pending.wait()  # waits on nothing
    ctx.end_step()
    assert comm.batches == []


def test_point_to_point_gather_and_neighbour_tags_match_their_receives() -> None:
    """Every send of one rank is received by its peer under the same tag (gloo matches by peer and tag; NCCL by
    order, which the batches keep)."""
    world = 4
    gathered = [torch.zeros(world, 2) for _ in range(world)]
    sends = {
        (rank, m.peer, m.tag)
        for rank in range(world)
        for m in gather_messages(rank, world, gathered[rank][rank : rank + 1], gathered[rank], tag=5)
        if m.send
    }
    recvs = {
        (m.peer, rank, m.tag)
        for rank in range(world)
        for m in gather_messages(rank, world, gathered[rank][rank : rank + 1], gathered[rank], tag=5)
        if not m.send
    }
    assert sends == recvs
    assert len(sends) == world * (world - 1)
    t = torch.zeros(1)
    down = neighbour_messages(0, send_up=None, send_down=t, recv_up=None, recv_down=t, tag=3)
    up = neighbour_messages(1, send_up=t, send_down=None, recv_up=t, recv_down=None, tag=3)
    assert {(0, 1, m.tag) for m in down if m.send} == {(0, 1, m.tag) for m in up if not m.send}
    assert {(1, 0, m.tag) for m in up if m.send} == {(1, 0, m.tag) for m in down if not m.send}


def test_exchange_batch_is_validated() -> None:
    with pytest.raises(pcpp.ConversionError, match="exchange_batch=0"):
        pcpp.PCPPConfig(exchange_batch=0)
    with pytest.raises(pcpp.ConversionError, match="exchange_batch=True"):
        pcpp.PCPPConfig(exchange_batch=True)


@pytest.mark.parametrize(
    ("world", "convert"),
    [
        (2, {"warmup_steps": 2, "partial": 0.5}),
        (3, {"warmup_steps": 2, "partial": 0.3}),
        (3, {"warmup_steps": 2, "conditioning": pcpp.Conditioning.FULL}),
        (4, {"warmup_steps": 1, "partial": 1.0}),
    ],
    ids=["partial-2", "partial-3", "full-3", "partial-4"],
)
def test_batching_changes_no_value(world: int, convert: dict[str, object]) -> None:
    """Batching only changes when messages leave, never what they carry: the loop with every exchange posted on
    its own (exchange_batch=1) and with batches of 5 layers give bitwise the same noise predictions."""
    alone = Case(family="tiny", height=8 * world, width=8, steps=5, convert={**convert, "exchange_batch": 1})
    batched = dataclasses.replace(alone, convert={**convert, "exchange_batch": 5})
    for result in run_distributed(two_modes, world, alone, batched, timeout=300):
        for a, b in zip(result["first"], result["second"], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("world", "convert"),
    [
        (3, {"warmup_steps": 2, "partial": 0.3, "exchange_batch": 3}),
        (3, {"warmup_steps": 2, "conditioning": pcpp.Conditioning.FULL, "exchange_batch": 4}),
        (4, {"warmup_steps": 1, "partial": 0.0, "exchange_batch": 5}),
        (2, {"warmup_steps": 1, "partial": 0.5, "exchange_batch": 1}),
    ],
    ids=["partial-3", "full-3", "partial0-4", "unbatched-2"],
)
def test_every_rank_posts_matching_batches(world: int, convert: dict[str, object]) -> None:
    """What NCCL needs and gloo does not check (gloo matches by tag, NCCL by order): every rank posts the same
    number of batches, and for each ordered pair of ranks the k-th message a sends to b is the k-th that b
    receives from a, with the same tag and size. Edge ranks and layers without messages (partial=0) must still
    count towards the batches for this to hold."""
    case = Case(family="tiny", height=8 * world, width=8, steps=4, convert=convert)
    logs = run_distributed(message_log, world, case, timeout=300)
    assert len({len(log) for log in logs}) == 1, [len(log) for log in logs]
    for a in range(world):
        for b in range(world):
            if a != b:
                sent = [(tag, n) for post in logs[a] for peer, send, tag, n in post if send and peer == b]
                got = [(tag, n) for post in logs[b] for peer, send, tag, n in post if not send and peer == a]
                assert sent == got, (a, b)


def test_a_communicator_without_send_recv_is_named_in_the_error() -> None:
    """Communicators written before send_recv existed (they had ``exchange``, which pcpp no longer calls) are
    refused with the missing method named."""
    from pcpp.comm.groups import resolve_groups

    class Old:
        rank, world_size = 0, 2

        def exchange(self, **kwargs: object) -> None: ...

        def all_gather(self, output: torch.Tensor, tensor: torch.Tensor, *, what: str) -> None: ...

    with pytest.raises(pcpp.ConversionError, match="lacks send_recv"):
        resolve_groups(Old())
