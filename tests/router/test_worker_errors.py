"""What a replica raises reaches the router as a status it can act on: the worker turns the
engine's and kv_transfer's exceptions into plain ones (executor/errors.py) that unpickle in a
process without torch, and the router maps them by name."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import grpc
import ray

from engine.loop import ReplicaDead as EngineDead
from replica.contract import KVLost, LeaseEnded, ReplicaDead, plain
from kv_transfer import KVTransferError, LeaseExpired
from router.router import Replica, worker_error

ROOT = Path(__file__).resolve().parents[2]


def test_engine_and_transfer_errors_become_plain_ones_that_unpickle_without_torch() -> None:
    cases = [LeaseExpired("r1", "the lease ended"), KVTransferError("r2", "its decode pool is unreachable"),
             EngineDead("the engine loop died"), ValueError("bad prompt")]
    plain_errors = [plain(e) for e in cases]
    assert [type(e) for e in plain_errors] == [LeaseEnded, KVLost, ReplicaDead, ValueError]
    assert "r2" in str(plain_errors[1]) and "unreachable" in str(plain_errors[1])
    script = ("import pickle, sys; errs = pickle.loads(sys.stdin.buffer.read()); "
              "print([type(e).__name__ for e in errs], 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(plain_errors), capture_output=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout.decode().strip() == "['LeaseEnded', 'KVLost', 'ReplicaDead', 'ValueError'] False"


def test_the_router_maps_them_to_statuses() -> None:
    def status(e: BaseException) -> tuple[grpc.StatusCode, bool, bool]:
        replica = Replica("prefill", 0, None, 1)
        err = worker_error(ray.exceptions.RayTaskError("prefill", "tb", e), replica, "rid")
        return err.code, err.kv_lost, replica.healthy

    assert status(LeaseEnded("lease")) == (grpc.StatusCode.ABORTED, False, True)
    assert status(KVLost("lost")) == (grpc.StatusCode.UNAVAILABLE, True, True)  # the decode side decides
    assert status(ReplicaDead("dead")) == (grpc.StatusCode.UNAVAILABLE, False, False)
    assert status(ValueError("bad")) == (grpc.StatusCode.INVALID_ARGUMENT, False, True)
