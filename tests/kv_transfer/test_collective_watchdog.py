"""The collective backend's watchdog, on gloo with the code NCCL runs: a pair whose step stops arriving
is dropped after stall_s, a pair the cluster says is gone is dropped at once, and rows a dropped pair
still sends are never written. And what differs between NCCL and gloo is only what Wire says: the
same plan, the same messages in the same order; on NCCL a step does not wait for its sends, and a
send that never completes makes its pool unreachable and aborts its group."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from engine.distributed import tcp_store
from kv_transfer.collective import HEADER, CollectiveKVReceiver, CollectiveKVSaver, Wire, kv_group, senders_to

os.environ["GLOO_SOCKET_IFNAME"] = "lo"
SHAPE = (3, 2, 8, 4, 2, 4)  # layers, k|v, blocks, block size, kv heads, head dim
LAYERS = SHAPE[0]


def _sender(port: int, script: list[str], go: mp.Queue) -> None:
    """Rank 1 of a pair group: sends one step of 4 rows (transfer 7, slots 0-3) following `script`:
    'header', 'index', 'layer' (one layer of rows filled with 1.0), 'wait' (until told)."""
    group = kv_group("127.0.0.1", port, 1, 2, "pair", Wire.for_device("cpu"))
    for what in script:
        if what == "wait":
            go.get()
        elif what == "header":
            group.send([torch.tensor([4, 1, 0, SHAPE[4], 99, 1])], 0, 0).wait()
        elif what == "index":
            group.send([torch.tensor([0, 1, 2, 3, 7, 0, 4])], 0, 0).wait()
        else:
            group.send([torch.ones(2, 4, SHAPE[4], SHAPE[5])], 0, 0).wait()


@pytest.fixture
def pair():
    """(receiver, start(script), go queue): a decode rank's receiver in this process, rank 0 of a pair group
    with a child process that sends as its script says."""
    ctx = mp.get_context("spawn")
    store = tcp_store("127.0.0.1", 0, True, 2)
    go: mp.Queue = ctx.Queue()
    children = []
    receiver = CollectiveKVReceiver(torch.zeros(SHAPE), stall_s=0.5)

    def start(script: list[str]) -> mp.Process:
        child = ctx.Process(target=_sender, args=(store.port, script, go), daemon=True)
        child.start()
        children.append(child)
        receiver.add_group("p1", kv_group("127.0.0.1", store.port, 0, 2, "pair", receiver.wire), [1])
        return child

    yield receiver, start, go
    for child in children:
        child.kill()
        child.join(10)


def _until(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.02)
    return predicate()


def test_a_step_that_stops_arriving_drops_the_pair(pair) -> None:
    receiver, start, go = pair
    child = start(["header", "index", "layer", "wait", "layer"])
    assert receiver.wait_for_layer(7, 0, 4, timeout=10)  # layer 0 landed, then the sender went quiet
    assert _until(lambda: "p1" in receiver.broken)
    assert "stopped sending mid-step" in receiver.broken["p1"] and "p1" not in receiver.groups
    go.put(None)  # the next layer arrives after the watchdog gave up: not written, never landed
    child.join(10)
    assert _until(lambda: not receiver.threads)  # gloo: the blocked receive ended with the peer
    assert receiver.landed(7) == [4, 0, 0] and receiver.pool[1:].abs().sum() == 0
    assert not receiver.wait_for_request(7, 4, timeout=0.1)
    assert receiver.num_errors == 0  # a dropped pair is not a receive error


def test_a_pair_the_cluster_says_is_gone_is_dropped_at_once(pair) -> None:
    receiver, start, go = pair
    child = start(["wait", "header"])
    assert _until(lambda: receiver.threads)
    receiver.drop_pair("p1", "it died")  # idle: its thread is blocked on the next step's header
    assert receiver.broken == {"p1": "it died"} and not receiver.groups
    go.put(None)  # a step from the dropped pair begins
    child.join(10)
    assert _until(lambda: not receiver.threads)
    assert receiver.landed(7) == [0, 0, 0] and receiver.pool.abs().sum() == 0
    receiver.drop_pair("p1", "again")  # dropping a dropped pair changes nothing
    assert receiver.broken == {"p1": "it died"}


def test_a_whole_step_lands_and_an_idle_pair_is_not_a_stall(pair) -> None:
    receiver, start, go = pair
    start(["header", "index", "layer", "layer", "layer", "wait"])
    assert receiver.wait_for_request(7, 4, timeout=10)
    time.sleep(1.5)  # idle three times stall_s: between steps nothing is due
    assert receiver.broken == {} and "p1" in receiver.groups
    assert receiver.pool[:, :, 0].eq(1).all() and receiver.pool[:, :, 1:].abs().sum() == 0


def test_each_decode_rank_receives_from_the_prefill_ranks_that_owe_it_heads() -> None:
    assert senders_to(4, (0, 4), 2) == [0, 1]  # TP 2 -> 1: both halves
    assert senders_to(4, (2, 4), 2) == [1]  # TP 2 -> 2: the rank holding the same heads
    assert senders_to(4, (0, 2), 1) == [0]
    assert senders_to(2, (0, 1), 4) == [0] and senders_to(2, (1, 2), 4) == [2]  # replicated heads: one rank each


class _Work:
    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> bool:
        self.waited = True
        return True


class _RecordingGroup:
    """Stands in for a process group where none can run (NCCL on a host without a GPU): records what is
    sent, to compare the two wires' messages; `done` says whether its sends complete."""

    def __init__(self, done: bool = True) -> None:
        self.sent: list[tuple[int, list]] = []
        self.works: list[_Work] = []
        self.done, self.aborted = done, False

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        self.sent.append((dst, tensors[0].cpu().tolist()))
        self.works.append(_Work(self.done))
        return self.works[-1]

    def abort(self) -> None:
        self.aborted = True


