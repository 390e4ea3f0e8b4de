"""Every C kernel's portable branch (the code a CPU without AVX-512 runs) is built and tested on any
host: the kernels' own tests run again in a process that builds them with AVX-512 off
(PDSERVE_PORTABLE_C=1, engine/native.py), and the libraries it builds hold no AVX-512 instruction."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
# the kernels with a portable branch: paged_decode.c and paged_prefill.c (attention), fused.c and
# activation.c (the layer's elementwise passes); and the reasons the C decoder stack gives there.
# test_cpu_prefill_kernel_* asserts the AVX-512 prefill kernel answered: its portable path is torch's,
# which test_backend_matches_dense_attention checks in the same run.
SELECTION = ["tests/engine/test_fused.py", "tests/engine/test_attention.py",
             "tests/engine/test_native_decoder.py::test_the_model_reasons_need_no_amx",
             "tests/engine/test_native_decoder.py::test_a_quantized_llama_runs_in_c_exactly_where_tiles_or_avx512_do",
             "tests/engine/test_bqgemm.py::test_it_runs_exactly_where_the_cpu_has_avx512_and_names_why_not",
             "-k", "not test_cpu_prefill_kernel"]


def test_the_kernels_tests_pass_on_their_portable_branches(tmp_path: Path) -> None:
    env = {**os.environ, "PDSERVE_PORTABLE_C": "1", "PDSERVE_CACHE": str(tmp_path / "kernels")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *SELECTION],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary  # a skip would hide the branch
    libs = sorted((tmp_path / "kernels").glob("*.so"))
    built = {lib.name.split("-")[0] for lib in libs}
    assert {"paged_decode", "paged_prefill", "fused", "activation"} <= built, built
    for lib in libs:  # -mno-avx512f took: no zmm register (AVX-512's) anywhere in the code
        dis = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        assert "%zmm" not in dis, f"{lib.name} has AVX-512 code"


def test_the_usual_build_takes_the_wide_path_where_the_cpu_has_it(tmp_path: Path) -> None:
    # the other half of the check above: without the switch the same objdump finds AVX-512 code,
    # so the portable run really built something else
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512: every build here is the portable one")
    code = "from engine.layers import fused; assert fused._lib() is not None"
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_PORTABLE_C"} | {"PDSERVE_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)
    (lib,) = tmp_path.glob("fused-*.so")
    assert "%zmm" in subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout


def test_the_decoder_stack_on_int8_blocks_where_there_are_no_tiles(tmp_path: Path) -> None:
    # on an AMX host the suite's own run checks the C stack over tiles; this runs the same checks with
    # PDSERVE_NO_AMX=1, the stack over int8 blocks (bqgemm) that a CPU with AVX-512 but no AMX takes
    from engine.layers import qgemm

    if not qgemm.supported():
        pytest.skip(f"no tiles here ({qgemm.unsupported()}): the suite's own run already takes int8 blocks")
    env = {**os.environ, qgemm.NO_AMX_ENV: "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/engine/test_native_decoder.py", "tests/engine/test_bqgemm.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary
