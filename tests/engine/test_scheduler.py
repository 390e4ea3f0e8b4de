"""Scheduler, CPU only and no model: the one rule (catch num_computed_tokens up to num_tokens
inside a token budget), chunked prefill, continuous batching, FCFS, preemption by recompute."""
from __future__ import annotations

import random

from engine.block_manager import BlockManager
from engine.options import EngineOptions
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

BS = 16  # block size


def make(num_blocks: int = 64, budget: int = 2048, max_num_seqs: int = 256,
         chunk: int | None = None) -> Scheduler:
    return Scheduler(EngineOptions(budget, max_num_seqs, chunk), BlockManager(num_blocks, BS))


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


def test_random_workload_keeps_invariants_and_finishes() -> None:
    rng = random.Random(1234)
    num_preemptions = 0
    for trial in range(6):
        sched = make(num_blocks=rng.choice([10, 16, 24]), budget=rng.choice([8, 24, 64]),
                     max_num_seqs=rng.choice([3, 8, 32]), chunk=rng.choice([None, 5, 16]))
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
