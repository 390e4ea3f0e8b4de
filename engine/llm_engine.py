"""The engine loop: add requests, step, collect finished ones. No threads, no I/O."""
from __future__ import annotations

import gc
import operator
import random
import time
import weakref
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from detok import StopStrings, output_text
from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig, dtype_name
from engine.distributed import destroy_tp_group, free_port, init_tp_group
from engine.loader import open_model
from engine.model_runner import KVAllocator, ModelRunner
from engine.options import EngineOptions
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus, TokenLogprobs

# (engine config, init_method, device) -> ranks 1..n-1, started and joining init_method's group;
# the result has .actors, .wait_ready(), .call(method, *args) and .stop()
RankLauncher = Callable[[EngineConfig, str, str], Any]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop or eos token included)
    text: str  # generated text, ending before any stop string; "" without a tokenizer
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    logprobs: list[TokenLogprobs] | None  # one per generated token when asked for
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache, not computed


def _release_ranks(runner: ModelRunner, followers) -> None:
    """Stop a tensor-parallel replica's other ranks and leave its process group."""
    try:
        runner.stop_followers()
    except RuntimeError:
        pass  # a rank is already gone: the group is broken either way
    destroy_tp_group()
    followers.stop()


class LLMEngine:
    def __init__(self, config: EngineConfig, weights, tokenizer: Any | None = None,
                 kv_allocator: KVAllocator | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(config, weights, config.options.device, kv_allocator)
        self.block_manager = BlockManager(self.runner.num_blocks, config.options.block_size,
                                          config.options.enable_prefix_caching)
        self.scheduler = Scheduler(config.options, self.block_manager)
        self.requests: dict[str, Sequence] = {}
        self.followers: Any = None  # ranks 1..n-1 of a tensor-parallel replica (see RankLauncher)
        self._finished: list[RequestOutput] = []  # finished outside step(), handed out by the next one
        self._stop_ids = frozenset(config.model_config.eos_token_ids)
        self.sampled: list[Sequence] = []  # the sequences that got a token in the last step, for streaming

    @classmethod
    def from_model(cls, model: str | None = "default", dtype: str | torch.dtype = "float32", *,
                   kv_allocator: KVAllocator | None = None, load_tokenizer: bool = True,
                   rank_launcher: RankLauncher | None = None, **options: Any) -> LLMEngine:
        """options: EngineOptions' fields (engine/options.py); an unknown one raises ValueError.
        load_tokenizer=False: prompts must be token ids and stop strings are left to the caller
        (the router detokenizes and applies them for the cluster's workers).
        tensor_parallel_size > 1: this process is rank 0 and `rank_launcher(config, init_method, device)`
        starts the others; the engine knows no Ray, so pass one, e.g. replica.ranks.start_followers."""
        opts = EngineOptions.from_kwargs(dtype=dtype_name(dtype), **options)
        source = open_model(model, load_tokenizer)
        config = EngineConfig(source.path, ModelConfig.from_hf(source.hf_config), opts)
        n = opts.tensor_parallel_size
        if n > 1 and rank_launcher is None:
            raise ValueError(f"tensor_parallel_size={n} needs a rank launcher to start ranks 1..{n - 1}; pass "
                             "rank_launcher=replica.ranks.start_followers (Ray actors), or use tensor_parallel_size=1")
        followers = None
        if n > 1 or torch.distributed.is_initialized():
            gc.collect()  # an engine dropped without shutdown() still holding the process's group releases it now
        if n > 1:
            init_method = f"tcp://127.0.0.1:{free_port()}"
            followers = rank_launcher(config, init_method, opts.device)
            init_tp_group(0, n, init_method, opts.device)
        try:
            engine = cls(config, source.weights, source.tokenizer, kv_allocator)
        except BaseException:
            destroy_tp_group()
            if followers is not None:
                followers.stop()
            raise
        engine.followers = followers
        if followers is not None:
            # dropped without shutdown() (no `with`): its ranks and group go when it is collected
            engine._release = weakref.finalize(engine, _release_ranks, engine.runner, followers)
            try:
                followers.wait_ready()
            except BaseException:
                engine.shutdown()
                raise
        return engine

    def shutdown(self) -> None:
        """Release the other ranks of a tensor-parallel replica (a no-op at TP 1)."""
        if self.followers is None:
            return
        self._release()  # once: a weakref.finalize
        self.followers = None

    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; give the prompt as token ids")
            return self.tokenizer.encode(prompt)
        try:
            return [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError("prompt token ids must be integers") from None

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, output_tokens: int | None = None) -> Sequence:
        """Validate and queue one request; a bad one raises ValueError and changes nothing. output_tokens:
        the most the request generates where params.max_tokens is not that (the scheduling policy's key)."""
        return self._queue(self._new_sequence(prompt, params, request_id), output_tokens)

    def _queue(self, seq: Sequence, output_tokens: int | None = None) -> Sequence:
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq, output_tokens)
        return seq

    def reserve(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                request_id: str | None = None, local_below: int = 0) -> Sequence | None:
        """Decode side of a disaggregated pair: hold KV blocks for a prompt another engine will
        prefill. The blocks of the prompt's longest cached prefix are shared, not written: their KV is
        here already (seq.num_cached_tokens of the prompt; the other engine sends only the rest, and
        these stay referenced, so never evicted, for as long as the reservation lives). The sequence
        waits outside the scheduler until `admit_prefilled`; `abort` frees it. Returns None when the
        blocks are not free now.
        local_below: when fewer than this many of the prompt's tokens are left uncached, nothing is
        reserved: the prompt is queued here, as add_request would (the sequence returned has no blocks
        yet), since a short tail is prefilled here sooner than it is sent from elsewhere."""
        seq = self._new_sequence(prompt, params, request_id)
        bm = self.block_manager
        prefix = bm.match_prefix(seq)
        cached = len(prefix) * bm.block_size
        if seq.num_prompt_tokens - cached < local_below:
            return self._queue(seq)
        if not bm.can_allocate(seq, seq.num_prompt_tokens, prefix):
            return None
        bm.allocate(seq, seq.num_prompt_tokens, prefix)
        seq.num_cached_tokens = cached
        self.scheduler.prefix_cache_queries += seq.num_prompt_tokens
        self.scheduler.prefix_cache_hits += cached
        self.requests[seq.request_id] = seq
        return seq

    def admit_prefilled(self, request_id: str, first_token: int, logprobs: TokenLogprobs | None = None) -> None:
        """The reserved blocks now hold the whole prompt's KV and the prefill side sampled the
        first token: the sequence joins the running batch with num_computed = prompt length."""
        seq = self.requests.get(request_id)
        if seq is None or seq.num_computed_tokens or seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"request {request_id!r} has no reservation waiting for its KV")
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.cache_full_blocks(seq)  # the KV is there now: its full blocks may be shared
        seq.token_ids.append(first_token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        reason = self._finish_reason(seq, first_token)
        if reason is None:
            self.scheduler.add(seq)
        else:
            self.scheduler.finish(seq, reason)
            del self.requests[request_id]
            self._finished.append(self._output(seq))

    def _new_sequence(self, prompt: str | Seq[int], params: SamplingParams | None,
                      request_id: str | None) -> Sequence:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = self.tokenize(prompt)
        vocab, limit = self.config.model_config.vocab_size, self.config.max_model_len
        if not ids:
            raise ValueError("prompt is empty; give at least one token")
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {limit}, "
                             f"so prompts may have at most {limit - 1}")
        needed = self.block_manager.num_blocks_for(min(len(ids) + params.max_tokens, limit))
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"request needs {needed} KV blocks but the cache has {self.block_manager.num_blocks}; "
                             f"lower max_tokens or give the engine more KV blocks")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs={params.logprobs} exceeds the vocabulary size {vocab}; ask for fewer")
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Sequence(ids, params, seed, request_id)

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished)

    def step(self) -> list[RequestOutput]:
        """Schedule, run, sample, and return the requests that finished in this step."""
        finished, self._finished = self._finished, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self.sampled = []
            return finished
        t0 = time.perf_counter()
        sampled, tokens, logprobs = self.runner.execute(sched)
        self.scheduler.costs.record(sched, time.perf_counter() - t0)
        self.sampled = sampled
        self.scheduler.advance(sched)
        for seq, token, lp in zip(sampled, tokens, logprobs):
            seq.token_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.requests[seq.request_id]
                finished.append(self._output(seq))
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self._stop_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self.tokenizer is not None and self._stop_string_at(seq) is not None:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _stop_string_at(self, seq: Sequence) -> int | None:
        """Where a stop string starts in the output text; only the last token's text is new (the
        router applies the same StopStrings to the text it streams)."""
        text = self._text(seq)
        return StopStrings(seq.params.stop).find(text, len(text) - len(self._text_of(seq.token_ids[-1:])))

    def _text_of(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _text(self, seq: Sequence) -> str:
        """The output's text as it reads after the prompt (as the router streams it: detok.output_text)."""
        if self.tokenizer is None:
            return ""
        return output_text(self, seq.token_ids[:seq.num_prompt_tokens], seq.output_token_ids)

    def decode(self, ids: list[int]) -> str:
        """detok's Decoder: the tokenizer's text of ids, special tokens left out."""
        return self._text_of(ids)

    def _output(self, seq: Sequence) -> RequestOutput:
        text = self._text(seq)
        if seq.params.stop and (cut := self._stop_string_at(seq)) is not None:
            text = text[:cut]
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            token_ids=seq.output_token_ids, text=text, finish_reason=seq.finish_reason,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            num_preemptions=seq.num_preemptions, num_cached_tokens=seq.num_cached_tokens)