def _one_step(saver: CollectiveKVSaver, group: _RecordingGroup) -> None:
    saver.bind_local(torch.zeros(SHAPE))
    saver.join_pair("d0", group, uid=5)
    for rank, heads in ((0, (0, 1)), (1, (1, 2))):  # a decode replica at TP 2, ranks 0 and 1 of the pair
        saver.peers.setdefault("d0", []).append((rank, heads, SHAPE[3], 1))
    saver.begin_planned({"d0": (None, [8, 9, 10], [7, 0, 3], [])})
    for layer in range(LAYERS):
        k = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4) + layer
        saver.save_kv_layer(layer, k, -k)
    saver.end_step()


def test_nccl_and_gloo_send_the_same_plan_and_messages_and_only_the_wire_differs(monkeypatch) -> None:
    gloo, nccl = CollectiveKVSaver(2), CollectiveKVSaver(2, stall_s=0.2)
    gloo_group, nccl_group = _RecordingGroup(), _RecordingGroup(done=False)
    _one_step(gloo, gloo_group)
    monkeypatch.setattr(Wire, "for_device", classmethod(lambda cls, device: cls("nccl", torch.device(device))))
    _one_step(nccl, nccl_group)
    assert (gloo.wire.backend, nccl.wire.backend) == ("gloo", "nccl")
    # per decode rank: header, index, then each layer's rows of the heads it holds, in layer order
    assert gloo_group.sent == nccl_group.sent and len(gloo_group.sent) == 2 * (2 + LAYERS)
    assert gloo_group.sent[0] == (0, [3, 1, 0, 1, 5, 1]) and gloo_group.sent[1] == (0, [8, 9, 10, 7, 0, 3])
    assert all(w.waited for w in gloo_group.works) and not gloo._inflight  # gloo: a step waits for its sends
    assert not any(w.waited for w in nccl_group.works)  # nccl: the compute stream never waits on a send
    assert len(nccl._inflight) == len(nccl_group.sent) and not nccl.unreachable()
    time.sleep(0.3)  # the sends have not completed for longer than stall_s: the decode replica is gone
    nccl.begin_planned({})
    assert "has not completed" in nccl.unreachable()["d0"] and nccl_group.aborted and not nccl._inflight
    for work in nccl_group.works:
        work.done = True
    nccl.detach("d0")  # the cluster drops the pool: forgotten, and aborted (again: harmless)
    assert not nccl.unreachable() and "d0" not in nccl.groups


def test_nccl_sends_that_complete_are_forgotten(monkeypatch) -> None:
    monkeypatch.setattr(Wire, "for_device", classmethod(lambda cls, device: cls("nccl", torch.device(device))))
    saver, group = CollectiveKVSaver(2, stall_s=0.0), _RecordingGroup(done=True)
    _one_step(saver, group)
    saver.begin_planned({})
    assert not saver._inflight and not saver.unreachable() and not group.aborted


def test_the_wire_is_nccl_on_cuda_and_gloo_on_cpu(monkeypatch) -> None:
    monkeypatch.delenv("PDSERVE_KV_WIRE", raising=False)
    cuda, cpu = Wire.for_device("cuda:0"), Wire.for_device("cpu")
    assert (cuda.backend, cuda.buffers, cuda.waits_for_sends) == ("nccl", torch.device("cuda:0"), False)
    assert (cpu.backend, cpu.buffers, cpu.waits_for_sends) == ("gloo", torch.device("cpu"), True)
    monkeypatch.setenv("PDSERVE_KV_WIRE", "gloo")  # two processes on one GPU: NCCL refuses it
    staged = Wire.for_device("cuda:0")
    assert (staged.backend, staged.buffers) == ("gloo", torch.device("cpu"))
    assert Wire.for_device("cpu").backend == "gloo"
    assert HEADER == 6
