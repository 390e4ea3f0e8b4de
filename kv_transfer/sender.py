"""Scheduler half of a connector on the prefill side: run prompts whose KV belongs to a decode
replica, and report each one's first token once all of its KV has been written there."""
from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

from engine import LLMEngine, SamplingParams
from engine.kv_connector import KVSaver
from engine.sequence import TokenLogprobs
from kv_transfer.metadata import transfer_failed
from replica.contract import KVLost, LeaseEnded, Reservation


@dataclass
class PrefillDone:
    """A prompt fully prefilled and its KV handed over. Filled by KVSender.step()."""
    target: Reservation
    first_token: int
    logprobs: TokenLogprobs | None
    num_cached_tokens: int = 0  # prompt tokens taken from this engine's prefix cache


class KVSender:
    def __init__(self, engine: LLMEngine, saver: KVSaver) -> None:
        self.engine = engine
        self.saver = saver
        engine.runner.set_kv_saver(saver)
        self.targets: dict[str, Reservation] = {}
        self._lost: list[KVLost] = []  # finished prompts whose KV could not all be sent

    def add(self, prompt_token_ids: Seq[int], params: SamplingParams, target: Reservation) -> None:
        """Queue the prompt for `target`'s blocks. KVLost where its decode pool is not attached here (a
        reservation made just before that replica was dropped): queued, it would fail this engine's step."""
        if not self.saver.reaches(target.pool):
            raise transfer_failed(target.request_id, f"its decode pool {target.pool!r} is not attached to this "
                                                     f"prefill replica (gone, or not linked yet)")
        # the prefill side samples only the first token; the decode side owns the rest
        seq = self.engine.add_request(prompt_token_ids, replace(params, max_tokens=1), target.request_id,
                                      output_tokens=params.max_tokens)
        seq.kv_target = target
        self.targets[target.request_id] = target

    def abort(self, request_id: str) -> bool:
        self.targets.pop(request_id, None)
        return self.engine.abort(request_id)

    def expire(self, now: float | None = None) -> list[KVLost]:
        """Give up on every prompt whose decode-side lease has ended (its blocks there may be freed
        now, so not one more byte is written: LeaseEnded) or whose decode pool can no longer be
        reached (KVLost). Call it before each step."""
        now = time.time() if now is None else now
        lost, self._lost = self._lost, []
        unreachable = self.saver.unreachable()
        for t in [t for t in self.targets.values() if t.deadline <= now or t.pool in unreachable]:
            self.abort(t.request_id)
            ended = "the decode side's lease ended before the prefill did"
            lost.append(transfer_failed(t.request_id, ended, LeaseEnded) if t.deadline <= now
                        else self._unreachable(t, unreachable))
        return lost

    def drop_pool(self, pool: str, why: str) -> list[KVLost]:
        """Abort every prompt bound for `pool` (its decode replica is gone), so the pool can be detached."""
        bound = [t for t in self.targets.values() if t.pool == pool]
        for t in bound:
            self.abort(t.request_id)
        return [transfer_failed(t.request_id, f"its decode pool {pool!r} is gone ({why})") for t in bound]

    def step(self) -> list[PrefillDone]:
        done = []
        for out in self.engine.step():
            target = self.targets.pop(out.request_id)
            if target.pool in (unreachable := self.saver.unreachable()):
                self._lost.append(self._unreachable(target, unreachable))
                continue
            done.append(PrefillDone(target, out.token_ids[0], out.logprobs[0] if out.logprobs else None,
                                    out.num_cached_tokens))
        return done

    @staticmethod
    def _unreachable(target: Reservation, unreachable: dict[str, str]) -> KVLost:
        return transfer_failed(target.request_id, f"its decode pool {target.pool!r} is unreachable "
                                                  f"({unreachable[target.pool]})")
