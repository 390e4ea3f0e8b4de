"""Scheduler, CPU only and no model: the one rule (catch num_computed_tokens up to num_tokens
inside a token budget), chunked prefill, continuous batching, FCFS, preemption by recompute."""
from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from engine.options import EngineOptions
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput, StepCosts
from engine.sequence import Sequence, SequenceStatus

BS = 16  # block size


def make(num_blocks: int = 64, budget: int = 2048, max_num_seqs: int = 256,
         chunk: int | None = None, **options) -> Scheduler:
    return Scheduler(EngineOptions(budget, max_num_seqs, chunk, **options), BlockManager(num_blocks, BS))


def seq(num_prompt: int, max_tokens: int = 8, rid: str | None = None) -> Sequence:
    return Sequence([7] * num_prompt, SamplingParams(max_tokens=max_tokens), seed=0, request_id=rid)


def check(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants every step must keep."""
    cfg, bm = sched.config, sched.block_manager
    assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(out.seqs) == len(out.num_scheduled_tokens) == len({s.seq_id for s in out.seqs})
    assert len(sched.running) <= cfg.max_num_seqs
    for s, n in zip(out.seqs, out.num_scheduled_tokens):
        assert 1 <= n <= cfg.chunk_size
        assert s.num_computed_tokens + n <= s.num_tokens  # never past the tokens it has
        assert len(s.block_table) * BS >= s.num_computed_tokens + n  # every slot has a home
        assert s.status is SequenceStatus.RUNNING and s in sched.running
    for s in out.preempted:
        assert s.block_table == [] and s.num_computed_tokens == 0 and s in sched.waiting
    live = [b for s in sched.running for b in s.block_table]
    assert len(live) == len(set(live)), "two running sequences share a block"
    assert len(live) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert all(s.block_table == [] for s in sched.waiting)


def step(sched: Scheduler, next_token: int = 1) -> SchedulerOutput:
    """One engine step without a model: computed += n; a sequence that caught up samples a token."""
    out = sched.schedule()
    check(sched, out)
    for s, n in zip(out.seqs, out.num_scheduled_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(next_token)
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    return out


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: n for s, n in zip(out.seqs, out.num_scheduled_tokens)}


def test_one_rule_prefill_then_decode() -> None:
    sched = make()
    a = seq(10, max_tokens=3, rid="a")
    sched.add(a)
    assert sched.has_unfinished()
    out = step(sched)
    assert scheduled(out) == {"a": 10}  # the whole prompt: computed catches up to num_tokens
    assert a.num_computed_tokens == 10 and a.num_tokens == 11
    assert scheduled(step(sched)) == {"a": 1}  # then one token per step
    assert scheduled(step(sched)) == {"a": 1}
    assert a.is_finished and a.finish_reason == "length" and a.num_output_tokens == 3
    assert not sched.has_unfinished() and sched.schedule().is_empty
    assert sched.block_manager.num_free_blocks == 64


def test_decode_after_transferred_prefill() -> None:
    # a request whose prompt KV was computed elsewhere arrives with num_computed_tokens = prompt
    # length and its first token sampled: the same rule schedules just one token for it
    sched = make()
    a = seq(40, max_tokens=3, rid="a")
    a.token_ids.append(9)
    a.num_computed_tokens = 40
    sched.add(a)
    out = step(sched)
    assert scheduled(out) == {"a": 1}
    assert len(a.block_table) == 3  # slots for all 41 tokens
    assert a.num_computed_tokens == 41 and a.num_output_tokens == 2


def test_chunked_prefill_splits_at_the_budget() -> None:
    sched = make(budget=32)
    a = seq(100, max_tokens=2, rid="a")
    sched.add(a)
    sizes = [scheduled(step(sched))["a"] for _ in range(5)]
    assert sizes == [32, 32, 32, 4, 1]
    assert a.num_output_tokens == 2 and a.is_finished


def test_chunked_prefill_splits_at_max_prefill_chunk() -> None:
    sched = make(budget=64, chunk=24)
    a, b = seq(50, rid="a"), seq(30, rid="b")
    sched.add(a)
    sched.add(b)
    # each sequence gets at most one chunk per step; the budget holds both chunks
    assert scheduled(step(sched)) == {"a": 24, "b": 24}
    assert scheduled(step(sched)) == {"a": 24, "b": 6}  # b's prompt is done: it samples
    assert b.num_output_tokens == 1 and a.num_output_tokens == 0
    assert scheduled(step(sched)) == {"a": 2, "b": 1}
    assert a.num_output_tokens == 1


def test_decodes_and_prefill_chunks_share_a_step() -> None:
    sched = make(budget=32)
    a, b = seq(5, max_tokens=20, rid="a"), seq(5, max_tokens=20, rid="b")
    sched.add(a)
    sched.add(b)
    assert scheduled(step(sched)) == {"a": 5, "b": 5}
    c = seq(100, rid="c")
    sched.add(c)  # arrives while a and b decode: joins the running batch at once
    out = step(sched)
    assert scheduled(out) == {"a": 1, "b": 1, "c": 30}  # the budget left after the decodes
    assert [s.request_id for s in out.seqs] == ["a", "b", "c"]  # oldest first
    assert scheduled(step(sched)) == {"a": 1, "b": 1, "c": 30}
    assert a.num_output_tokens == 3 and c.num_computed_tokens == 60


def test_budget_exhausted_by_the_first_prefill_leaves_others_waiting() -> None:
    sched = make(budget=40)
    a, b = seq(40, rid="a"), seq(10, rid="b")
    sched.add(a)
    sched.add(b)
    assert scheduled(step(sched)) == {"a": 40}
    assert list(sched.waiting) == [b] and b.block_table == []
    assert scheduled(step(sched)) == {"a": 1, "b": 10}


def test_fcfs_admission_and_max_num_seqs() -> None:
    sched = make(max_num_seqs=2)
    seqs = [seq(4, max_tokens=2 + i, rid=str(i)) for i in range(5)]
    for s in seqs:
        sched.add(s)
    admitted: list[str] = []
    while sched.has_unfinished():
        before = {s.request_id for s in sched.running}
        out = step(sched)
        assert len(out.seqs) <= 2
        admitted += [rid for rid in scheduled(out) if rid not in before]
    assert admitted == ["0", "1", "2", "3", "4"]  # in arrival order
    assert all(s.is_finished for s in seqs)


def test_fcfs_head_of_line_is_not_overtaken() -> None:
    # the head of waiting does not fit; a smaller later request must not jump ahead of it
    sched = make(num_blocks=6)
    a = seq(64, max_tokens=40, rid="a")  # 4 blocks
    big, small = seq(40, rid="big"), seq(4, rid="small")  # 3 blocks, 1 block
    sched.add(a)
    step(sched)
    sched.add(big)
    sched.add(small)
    out = step(sched)
    assert scheduled(out) == {"a": 1}
    assert list(sched.waiting) == [big, small]
    sched.finish(a, "abort")
    assert scheduled(step(sched)) == {"big": 40, "small": 4}


def started(sched: Scheduler) -> list[str]:
    """Request ids in the order they start, stepping until everything finishes."""
    order: list[str] = []
    while sched.has_unfinished():
        before = {s.request_id for s in sched.running}
        order += [rid for rid in scheduled(step(sched)) if rid not in before and rid not in order]
    return order


@pytest.mark.parametrize("policy, want", [("fcfs", "abcde"), ("lof", "ceadb"), ("spf", "ebdac")])
def test_a_scheduling_policy_orders_a_burst(policy: str, want: str) -> None:
    # one sequence at a time (max_num_seqs=1): the order they start in is the policy's
    sched = make(max_num_seqs=1, scheduling_policy=policy)
    for rid, prompt, out in [("a", 30, 8), ("b", 5, 2), ("c", 40, 20), ("d", 10, 8), ("e", 3, 9)]:
        sched.add(seq(prompt, max_tokens=out, rid=rid))
    assert "".join(started(sched)) == want  # equal keys (a, d under lof) keep arrival order


def test_lof_orders_by_the_output_tokens_given_over_max_tokens() -> None:
    # a prefill replica's sequences stop at their first token (max_tokens=1): the request's own length orders them
    sched = make(max_num_seqs=1, scheduling_policy="lof")
    for rid, out in [("a", 10), ("b", 300), ("c", 40)]:
        sched.add(seq(8, max_tokens=1, rid=rid), output_tokens=out)
    assert started(sched) == ["b", "c", "a"]


def test_a_request_waits_at_most_max_queue_wait_s_behind_later_ones() -> None:
    now = [100.0]
    sched = Scheduler(EngineOptions(2048, 1, scheduling_policy="spf", max_queue_wait_s=5.0), BlockManager(64, BS),
                      clock=lambda: now[0])
    sched.add(seq(60, max_tokens=1, rid="long"))
    sched.add(seq(4, max_tokens=1, rid="short0"))
    assert started_one(sched) == "short0"  # the shorter prompt first
    now[0] += 4.0
    sched.add(seq(4, max_tokens=1, rid="short1"))
    assert started_one(sched) == "short1"  # 4 s: still overtaken
    now[0] += 1.5
    sched.add(seq(4, max_tokens=1, rid="short2"))
    assert started_one(sched) == "long"  # 5.5 s: it goes first now
    assert started_one(sched) == "short2"


def test_every_overdue_request_goes_ahead_in_the_same_step_oldest_first() -> None:
    now = [0.0]
    sched = Scheduler(EngineOptions(64, scheduling_policy="spf", max_queue_wait_s=5.0), BlockManager(64, BS),
                      clock=lambda: now[0])
    for i in range(4):
        sched.add(seq(60 - i, max_tokens=1, rid=f"long{i}"))  # long3 is the shortest of them
    now[0] = 6.0
    for i in range(4):
        sched.add(seq(4, max_tokens=1, rid=f"short{i}"))
    out = step(sched)
    assert list(scheduled(out)) == ["long0", "long1"]  # 60 + 4 of the 64-token budget: no short prompt overtakes
    assert [s.request_id for s in sched.waiting] == ["long2", "long3", "short0", "short1", "short2", "short3"]


def started_one(sched: Scheduler) -> str:
    """Step until the running sequence finishes and another starts; that one's id."""
    while True:
        out = step(sched)
        if out.seqs and out.seqs[0].num_computed_tokens == out.num_scheduled_tokens[0]:
            return out.seqs[0].request_id


def test_a_preempted_sequence_goes_back_ahead_of_the_policys_order() -> None:
    sched = make(num_blocks=4, scheduling_policy="spf")
    big = seq(30, max_tokens=40, rid="big")  # 2 blocks now, 5 by its end
    sched.add(big)
    sched.add(seq(20, max_tokens=20, rid="mid"))  # 2 blocks
    step(sched)  # both prefill (mid first: the shorter prompt): every block taken
    while not (out := step(sched)).preempted:
        pass
    assert [s.request_id for s in out.preempted] == ["big"]  # the newest in the running batch
    sched.add(seq(2, max_tokens=1, rid="tiny"))  # shorter than anything left, yet behind the preempted one
    assert [s.request_id for s in sched.waiting] == ["big", "tiny"]


def test_preemption_evicts_the_newest_by_recompute() -> None:
    # 4 blocks of 16: a and b each hold 2 after prefill; a's growth past 32 tokens needs a 5th
    sched = make(num_blocks=4)
    a, b, c = seq(20, max_tokens=30, rid="a"), seq(20, max_tokens=30, rid="b"), seq(3, rid="c")
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.add(c)  # c cannot be admitted: no free block
    while not sched.num_preemptions:
        out = step(sched)
        assert len(out.seqs) >= 1
    assert out.preempted == [b] and sched.num_preemptions == 1
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(sched.waiting) == [b, c]  # back at the front, ahead of later arrivals
    assert sched.running == [a] and scheduled(out) == {"a": 1}
    assert len(a.block_table) == 3 and sched.block_manager.num_free_blocks == 1
    # b's generated tokens are kept: once a finishes it recomputes prompt + output in one prefill
    b_tokens = b.num_tokens
    assert b.num_output_tokens > 0
    sched.finish(a, "abort")
    assert sched.block_manager.num_free_blocks == 4
    out = step(sched)
    assert scheduled(out)["b"] == b_tokens
    assert b.num_computed_tokens == b_tokens and b.num_tokens == b_tokens + 1


def test_preemption_can_evict_the_sequence_being_scheduled() -> None:
    # the newest running sequence is the one that needs a block: it preempts itself
    sched = make(num_blocks=3)
    a, b = seq(32, max_tokens=10, rid="a"), seq(16, max_tokens=10, rid="b")
    sched.add(a)
    sched.add(b)
    out = step(sched)  # a: 2 blocks, b: 1 block; both full
    assert scheduled(out) == {"a": 32, "b": 16} and sched.block_manager.num_free_blocks == 0
    out = step(sched)  # a needs a 3rd block: b (newest) goes, a runs
    assert scheduled(out) == {"a": 1} and out.preempted == [b]
    out = step(sched)  # a has room for 15 more tokens; b waits (no free block, and FCFS)
    assert scheduled(out) == {"a": 1} and not out.preempted and list(sched.waiting) == [b]


def test_no_admission_in_a_step_that_preempted() -> None:
    # the victim's first recompute chunk would fit in the blocks it just gave back, but
    # re-admitting it in the same step would undo the preemption
    sched = make(num_blocks=4, chunk=16)
    a, b = seq(32, max_tokens=10, rid="a"), seq(16, max_tokens=10, rid="b")
    sched.add(a)
    sched.add(b)
    assert scheduled(step(sched)) == {"a": 16, "b": 16}
    assert scheduled(step(sched)) == {"a": 16, "b": 1}  # b's 17th token takes a 2nd block
    assert sched.block_manager.num_free_blocks == 0
    out = step(sched)  # a's 33rd token needs a 3rd block: b (2 blocks) is preempted
    assert out.preempted == [b] and scheduled(out) == {"a": 1}
    assert sched.block_manager.num_free_blocks == 1 and list(sched.waiting) == [b]
    assert scheduled(step(sched)) == {"a": 1, "b": 16}  # re-admitted a step later


def test_finish_frees_blocks_wherever_the_sequence_is() -> None:
    sched = make(num_blocks=8, budget=16)
    a, b, c = seq(40, rid="a"), seq(10, rid="b"), seq(10, rid="c")
    for s in (a, b, c):
        sched.add(s)
    step(sched)  # a mid-prefill (16 of 40), b and c waiting
    assert sched.running == [a] and len(a.block_table) == 1
    sched.finish(a, "abort")
    assert a.is_finished and a.finish_reason == "abort" and a.block_table == []
    assert sched.running == [] and sched.block_manager.num_free_blocks == 8
    sched.finish(c, "abort")  # waiting: just removed
    assert list(sched.waiting) == [b] and c.is_finished
    assert scheduled(step(sched)) == {"b": 10}


@pytest.mark.parametrize("policy", ["fcfs", "lof", "spf"])
def test_random_workload_keeps_invariants_and_finishes(policy: str) -> None:
    rng = random.Random(1234)
    num_preemptions = 0
    for trial in range(6):
        sched = make(num_blocks=rng.choice([10, 16, 24]), budget=rng.choice([8, 24, 64]),
                     max_num_seqs=rng.choice([3, 8, 32]), chunk=rng.choice([None, 5, 16]),
                     scheduling_policy=policy, max_queue_wait_s=rng.choice([0.0, 10.0]))
        pending = [seq(rng.randint(1, 90), max_tokens=rng.randint(1, 40), rid=f"{trial}.{i}")
                   for i in range(20)]
        all_seqs = list(pending)
        outputs_at_preemption: dict[str, list[int]] = {}
        for _ in range(5000):
            while pending and rng.random() < 0.5:
                sched.add(pending.pop(0))
            if not sched.has_unfinished() and not pending:
                break
            out = step(sched, next_token=rng.randrange(1000))
            for s in out.preempted:
                outputs_at_preemption[s.request_id] = s.output_token_ids
        else:
            raise AssertionError("workload did not finish in 5000 steps")
        assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in all_seqs)
        assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
        num_preemptions += sched.num_preemptions
        for s in all_seqs:  # preemption keeps the tokens generated so far
            if s.request_id in outputs_at_preemption:
                got = outputs_at_preemption[s.request_id]
                assert s.output_token_ids[:len(got)] == got
    assert num_preemptions > 0, "the workload is meant to run out of blocks"


