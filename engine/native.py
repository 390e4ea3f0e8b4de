"""Small C kernels for the CPU, compiled with the system C compiler on first use and cached by
source hash (in $PDSERVE_CACHE, default ~/.cache/pdserve); None where no compiler is found or
the build fails, so every caller keeps a torch path.

PDSERVE_PORTABLE_C=1 builds every kernel with AVX-512 off (-mno-avx512f): each kernel's portable
branch, the code a CPU without AVX-512 runs, built and tested on any host (tests/engine/test_portable_c.py).
AMX needs AVX-512 too, so the tile paths (qgemm, the C decoder stack) report themselves unsupported."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def load(source: Path, flags: list[str], functions: dict[str, tuple[list, type | None]]) -> ctypes.CDLL | None:
    """build() and declare each function's (argtypes, restype)."""
    dll = build(source, flags)
    if dll is not None:
        for name, (argtypes, restype) in functions.items():
            fn = getattr(dll, name)
            fn.argtypes, fn.restype = argtypes, restype
    return dll


# Linked with any of these, gcc adds crtfastmath.o, whose constructor turns on flush-to-zero and
# denormals-are-zero for the whole process as the library loads (torch's ops included): they
# stay compile flags only. A kernel that wants denormals flushed sets it around its own work.
_FAST_MATH = {"-ffast-math", "-Ofast", "-funsafe-math-optimizations"}
_RECIPE = b"compile, then link without fast-math"  # in the cache tag: libraries built otherwise are not reused
PORTABLE_ENV = "PDSERVE_PORTABLE_C"


def portable() -> bool:
    """Whether this process builds the kernels' portable branches only (PDSERVE_PORTABLE_C)."""
    return os.environ.get(PORTABLE_ENV, "0") not in ("", "0")


def build(source: Path, flags: list[str]) -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    if portable():
        flags = [*flags, "-mno-avx512f"]  # after -march=native, so it wins
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # its headers too
    tag = hashlib.sha256(src + " ".join(flags).encode() + _RECIPE).hexdigest()[:16]
    cache_dir = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    lib = cache_dir / f"{source.stem}-{tag}.so"
    if not lib.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            obj, out = Path(tmp) / f"{source.stem}.o", Path(tmp) / lib.name
            compile_flags = [f for f in flags if f != "-shared" and not f.startswith("-l")]
            link_flags = [f for f in flags if f not in _FAST_MATH]
            for cmd in ([cc, "-c", str(source), "-o", str(obj), *compile_flags],
                        [cc, str(obj), "-o", str(out), *link_flags]):
                if subprocess.run(cmd, capture_output=True).returncode != 0:
                    return None
            os.replace(out, lib)  # atomic: concurrent builders agree on the result
    return ctypes.CDLL(str(lib))
