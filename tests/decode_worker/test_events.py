"""The decode replica sends what an engine step sampled for all of its requests as one message
(DecodeWorker.events), and each request's stream ends with one last item."""
from __future__ import annotations

import uuid

import pytest
import ray

from engine import LLM, SamplingParams
from replica.contract import StreamItem


@pytest.fixture(scope="module")
def decode_actor(ray_local, tiny_checkpoints):
    from decode_worker import DecodeWorker

    model = str(tiny_checkpoints["llama"])
    actor = ray.remote(DecodeWorker).options(num_cpus=1).remote(
        model, {"num_kv_blocks": 64, "max_num_batched_tokens": 128, "num_threads": 1},
        f"test-events-{uuid.uuid4().hex[:8]}", 30.0, {"peak_flops": 1e12, "peak_bandwidth": 1e10})
    ray.get(actor.info.remote())
    yield model, actor
    ray.get(actor.shutdown.remote())
    ray.kill(actor)


def test_one_message_carries_every_requests_tokens_of_a_step(decode_actor) -> None:
    model, actor = decode_actor
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14]]
    lengths = [30, 20, 25]  # long enough that all three decode together whatever order they arrive in
    params = [dict(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    events = actor.events.remote()
    ray.get([actor.add_local.remote(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params))])
    got: dict[str, list[StreamItem]] = {f"r{i}": [] for i in range(3)}
    messages = []
    while not all(items and items[-1].last for items in got.values()):
        message = ray.get(next(events), timeout=60)
        messages.append({it.request_id for it in message})
        for it in message:
            got[it.request_id].append(it)
    assert any(len(ids) > 1 for ids in messages)  # several requests' tokens in one message
    want = LLM(model, num_kv_blocks=64).generate(prompts, [SamplingParams(**sp) for sp in params])
    for i, w in enumerate(want):
        items = got[f"r{i}"]
        assert [it.token_id for it in items[:-1]] == w.token_ids
        assert items[-1].finish_reason == "length" and items[-1].token_id is None
    long = dict(temperature=0.0, max_tokens=40, ignore_eos=True)  # still running when the second arrives
    with pytest.raises(ray.exceptions.RayTaskError, match="already running"):
        ray.get([actor.add_local.remote(prompts[0], long, "dup"), actor.add_local.remote(prompts[0], long, "dup")])
    ray.get(actor.abort.remote("dup"))


def test_a_new_subscription_takes_over_and_the_one_before_takes_nothing_more() -> None:
    # the router subscribes again after its stream broke: were the first subscription's generator still running
    # at the replica, it would take (and lose) some of every later step's items
    import asyncio

    from decode_worker.worker import Events

    async def run() -> tuple[list, list]:
        events = Events()
        old = events.subscribe()
        events.push([StreamItem("a", 1)])
        first = await anext(old)
        waiting = asyncio.ensure_future(anext(old, None))  # the old one waits for more, its consumer gone
        await asyncio.sleep(0)
        new = events.subscribe()
        got = asyncio.ensure_future(anext(new))
        await asyncio.sleep(0)
        events.push([StreamItem("a", 2)])
        events.push([StreamItem("b", 3)])
        assert await waiting is None  # it ended, taking nothing
        return first, await got

    first, later = asyncio.run(run())
    assert [it.token_id for it in first] == [1]
    assert [(it.request_id, it.token_id) for it in later] == [("a", 2), ("b", 3)]  # both steps, in order
