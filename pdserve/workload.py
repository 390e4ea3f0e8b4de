"""What a benchmark sends: the workloads (how long each prompt and output is), the seeded requests they make, and
the Poisson arrival times. Torch- and numpy-free; `pdserve bench` and benchmarks.serving build on it."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

WORKLOADS = ("fixed", "uniform", "longtail", "shared-doc", "multiturn")
Request = tuple[list[int], int]  # (prompt token ids, output length)


@dataclass(frozen=True)
class LongtailMix:
    """The longtail workload: mostly short chats, some long documents. Lengths in tokens, ranges inclusive."""
    document_fraction: float = 0.2
    chat_prompt: tuple[int, int] = (32, 256)
    chat_output: tuple[int, int] = (32, 128)
    document_prompt: tuple[int, int] = (1024, 3072)
    document_output: tuple[int, int] = (16, 64)


@dataclass(frozen=True)
class SharedDocs:
    """The shared-doc workload: several questions about each of a few long documents (RAG, a document chat);
    a prompt is a document then a question, the documents drawn in random order. Lengths in tokens, ranges inclusive."""
    num_documents: int = 4
    document_len: int = 1024
    question: tuple[int, int] = (16, 64)
    output: tuple[int, int] = (32, 128)


@dataclass(frozen=True)
class Chats:
    """The multiturn workload: conversations that all start with one system prompt; each turn sends the whole
    history (the system prompt, every earlier user message and the answer the server gave it) plus a new user
    message. Lengths in tokens, ranges inclusive."""
    system_len: int = 500
    turns: tuple[int, int] = (3, 6)
    user: tuple[int, int] = (16, 64)
    output: tuple[int, int] = (32, 128)


@dataclass
class Conversation:
    """One conversation of the multiturn workload: its turns' user messages and answer lengths, sent one after
    the other (a turn's prompt holds the answers the server gave to the turns before it)."""
    system: list[int]
    turns: list[Request]  # (user message token ids, answer length)


@dataclass(frozen=True)
class Workload:
    """How long each request's prompt and output are. `kind` picks which fields apply."""
    kind: str = "fixed"  # one of WORKLOADS
    prompt_len: int = 256  # fixed
    output_len: int = 128  # fixed
    prompt_range: tuple[int, int] = (32, 512)  # uniform, inclusive
    output_range: tuple[int, int] = (16, 256)  # uniform, inclusive
    longtail: LongtailMix = LongtailMix()
    shared_doc: SharedDocs = SharedDocs()
    multiturn: Chats = Chats()

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload {self.kind!r}; choose one of {', '.join(WORKLOADS)}")
        if min(self.prompt_len, self.output_len, *self.prompt_range, *self.output_range) < 1:
            raise ValueError("prompt and output lengths must be at least 1 token")
        for name in ("prompt_range", "output_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} ({lo}, {hi}): the minimum must not exceed the maximum")

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """One (prompt_len, output_len) of the fixed, uniform and longtail workloads."""
        if self.kind == "fixed":
            return self.prompt_len, self.output_len
        if self.kind == "uniform":
            return rng.randint(*self.prompt_range), rng.randint(*self.output_range)
        mix = self.longtail
        if rng.random() < mix.document_fraction:
            return rng.randint(*mix.document_prompt), rng.randint(*mix.document_output)
        return rng.randint(*mix.chat_prompt), rng.randint(*mix.chat_output)


def make_requests(workload: Workload | str, n: int, seed: int, vocab: int, max_len: int) -> list[Request]:
    """n (prompt_ids, output_len) pairs: ids uniform in [0, vocab), prompt + output clipped to max_len (the context)
    by shortening the prompt, so the output length stays what the workload asked. Same arguments, same requests."""
    workload = Workload(workload) if isinstance(workload, str) else workload
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: the context must hold at least one prompt and one output token")
    if workload.kind == "multiturn":
        raise ValueError("the multiturn workload's prompts hold the server's answers: make_conversations draws it")
    rng = random.Random(seed)
    if workload.kind == "shared-doc":
        return _shared_doc_requests(workload.shared_doc, n, rng, vocab, max_len)
    # All lengths first, so clipping (which changes how many ids are drawn) never changes another request's lengths.
    lengths = [workload.draw(rng) for _ in range(n)]
    requests = []
    for prompt_len, output_len in lengths:
        output_len = min(output_len, max_len - 1)
        prompt_len = min(prompt_len, max_len - output_len)
        requests.append((rng.choices(range(vocab), k=prompt_len), output_len))
    return requests


def _shared_doc_requests(spec: SharedDocs, n: int, rng: random.Random, vocab: int, max_len: int) -> list[Request]:
    """Documents first, then each request's document, question and output length; a question is shortened, then
    the document, where prompt + output would pass max_len."""
    docs = [rng.choices(range(vocab), k=spec.document_len) for _ in range(spec.num_documents)]
    requests = []
    for _ in range(n):
        doc, question, output_len = rng.choice(docs), rng.randint(*spec.question), rng.randint(*spec.output)
        question_ids = rng.choices(range(vocab), k=question)
        output_len = min(output_len, max_len - 1)
        prompt = (doc + question_ids)[:max_len - output_len]
        requests.append((prompt, output_len))
    return requests


def make_conversations(workload: Workload, n: int, seed: int, vocab: int, max_len: int) -> list[Conversation]:
    """n conversations of the multiturn workload: one system prompt for all, then each conversation's turns (user
    message ids uniform in [0, vocab), answer lengths). A conversation ends early where its next turn's prompt and
    answer would pass max_len. Same arguments, same conversations."""
    spec = workload.multiturn
    rng = random.Random(seed)
    system = rng.choices(range(vocab), k=min(spec.system_len, max(1, max_len // 2)))
    conversations = []
    for _ in range(n):
        turns, length = [], len(system)
        for _ in range(rng.randint(*spec.turns)):
            user, output_len = rng.randint(*spec.user), rng.randint(*spec.output)
            if turns and length + user + output_len > max_len:
                break
            turns.append((rng.choices(range(vocab), k=user), max(1, min(output_len, max_len - length - user))))
            length += user + output_len
        conversations.append(Conversation(system, turns))
    return conversations


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process of `rate` requests/s (exponential
    gaps), or all at 0 when rate is None or inf."""
    if rate is None or math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")  # its own stream: the prompts stay the same whatever the rate
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def steady_count(rate: float, seconds: float, least: int, most: int) -> int:
    """Requests that make `seconds` of arrivals at `rate` (a steady state, not one burst), within [least, most]."""
    return int(min(max(rate * seconds, least), most))


def mix_requests(mix: Sequence[tuple[int, int]], n: int, vocab: int, seed: int = 0) -> list[Request]:
    """n requests drawn from an observed mix of (prompt tokens, output tokens), fresh random token ids (no prefix
    shared: the cautious case)."""
    rng = random.Random(seed)
    drawn = [mix[rng.randrange(len(mix))] for _ in range(n)]
    return [([rng.randrange(1, vocab) for _ in range(max(p, 1))], max(o, 1)) for p, o in drawn]


def log_bucket(x: float, step: float) -> int:
    """Which of the buckets a factor `step` wide x falls in (a cache key's coordinate)."""
    return round(math.log(max(x, 1e-6), step))


def mix_key(rate: float, mix: Sequence[tuple[int, int]], step: float = 1.1) -> tuple[int, int, int]:
    """A cache key for answers planned from (rate, mix): rates, mean prompt and mean output lengths within a
    factor `step` of each other share it."""
    mean_out = sum(o for _, o in mix) / len(mix)
    return log_bucket(rate, step), log_bucket(sum(p for p, _ in mix) / len(mix), step), log_bucket(mean_out, step)


def mix_shape(mix: Sequence[tuple[int, int]], step: float = 1.25) -> tuple[int, int, int]:
    """A cache key for a mix alone: its median and 90th-percentile prompt and its mean output, within a factor
    `step`."""
    prompts = sorted(p for p, _ in mix)
    return (log_bucket(prompts[len(prompts) // 2], step), log_bucket(prompts[(9 * len(prompts)) // 10], step),
            log_bucket(sum(o for _, o in mix) / len(mix), step))


def per_rate(requests, count: int) -> list:
    """A sweep's requests as one list per rate: `requests` is the same for every rate (a list of requests or
    conversations) or already one list per rate (lists of them)."""
    return list(requests) if requests and isinstance(requests[0], list) else [requests] * count


def fresh_requests(workload: Workload | str, n: int, first_seed: int, count: int, vocab: int, max_len: int
                   ) -> list[list[Request]]:
    """`count` sets of requests, the i-th of seed first_seed + i: a sweep whose every rate sends new prompts, so
    none is in a prefix cache from the rate before."""
    return [make_requests(workload, n, first_seed + i, vocab, max_len) for i in range(count)]
