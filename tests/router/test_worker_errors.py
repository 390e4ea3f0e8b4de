"""What a replica raises reaches the router as a status it can act on: kv_transfer raises the
contract's errors itself, the actor shell turns the engine's into them (replica/actor.py), they
unpickle in a process without torch, and the router maps them by class, never by name."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import grpc
import ray

from engine.loop import EngineDead
from kv_transfer.metadata import transfer_failed
from replica.actor import as_replica_error
from replica.contract import BadRequest, KVLost, LeaseEnded, ReplicaDead
from router.placement import Replica, replica_error

ROOT = Path(__file__).resolve().parents[2]


def test_engine_and_transfer_errors_are_the_contracts_and_unpickle_without_torch() -> None:
    cases = [transfer_failed("r1", "the lease ended", LeaseEnded),
             transfer_failed("r2", "its decode pool is unreachable"), EngineDead("the engine loop died"),
             ValueError("bad prompt")]
    errors = [as_replica_error(e) for e in cases]
    assert [type(e) for e in errors] == [LeaseEnded, KVLost, ReplicaDead, BadRequest]
    assert "r2" in str(errors[1]) and "unreachable" in str(errors[1]) and errors[1].request_id == "r2"
    script = ("import pickle, sys; errs = pickle.loads(sys.stdin.buffer.read()); "
              "print([type(e).__name__ for e in errs], [e.request_id for e in errs], 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(errors), capture_output=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert run.stdout.decode().strip() == ("['LeaseEnded', 'KVLost', 'ReplicaDead', 'BadRequest'] "
                                           "['r1', 'r2', '', ''] False")


def test_the_router_maps_them_to_statuses() -> None:
    def status(e: BaseException) -> tuple[grpc.StatusCode, bool, bool]:
        replica = Replica("prefill", 0, None, 1)
        err = replica_error(ray.exceptions.RayTaskError("prefill", "tb", e), replica, "rid")
        return err.code, err.kv_lost, replica.healthy

    assert status(LeaseEnded("lease")) == (grpc.StatusCode.ABORTED, False, True)
    assert status(KVLost("lost")) == (grpc.StatusCode.UNAVAILABLE, True, True)  # the decode side decides
    assert status(ReplicaDead("dead")) == (grpc.StatusCode.UNAVAILABLE, False, False)
    assert status(BadRequest("bad")) == (grpc.StatusCode.INVALID_ARGUMENT, False, True)
    assert status(RuntimeError("bug")) == (grpc.StatusCode.INTERNAL, False, True)
    dead = Replica("decode", 0, None, 1)
    assert replica_error(ray.exceptions.ActorDiedError(), dead, "rid").code == grpc.StatusCode.UNAVAILABLE
    assert not dead.healthy
