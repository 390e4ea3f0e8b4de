"""CPU placement (PoolConfig.cpus, ClusterConfig.service_cpus): each engine thread on its pool's cores, every
other thread of the replicas and the router's process on the service cores, the router's cores given back
at stop; the cluster still gives the offline engine's tokens."""
from __future__ import annotations

import dataclasses
import os

import pytest

from engine import LLM, SamplingParams
from pdserve import Client
from pdserve.config import PoolConfig
from pdserve.launch import start_cluster
from replica.affinity import thread_masks
from tests.e2e.conftest import small_cluster
from tests.kv_transfer.test_shm_transfer import prompts_of

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to place threads apart")


def test_engines_keep_their_cores_and_the_service_runs_on_its_own(ray_local, tiny_model) -> None:
    import ray

    base = small_cluster(tiny_model, local_prefill_threshold=8)
    config = dataclasses.replace(base, service_cpus="1", prefill=dataclasses.replace(base.prefill, cpus="0"),
                                 decode=dataclasses.replace(base.decode, cpus="1"))
    before = thread_masks()
    prompts = prompts_of([40, 12], seed=3)  # one prefilled on the prefill replica, one on the decode replica
    params = dict(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in LLM(tiny_model, num_kv_blocks=256).generate(prompts, SamplingParams(**params))]
    with start_cluster(config, progress=None) as cluster:
        prefill, decode = ray.get([cluster.prefill[0].cpu_affinity.remote(), cluster.decode[0].cpu_affinity.remote()])
        assert prefill == {"engine": [0], "others": [(1,)]}
        assert decode == {"engine": [1], "others": [(1,)]}
        assert set(map(tuple, thread_masks().values())) == {(1,)}  # the router's process
        with Client(cluster.address, timeout=60) as client:
            got = [client.generate(p, **params).token_ids for p in prompts]
        assert got == want
    after = thread_masks()
    assert all(after[t] == before[t] for t in after.keys() & before.keys())  # its cores given back


def test_a_cpu_list_that_is_not_one_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match=r"cpus='0-a'"):
        PoolConfig(cpus="0-a")
    with pytest.raises(ValueError, match="names a CPU twice"):
        PoolConfig(cpus="0,0-1")
