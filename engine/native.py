"""Small C kernels for the CPU, compiled with the system C compiler on first use and cached by
source hash (in $PDSERVE_CACHE, default ~/.cache/pdserve); None where no compiler is found or
the build fails, so every caller keeps a torch path."""
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


def build(source: Path, flags: list[str]) -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    src = source.read_bytes()
    tag = hashlib.sha256(src + " ".join(flags).encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    lib = cache_dir / f"{source.stem}-{tag}.so"
    if not lib.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            out = Path(tmp) / lib.name
            done = subprocess.run([cc, str(source), "-o", str(out), *flags], capture_output=True)
            if done.returncode != 0:
                return None
            os.replace(out, lib)  # atomic: concurrent builders agree on the result
    return ctypes.CDLL(str(lib))
