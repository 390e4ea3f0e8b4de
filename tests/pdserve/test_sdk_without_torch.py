"""The client SDK works where only grpcio and protobuf are installed: a fresh venv that sees nothing else."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import socket, sys, time

    import grpc
    import pdserve

    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "numpy", "yaml", "engine", "router"))
    assert not heavy, f"import pdserve pulled in {heavy}"
    for name in ("torch", "ray", "numpy"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{name} is importable: the venv is not bare")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = pdserve.Client(f"127.0.0.1:{port}", timeout=5)
    assert pdserve.client.build_request("Hi", max_tokens=4).sampling.max_tokens == 4
    start = time.monotonic()
    try:
        client.generate("Hi", max_tokens=4)
    except pdserve.RequestError as e:
        assert e.code is grpc.StatusCode.UNAVAILABLE, e
    else:
        raise AssertionError("generate succeeded with nothing listening")
    assert time.monotonic() - start < 5
    client.close()
    print("ok")
""")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed here"
    return Path(spec.submodule_search_locations[0])


def link_packages(deps: Path) -> None:
    """Symlink into deps the SDK's requirements (grpcio and its one dependency, protobuf) and the repo's packages."""
    (deps / "google").mkdir(parents=True)  # a namespace package holding protobuf alone
    links = {
        "grpc": package_dir("grpc"),
        "typing_extensions.py": Path(importlib.util.find_spec("typing_extensions").origin),
        "google/protobuf": package_dir("google.protobuf"),
        "pdserve": ROOT / "pdserve",
        "protos": ROOT / "protos",
    }
    if importlib.util.find_spec("google._upb"):  # protobuf's compiled backend, a sibling of google/protobuf
        links["google/_upb"] = package_dir("google._upb")
    for name, target in links.items():
        (deps / name).symlink_to(target)


def test_sdk_imports_and_calls_with_only_grpcio_and_protobuf(tmp_path: Path) -> None:
    base_python = getattr(sys, "_base_executable", None) or str(Path(sys.base_prefix) / "bin" / "python3")
    venv = tmp_path / "venv"
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site_packages = subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    link_packages(tmp_path / "deps")
    (Path(site_packages) / "sdk_deps.pth").write_text(f"{tmp_path / 'deps'}\n")
    script = tmp_path / "check.py"
    script.write_text(CHECK)

    # -I: no PYTHONPATH, no user site, no cwd on the path, so only the venv and the .pth are seen.
    result = subprocess.run([python, "-I", str(script)], check=False, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
