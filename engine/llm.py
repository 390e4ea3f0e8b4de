"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | Seq[int]
Message = dict[str, str]


class LLM:
    """LLM(model="default" | HF folder | .gguf, dtype="float32", **options).

    options: EngineOptions' fields (engine/options.py: block_size, num_kv_blocks, max_num_batched_tokens,
    max_num_seqs, enable_prefix_caching, tensor_parallel_size, ...); an unknown one raises ValueError
    naming the valid ones.
    LLMEngine.from_model's own keywords pass through too: load_tokenizer, kv_allocator, rank_launcher.
    tensor_parallel_size > 1 needs rank_launcher, which starts ranks 1..n-1; the engine knows no Ray,
    so pass replica.ranks.start_followers for Ray actors (on a local Ray bound to 127.0.0.1 unless this
    process is connected to one). shutdown(), or `with`, releases them at once; an LLM dropped without
    either releases them when it is collected (the next LLM in the process collects it first)."""

    def __init__(self, model: str | None = "default", dtype: str | torch.dtype = "float32", **options: Any):
        self.engine = LLMEngine.from_model(model, dtype, **options)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists. Returns outputs in
        prompt order. A bad prompt raises ValueError before any work is done."""
        if isinstance(prompts, str) or (len(prompts) and hasattr(prompts[0], "__index__")):  # one prompt
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        seqs = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    seqs.append(self.engine.add_request(prompt, p))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
            done: dict[str, RequestOutput] = {}
            while len(done) < len(seqs):
                done.update((out.request_id, out) for out in self.engine.step())
        except BaseException:
            for seq in seqs:  # nothing of this call stays queued or holds blocks
                self.engine.abort(seq.request_id)
            raise
        return [done[s.request_id] for s in seqs]

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c) for c in conversations], sampling_params)

    def apply_chat_template(self, conversation: list[Message]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)
