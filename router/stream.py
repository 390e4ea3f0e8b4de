"""One request's response stream. Its tokens arrive in its inbox, fanned out from its decode
replica's one event stream (a message per engine step for all the replica's requests); Output
turns them into response chunks (incremental text with stop strings applied, token ids,
logprobs); Clock keeps the request's timings for the last chunk."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from detok import IncrementalDetokenizer, StopStrings, context_of
from protos.pdserve.v1 import pdserve_pb2 as pb
from replica.contract import ReplicaDead, StreamItem
from router.placement import Placed, Replica, RequestFailed, replica_error
from router.tokenizer import Tokenizer

log = logging.getLogger("pdserve.router")
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class Inboxes:
    """Each request's StreamItems, taken from its decode replica's event stream (one subscription a
    replica, DecodeWorker.events). A request opens its inbox before it is placed and closes it when
    it ends; a replica whose stream breaks ends each of its requests with a ReplicaDead."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[asyncio.Queue[StreamItem], Placed]] = {}

    def open(self, p: Placed) -> asyncio.Queue[StreamItem]:
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._open[p.rid] = (queue, p)
        return queue

    def close(self, rid: str) -> None:
        self._open.pop(rid, None)

    async def pump(self, replica: Replica, retry_s: float = 1.0) -> None:
        """Deliver `replica`'s events for as long as the router runs; subscribe again after a break."""
        broken: RequestFailed | None = None  # why the last subscription ended (logged once)
        while True:
            try:
                async for ref in replica.actor.events.remote():
                    for item in await ref:
                        if (entry := self._open.get(item.request_id)) is not None:
                            entry[0].put_nowait(item)
                    broken = None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if broken is None:
                    log.warning("the event stream of %s broke: %s", replica.name, e)
                broken = replica_error(e, replica, "")  # marks a dead replica so
                self.fail(replica, f"the event stream of {replica.name} broke ({broken})")
            await asyncio.sleep(retry_s)

    def fail(self, replica: Replica, why: str) -> None:
        """End every open request on `replica` with a ReplicaDead (the router moves it elsewhere)."""
        for rid, (queue, p) in list(self._open.items()):
            if p.decode is replica:
                queue.put_nowait(StreamItem(rid, error=ReplicaDead(f"request {rid!r}: {why}", rid)))

    @staticmethod
    async def take(queue: asyncio.Queue[StreamItem]) -> list[StreamItem]:
        """What arrived since the last take (at least one item)."""
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        return items


class Output:
    """Token batches in, response chunks out. Text that could still become the start of a stop
    string is held back until it cannot; a matched stop string and what follows it are cut."""

    def __init__(self, rid: str, tokenizer: Tokenizer | None, stop: tuple[str, ...], prompt: Sequence[int] = ()
                 ) -> None:
        """prompt: its token ids, whose last few the text of the first output token is decoded after."""
        self.rid = rid
        self.detok = IncrementalDetokenizer(tokenizer, context_of(tokenizer, prompt)) if tokenizer is not None \
            else None
        self.stop = StopStrings(stop)
        self.text = ""  # decoded so far (a stop string cut off)
        self.sent = 0  # chars of text sent
        self.token_ids: list[int] = []
        self.stopped = False  # a stop string matched

    def add(self, items: Iterable[StreamItem]) -> pb.GenerateResponse | None:
        ids, lps = [], []
        for item in items:
            ids.append(item.token_id)
            if (lp := item.logprobs) is not None:
                lps.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()]))
            if self.detok is not None and self._append(self.detok.push([item.token_id])):
                break  # the tokens after a stop string are not part of the output
        self.token_ids += ids
        safe = len(self.text) if self.stopped else max(self.sent, self.stop.safe_end(self.text))
        return self._chunk(ids, lps, safe)

    def finish(self, reason: str, usage: pb.Usage, timings: pb.Timings) -> pb.GenerateResponse:
        if self.detok is not None and not self.stopped:
            self._append(self.detok.flush())
        chunk = self._chunk([], [], len(self.text), force=True)
        chunk.finish_reason = FINISH["stop" if self.stopped else reason]
        chunk.usage.CopyFrom(usage)
        chunk.timings.CopyFrom(timings)
        return chunk

    def _append(self, delta: str) -> bool:
        """Add decoded text; True when it completes a stop string (the text is cut before it)."""
        if not delta:
            return False
        new_from = len(self.text)
        self.text += delta
        if (cut := self.stop.find(self.text, new_from)) is not None:
            self.text = self.text[:cut]
            self.stopped = True
        return self.stopped

    def _chunk(self, ids, lps, upto: int, force: bool = False) -> pb.GenerateResponse | None:
        text = self.text[self.sent:upto]
        if not (ids or text or force):
            return None
        self.sent = max(self.sent, upto)
        return pb.GenerateResponse(request_id=self.rid, text=text, token_ids=ids, logprobs=lps)


@dataclass
class Clock:
    """When each stage of one request ended (time.monotonic()), for its timings and the latency metrics."""
    t0: float = field(default_factory=time.monotonic)  # received
    placed: float | None = None  # decode blocks reserved (or a local prefill queued)
    prefilled: float | None = None  # the prefill replica returned the first token
    committed: float | None = None  # the decode replica had all of the prompt's KV
    first: float | None = None  # the first token streamed
    last_token_at: float | None = None
    num_tokens: int = 0  # tokens streamed

    @property
    def ttft(self) -> float | None:
        return self.first - self.t0 if self.first is not None else None

    def streamed(self, n: int) -> list[float]:
        """n tokens just went out; returns the inter-token gaps to record (tokens that arrive
        together share the gap since the last)."""
        now = time.monotonic()
        gaps = [] if self.first is None else [(now - self.last_token_at) / n] * n
        self.first = self.first or now
        self.last_token_at, self.num_tokens = now, self.num_tokens + n
        return gaps

    def timings(self, local: bool, prefill_replica: str, decode_replica: str, reason: str = "",
                predicted: tuple[float, float] = (0.0, 0.0)) -> pb.Timings:
        ms = lambda t: (t - self.t0) * 1e3 if t is not None else 0.0  # noqa: E731
        prefilled = self.prefilled or self.first
        committed = self.committed or prefilled
        return pb.Timings(
            queue_ms=ms(self.placed), prefill_ms=(prefilled - self.placed) * 1e3 if prefilled else 0.0,
            transfer_ms=(committed - prefilled) * 1e3 if (committed and prefilled) else 0.0,
            ttft_ms=ms(self.first), total_ms=ms(time.monotonic()),
            path=pb.PREFILL_PATH_LOCAL if local else pb.PREFILL_PATH_DISAGGREGATED,
            prefill_replica=prefill_replica, decode_replica=decode_replica, dispatch_reason=reason,
            predicted_ttft_ms=predicted[0] * 1e3, predicted_tpot_ms=predicted[1] * 1e3)
