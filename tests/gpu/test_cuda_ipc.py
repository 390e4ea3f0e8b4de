"""On a CUDA machine: the `ipc` backend through CUDA IPC. The decode engine (this process)
allocates its KV pool on the GPU and publishes an IPC handle; a prefill engine in another
process opens it and writes each layer's K/V into the reserved blocks; the decode side's
greedy continuation equals one engine doing both. Run: pytest -m gpu tests/gpu"""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from engine import LLMEngine, SamplingParams
from kv_transfer import KVReceiver
from kv_transfer.metadata import PoolHandle
from kv_transfer.shm import shared_pool_allocator
from tests.kv_transfer.test_shm_transfer import generate_on, prompts_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prefill_process(model: str, handle: PoolHandle, jobs: mp.Queue, results: mp.Queue) -> None:
    from kv_transfer import KVSender
    from kv_transfer.shm import ShmKVSaver

    engine = LLMEngine.from_model(model, num_kv_blocks=64, max_num_batched_tokens=32, device="cuda",
                                  attention_backend="torch")
    saver = ShmKVSaver()
    saver.attach(handle)  # opens the decode process's pool through its CUDA IPC handle
    sender = KVSender(engine, saver)
    for prompt, params, target in jobs.get():
        sender.add(prompt, params, target)
    done = []
    while engine.has_unfinished():
        done += [(d.target.request_id, d.first_token) for d in sender.step()]
    torch.cuda.synchronize()
    results.put((done, saver.bytes_sent))


def test_cuda_ipc_transfer_equals_one_engine(tiny_checkpoints) -> None:
    model = str(tiny_checkpoints["llama"])
    handles: list[PoolHandle] = []
    decode = LLMEngine.from_model(model, num_kv_blocks=64, block_size=8, device="cuda", attention_backend="torch",
                                  kv_allocator=shared_pool_allocator("gpu-test", handles))
    assert handles[0].cuda_ipc is not None
    prompts = prompts_of([1, 9, 40, 77])
    want = generate_on(decode, prompts, GREEDY)
    receiver = KVReceiver(decode, "gpu-test")
    targets = [receiver.reserve(p, GREEDY, f"r{i}") for i, p in enumerate(prompts)]
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_prefill_process, args=(model, handles[0], jobs, results))
    child.start()
    jobs.put([(p, GREEDY, t) for p, t in zip(prompts, targets)])
    done, sent = results.get(timeout=300)
    child.join(60)
    assert sent > 0
    for rid, first in done:
        receiver.commit(rid, first)
    outputs = {}
    while decode.has_unfinished():
        outputs.update((o.request_id, o.token_ids) for o in decode.step())
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == want
