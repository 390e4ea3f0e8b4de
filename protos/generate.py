"""Regenerate the Python modules of the wire contract: `python -m protos.generate [--check]`.

With --check nothing in the repo is touched: the modules are written to a temporary folder and the command exits 1,
naming the committed files that differ, so a .proto edit without regeneration fails the tests.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/pdserve/v1/pdserve.proto"
GENERATED = [f"protos/pdserve/v1/pdserve_pb2{suffix}" for suffix in (".py", ".pyi", "_grpc.py")]


def generate(out_dir: Path) -> None:
    """Run protoc on PROTO, writing the GENERATED modules under out_dir (the repo root to update them)."""
    # The well-known types' include path is what `python -m grpc_tools.protoc` adds, so the output matches that command.
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}; fix the errors it printed above")


def stale_files() -> list[str]:
    """The GENERATED files that differ from what protoc writes now (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [name for name in GENERATED
                if not (ROOT / name).exists() or not filecmp.cmp(Path(tmp) / name, ROOT / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report generated files that are out of date")
    if not parser.parse_args(argv).check:
        generate(ROOT)
        return 0
    stale = stale_files()
    for name in stale:
        print(f"{name} is out of date; run `python -m protos.generate`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
