"""The engines the engine benchmark compares, behind one interface:
generate(prompts, n) -> {"tokens": new token ids per prompt, "wall", "cpu", "t_first", "tokens_at_first"}.

OurEngine runs in this process; transformers runs in a child process of its own (RemoteHF), and vLLM's
offline engine, when asked for, in a child run by its own venv's interpreter (RemoteVLLM), so each engine's
peak RSS is its own and no two run at once."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import subprocess
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from benchmarks.machine import THREADS

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Timed:
    """Wall and process-CPU time of one call."""

    def __enter__(self) -> _Timed:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


class OurEngine:
    name = "pdserve"

    def __init__(self) -> None:
        from engine import LLM

        torch.set_num_threads(THREADS)
        t = time.perf_counter()
        self.llm = LLM("default", dtype="float32", num_threads=THREADS)
        self.load_s = time.perf_counter() - t

    def chat_ids(self) -> list[int]:
        return self.llm.apply_chat_template(CHAT)

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        """LLM.generate's own loop (add every request, step until all finish), timed per step."""
        from engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        engine = self.llm.engine
        first = None
        with torch.inference_mode(), _Timed() as tm:
            seqs = [engine.add_request(p, params) for p in prompts]
            done: dict[str, Any] = {}
            while len(done) < len(seqs):
                for out in engine.step():
                    done[out.request_id] = out
                if first is None and all(s.num_output_tokens for s in seqs):
                    first = (time.perf_counter() - tm.wall, sum(s.num_output_tokens for s in seqs))
        return {"tokens": [done[s.request_id].token_ids for s in seqs], "wall": tm.wall, "cpu": tm.cpu,
                "t_first": first[0], "tokens_at_first": first[1]}


class _FirstTokenTimer:
    """A transformers streamer that notes when the first new tokens arrive (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.t_first: float | None = None
        self.tokens_at_first = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.t_first = time.perf_counter()
            self.tokens_at_first = value.numel()

    def end(self) -> None:
        pass


class HFEngine:
    name = "transformers"

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - t
        gc = self.model.generation_config
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else 0
        gc.eos_token_id = None  # ignore_eos: generate fills unset values from here, so unset it here
        self.attn_impl = self.model.config._attn_implementation

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        width = max(map(len, prompts))  # left padding + attention mask
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        timer = _FirstTokenTimer()
        with torch.inference_mode(), _Timed() as tm:
            start = time.perf_counter()
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0,
                                      do_sample=False, pad_token_id=self.pad_id, streamer=timer)
        new = out[:, width:].tolist()
        if any(len(t) != n for t in new):
            raise RuntimeError(f"transformers stopped early: {[len(t) for t in new]} tokens, wanted {n}")
        return {"tokens": new, "wall": tm.wall, "cpu": tm.cpu, "t_first": timer.t_first - start,
                "tokens_at_first": timer.tokens_at_first}


def _hf_child(path: str, conn: Connection) -> None:
    try:
        engine = HFEngine(path)
        conn.send(("ok", {"load_s": engine.load_s, "attn_impl": engine.attn_impl}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        cmd, args = conn.recv()
        if cmd == "quit":
            conn.send(("ok", {"peak_rss_mb": maxrss_mb()}))
            return
        try:
            conn.send(("ok", engine.generate(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class RemoteHF:
    """HFEngine in a child process, driven over a pipe; it loads while ours loads here."""
    name = "transformers"

    def __init__(self, path: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_child, args=(path, child), daemon=True)
        self.proc.start()
        self.info: dict[str, Any] | None = None

    def wait_loaded(self) -> dict[str, Any]:
        if self.info is None:
            self.info = self._recv()
        return self.info

    def _recv(self) -> Any:
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"transformers child failed:\n{result}")
        return result

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        self.wait_loaded()
        self.conn.send(("generate", (prompts, n)))
        return self._recv()

    def close(self) -> float:
        self.wait_loaded()
        self.conn.send(("quit", None))
        rss = self._recv()["peak_rss_mb"]
        self.proc.join(timeout=30)
        return rss


class RemoteVLLM:
    """vLLM's offline engine (benchmarks/vllm_child.py) in a child process run by the interpreter of vLLM's own
    venv, on `model_dir` (the default model as a Hugging Face folder), driven over a pair of pipes. Both cores,
    as vLLM's CPU build binds them (VLLM_CPU_OMP_THREADS_BIND); it loads while ours loads here."""
    name = "vllm"

    def __init__(self, python: str, model_dir: str) -> None:
        if not os.access(python, os.X_OK):
            raise SystemExit(f"--vllm {python!r}: not an interpreter; `bash scripts/vllm_serve.sh` makes one "
                             f"(.vllm-venv/bin/python)")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            raise SystemExit(f"--vllm-model {model_dir!r}: no Hugging Face folder there; write one with "
                             f"`python -m benchmarks.export_hf {model_dir}`")
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{THREADS - 1}"),
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)
        child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_child.py")
        with open(os.path.join(model_dir, "vllm-child.log"), "w") as log:  # the child keeps its own copy
            to_child, commands = os.pipe()
            answers, from_child = os.pipe()
            try:
                self.proc = subprocess.Popen([python, "-P", child, model_dir, str(to_child), str(from_child)],
                                             env=env, pass_fds=(to_child, from_child), stdout=subprocess.DEVNULL,
                                             stderr=log)
            except BaseException:
                for fd in (commands, answers):
                    os.close(fd)
                raise
            finally:
                os.close(to_child)
                os.close(from_child)
        self._commands, self._answers = os.fdopen(commands, "w"), os.fdopen(answers, "r")
        self.info: dict[str, Any] | None = None

    def _ended(self) -> RuntimeError:
        return RuntimeError(f"the vLLM child ended (exit {self.proc.wait()}); its log: vllm-child.log in the model "
                            f"folder")

    def _recv(self) -> Any:
        line = self._answers.readline()
        if not line:
            raise self._ended()
        (status, result), = json.loads(line).items()
        if status != "ok":
            raise RuntimeError(f"vLLM child failed:\n{result}")
        return result

    def _send(self, *cmd: Any) -> None:
        try:
            self._commands.write(json.dumps(cmd) + "\n")
            self._commands.flush()
        except BrokenPipeError:
            raise self._ended() from None

    def wait_loaded(self) -> dict[str, Any]:
        if self.info is None:
            self.info = self._recv()
        return self.info

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        self.wait_loaded()
        self._send("generate", prompts, n)
        return self._recv()

    def close(self) -> float:
        try:
            self.wait_loaded()
            self._send("quit")
            return self._recv()["peak_rss_mb"]
        finally:
            self._commands.close()
            self._answers.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