# prefix cache ----------------------------------------------------------------------------------


class FakeKV:
    """The KV cache as the token each slot was computed from: a sequence may attend only to slots
    that hold its own tokens, however it came by them (computed, or shared from the prefix cache)."""

    def __init__(self) -> None:
        self.slots: dict[int, int] = {}

    def run(self, out: SchedulerOutput) -> None:
        for s, n in zip(out.seqs, out.num_scheduled_tokens):
            slot = [s.block_table[p // BS] * BS + p % BS for p in range(s.num_computed_tokens + n)]
            assert [self.slots.get(x) for x in slot[:s.num_computed_tokens]] == s.token_ids[:s.num_computed_tokens]
            self.slots.update(zip(slot[s.num_computed_tokens:], s.token_ids[s.num_computed_tokens:]))


def check_shared(sched: Scheduler, out: SchedulerOutput) -> None:
    """check()'s invariants where running sequences may share cached blocks by reference."""
    bm = sched.block_manager
    assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
    holders: dict[int, int] = {}
    for s in sched.running:
        for b in s.block_table:
            holders[b] = holders.get(b, 0) + 1
        for b in s.block_table[s.num_computed_tokens // BS:]:
            assert bm.ref_counts[b] == 1, "a block still being written is shared"
    for s, n in zip(out.seqs, out.num_scheduled_tokens):
        assert 1 <= n and s.num_computed_tokens + n <= min(s.num_tokens, len(s.block_table) * BS)
    assert all(bm.ref_counts[b] == k for b, k in holders.items())
    assert len(holders) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert not set(holders) & set(bm.free_block_ids)
    assert all(s.block_table == [] for s in sched.waiting)


def cached_step(sched: Scheduler, kv: FakeKV, next_token: int = 1) -> SchedulerOutput:
    """step() the way the engine does it: Scheduler.advance, so the blocks a step fills are cached."""
    out = sched.schedule()
    check_shared(sched, out)
    kv.run(out)
    sched.advance(out)
    for s in out.seqs:
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(next_token)
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    return out


def distinct(tokens: list[int], max_tokens: int = 8, rid: str | None = None) -> Sequence:
    return Sequence(tokens, SamplingParams(max_tokens=max_tokens), seed=0, request_id=rid)


def test_a_cached_prefix_is_not_computed_again() -> None:
    sched, kv = make(), FakeKV()
    a = distinct(list(range(40)), max_tokens=2, rid="a")
    sched.add(a)
    while sched.has_unfinished():
        cached_step(sched, kv)
    # b shares a's 2 full prompt blocks; c is a's prompt again; d ends one token past 2 blocks
    b, c, d = (distinct(list(range(n)) + tail, rid=r) for n, tail, r in ((40, [77] * 5, "b"), (40, [], "c"),
                                                                         (32, [5], "d")))
    for s in (b, c, d):
        sched.add(s)
    out = cached_step(sched, kv)
    assert scheduled(out) == {"b": 45 - 32, "c": 40 - 32, "d": 1}  # the last token is always computed
    assert (b.num_cached_tokens, c.num_cached_tokens, d.num_cached_tokens) == (32, 32, 32)
    assert b.block_table[:2] == c.block_table[:2] == d.block_table[:2]
    assert sched.prefix_cache_queries == 40 + 45 + 40 + 33 and sched.prefix_cache_hits == 3 * 32


def test_admission_counts_the_free_cached_blocks_it_takes() -> None:
    sched, kv = make(num_blocks=3), FakeKV()
    a = distinct(list(range(32)), max_tokens=1)
    sched.add(a)
    cached_step(sched, kv)
    assert sched.block_manager.num_free_blocks == 3 and len(sched.block_manager.cached_blocks) == 2
    b = distinct(list(range(32)) + [1] * 16, rid="b")  # 2 free cached blocks shared + 1 new: all 3
    c = distinct([9], rid="c")
    sched.add(b)
    sched.add(c)
    assert scheduled(cached_step(sched, kv)) == {"b": 16}  # c does not fit: the shared blocks are not free
    assert sched.block_manager.num_free_blocks == 0 and list(sched.waiting) == [c]


def test_a_preempted_sequence_finds_its_own_blocks() -> None:
    # as in test_preemption_evicts_the_newest_by_recompute: a's 33rd token needs the block b holds
    sched, kv = make(num_blocks=4), FakeKV()
    a, b = distinct(list(range(20)), max_tokens=30, rid="a"), distinct(list(range(100, 120)), max_tokens=30, rid="b")
    sched.add(a)
    sched.add(b)
    while not sched.num_preemptions:
        out = cached_step(sched, kv)
    assert out.preempted == [b] and b.num_computed_tokens == 0
    # b's 2 full blocks were cached; a's new block is the one b gave back last, its tail
    assert b.num_tokens == 33 and len(sched.block_manager.cached_blocks) == 2 + 1
    sched.finish(a, "abort")
    out = cached_step(sched, kv)  # b starts past its first block
    assert scheduled(out) == {"b": 33 - 16} and b.num_computed_tokens == 33
    assert b.num_cached_tokens == 0 and b.num_preemptions == 1  # reported for its first admission only


def test_random_shared_prefixes_keep_invariants_and_the_kv_right() -> None:
    rng = random.Random(99)
    stems = [[rng.randrange(50) for _ in range(rng.randint(10, 60))] for _ in range(4)]
    hits = num_preemptions = 0
    for trial in range(6):
        sched = make(num_blocks=rng.choice([10, 16, 24]), budget=rng.choice([8, 24, 64]),
                     max_num_seqs=rng.choice([3, 8, 32]), chunk=rng.choice([None, 5, 16]))
        pending = [distinct(rng.choice(stems)[:rng.randint(1, 60)] + [rng.randrange(50)] * rng.randint(0, 20),
                            max_tokens=rng.randint(1, 30), rid=f"{trial}.{i}") for i in range(30)]
        all_seqs, kv = list(pending), FakeKV()
        for _ in range(5000):
            while pending and rng.random() < 0.3:
                sched.add(pending.pop(0))
            if not sched.has_unfinished() and not pending:
                break
            cached_step(sched, kv, next_token=rng.randrange(3))  # few distinct outputs: outputs are shared too
        else:
            raise AssertionError("workload did not finish in 5000 steps")
        bm = sched.block_manager
        assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in all_seqs)
        assert bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0
        assert {b: h for h, b in bm.cached_blocks.items()} == {b: h for b, h in enumerate(bm.block_hashes) if h}
        hits += sched.prefix_cache_hits
        num_preemptions += sched.num_preemptions
    assert hits > 0 and num_preemptions > 0



def test_decodes_come_before_an_older_prefill_chunk() -> None:
    """Decode first: each step the sequences that decode get their token out of the budget before a
    prefill chunk takes it, whatever their place in the batch (here the prefilling c is older)."""
    sched = make(budget=8, chunk=4)
    c = seq(40, rid="c")
    a, b = seq(2, max_tokens=20, rid="a"), seq(2, max_tokens=20, rid="b")
    for s in (c, a, b):
        sched.add(s)
    assert scheduled(step(sched)) == {"c": 4, "a": 2, "b": 2}
    out = step(sched)
    assert scheduled(out) == {"c": 4, "a": 1, "b": 1}
    assert [s.request_id for s in out.seqs] == ["c", "a", "b"]  # still oldest first
    sched.config = EngineOptions(5, 256, 4)  # a tighter budget: c's chunk is what the decodes leave
    assert scheduled(step(sched)) == {"c": 3, "a": 1, "b": 1}  # before: c 4, a 1, b nothing
    sched.config = EngineOptions(2, 256, 4)  # no room for a chunk at all: c waits a step, a and b decode
    assert scheduled(step(sched)) == {"a": 1, "b": 1}
    assert c.num_computed_tokens == 11 and a.num_output_tokens == 4


def test_a_step_time_target_sizes_the_prefill_chunk_from_measured_costs() -> None:
    """step_time_target_s: once the scheduler has seen what a decode step and a prefill token cost, a
    step's prefill tokens are cut to what fits beside the decodes; before that, the budget alone."""
    sched = Scheduler(EngineOptions(512, 256, None, step_time_target_s=0.1), BlockManager(256, BS))
    a, b = seq(4, max_tokens=50, rid="a"), seq(4, max_tokens=50, rid="b")
    for s in (a, b):
        sched.add(s)
    sched.costs.record(step(sched), 0.01)  # 8 prefill tokens: too few to learn from
    assert sched.costs.prefill_token_s == 0
    sched.costs.record(step(sched), 0.02)  # decodes only: 20 ms
    c = seq(1000, rid="c")
    sched.add(c)
    out = step(sched)
    assert scheduled(out) == {"a": 1, "b": 1, "c": 510}  # nothing measured yet: the whole budget
    sched.costs.record(out, 0.02 + 510 * 0.0004)  # each prefill token added 0.4 ms
    assert sched.costs.prefill_token_s == pytest.approx(0.0004)
    assert scheduled(step(sched)) == {"a": 1, "b": 1, "c": 200}  # (100 - 20 ms) / 0.4 ms
    sched.costs.decode_step_s = 0.5  # decodes alone overrun the target: prefill still moves
    assert scheduled(step(sched)) == {"a": 1, "b": 1, "c": StepCosts.MIN_PREFILL}


def test_without_a_target_costs_are_learnt_but_change_nothing() -> None:
    sched = make(budget=64)
    sched.costs.prefill_token_s, sched.costs.decode_step_s = 1.0, 1.0
    sched.add(seq(100, rid="c"))
    assert scheduled(step(sched)) == {"c": 64}


def test_a_landed_transfer_at_a_block_boundary_takes_the_free_block_the_head_cannot_use() -> None:
    # 4 blocks: a prompt prefilled elsewhere filled its 2 reserved blocks exactly, so its next token needs a
    # third; another reservation holds 1; 1 is free. The head of waiting needs 3 and nothing runs: the landed
    # one must take the free block and run, or no step would ever free one (found by planner.simulate)
    sched = make(num_blocks=4)
    bm = sched.block_manager
    head = seq(3 * BS - 8, rid="head")
    landed, reserved = seq(2 * BS, rid="landed"), seq(BS, rid="reserved")
    for s in (landed, reserved):
        bm.allocate(s, s.num_prompt_tokens)
    landed.num_computed_tokens = 2 * BS
    landed.token_ids.append(5)  # the first token, sampled by the prefill side
    sched.add(head)
    sched.add(landed)
    assert bm.num_free_blocks == 1 and bm.num_missing_blocks(landed, landed.num_tokens) == 1
    out = sched.schedule()
    assert scheduled(out) == {"landed": 1} and out.num_decodes == 1
    assert len(landed.block_table) == 3 and bm.num_free_blocks == 0


def test_a_landed_transfer_runs_when_the_head_of_waiting_can_never_get_its_blocks() -> None:
    # 4 blocks: a prompt prefilled elsewhere landed in 2 reserved blocks and waits for its next token (which
    # needs no new block); another reservation holds the other 2; at the head of waiting, a preempted request
    # needs 3. Nothing runs, so FCFS alone would never schedule anything again (found by planner.simulate)
    sched = make(num_blocks=4)
    bm = sched.block_manager
    head = seq(40, rid="head")
    landed, reserved = seq(20, rid="landed"), seq(30, rid="reserved")
    for s in (landed, reserved):
        bm.allocate(s, s.num_prompt_tokens)
    landed.num_computed_tokens = 20
    landed.token_ids.append(5)  # the first token, sampled by the prefill side
    sched.add(head)
    sched.add(landed)
    assert bm.num_free_blocks == 0
    out = sched.schedule()
    assert scheduled(out) == {"landed": 1} and out.num_decodes == 1
    assert list(sched.waiting) == [head] and sched.running == [landed]
    # with something running, FCFS holds again: the head is not overtaken by a later landed prompt
    later = seq(20, rid="later")
    sched.finish(reserved, "abort")
    bm.allocate(later, 20)
    later.num_computed_tokens = 20
    later.token_ids.append(5)
    sched.add(later)
    assert "later" not in scheduled(sched.schedule())
