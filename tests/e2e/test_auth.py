"""API keys, request ownership and TLS on a real cluster (the default model): both front doors refuse a
call without the right key, a request belongs to the key that made it, and gRPC and HTTPS serve
the certificate of a throwaway CA made here (trustme). Loopback only."""
from __future__ import annotations

import asyncio
import json
import ssl

import grpc
import httpx
import openai
import pytest
import trustme

from pdserve import AsyncClient, Client, RequestError
from pdserve.launch import start_cluster
from tests.e2e.conftest import small_cluster, wait_idle

KEYS = ("key-of-alice", "key-of-bob")
PROMPT = list(range(1000, 1040))  # token ids


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    root = tmp_path_factory.mktemp("tls")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(paths["cert"], append=i > 0)
    return paths


@pytest.fixture(scope="module")
def secure(ray_local, ca):
    config = small_cluster("default", api_keys=KEYS, tls_cert=str(ca["cert"]),
                           tls_key=str(ca["key"]), max_ongoing_requests=2, local_prefill_threshold=8)
    with start_cluster(config, progress=None) as c:
        yield c


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)


def client(cluster, ca, key: str | None = KEYS[0], **kw) -> Client:
    return Client(cluster.address, timeout=60, api_key=key, root_certificates=ca["ca"], **kw)


def test_grpc_needs_the_right_key(secure, ca) -> None:
    for key, why in ((None, "missing API key"), ("not-a-key", "wrong API key"), ("key-of-ali", "wrong API key")):
        with client(secure, ca, key) as c:
            for call in (lambda: c.generate(PROMPT, max_tokens=4), c.list_models, c.status, lambda: c.cancel("x")):
                with pytest.raises(RequestError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and why in err.value.details
    for key in KEYS:
        with client(secure, ca, key) as c:
            got = c.generate(PROMPT, max_tokens=8, ignore_eos=True, temperature=0)
            assert len(got.token_ids) == 8 and c.list_models()[0].name == "default"


def test_the_key_from_the_environment(secure, ca, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", KEYS[1])
    with Client(secure.address, timeout=60, root_certificates=ca["ca"]) as c:
        assert len(c.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids) == 4


def test_a_request_belongs_to_its_key(secure, ca) -> None:
    """Bob can neither cancel Alice's request nor collide with its id; Alice can't run the same id
    twice, and her Cancel reaches her request whether it runs or waits in the queue."""
    long = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}

    async def run():
        alice = AsyncClient(secure.address, timeout=120, api_key=KEYS[0], root_certificates=ca["ca"])
        bob = AsyncClient(secure.address, timeout=120, api_key=KEYS[1], root_certificates=ca["ca"])
        mine = alice.stream(PROMPT, request_id="mine", **long)
        await anext(mine)
        assert not await bob.cancel("mine")
        # Bob's own "mine" runs beside Alice's and gives the tokens it would alone
        bobs = await bob.generate(PROMPT, request_id="mine", max_tokens=8, temperature=0)
        want = await bob.generate(PROMPT, max_tokens=8, temperature=0)
        assert bobs.token_ids == want.token_ids
        with pytest.raises(RequestError) as err:
            await alice.generate(PROMPT, request_id="mine", max_tokens=4)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and "mine" in err.value.details
        # a second long request fills max_ongoing_requests=2; a third waits in the queue
        other = alice.stream(PROMPT, request_id="other", **long)
        await anext(other)
        queued = asyncio.create_task(alice.generate(PROMPT, request_id="queued", max_tokens=4))
        while (await alice.status()).requests_queued < 1:
            await asyncio.sleep(0.05)
        assert await alice.cancel("queued")
        with pytest.raises(RequestError) as err:
            await queued
        assert err.value.code == grpc.StatusCode.CANCELLED
        for rid, stream in (("mine", mine), ("other", other)):
            assert await alice.cancel(rid)
            with pytest.raises(RequestError) as err:
                async for _ in stream:
                    pass
            assert err.value.code == grpc.StatusCode.CANCELLED
        await alice.close(), await bob.close()

    asyncio.run(run())
    with client(secure, ca) as c:
        assert not any(wait_idle(c).values())
        s = c.status()
        assert s.requests_in_flight == 0 and s.requests_queued == 0


def test_https_and_keys_through_the_openai_client(secure, ca) -> None:
    base = secure.openai_base_url
    assert base.startswith("https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=ca["ca"])) as http:
        _https_and_keys(base, http, secure, ca)


def _https_and_keys(base: str, http: httpx.Client, secure, ca) -> None:
    api = openai.OpenAI(base_url=base, api_key=KEYS[1], max_retries=0, http_client=http)
    got = api.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={
        "ignore_eos": True})
    with client(secure, ca) as c:
        want = c.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
    assert got.usage.completion_tokens == 6 and got.choices[0].text == want.text
    chunks = list(api.completions.create(model="default", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in (("GET", "/models"), ("POST", "/completions"), ("POST", "/chat/completions")):
            r = http.request(method, base + path, headers=headers, json={"prompt": PROMPT})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0, http_client=http).models.list()
    assert http.get(f"https://{secure.http_address}/health").status_code == 200  # open: probes carry no key


def test_plaintext_against_the_tls_ports_fails_clearly(secure, ca) -> None:
    with Client(secure.address, timeout=10, api_key=KEYS[0]) as c:
        with pytest.raises(RequestError) as err:
            c.list_models()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "tls=True" in err.value.details, err.value.details
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{secure.http_address}/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"},
                  timeout=10).raise_for_status()
    # and TLS without the CA does not trust the throwaway certificate
    with Client(secure.address, timeout=10, api_key=KEYS[0], tls=True) as c:
        with pytest.raises(RequestError) as err:
            c.list_models()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("backend", ["grpc", "openai"])
def test_pdserve_bench_over_tls(secure, ca, backend, tmp_path, capsys) -> None:
    from pdserve.bench import main

    target = ["--address", secure.address] if backend == "grpc" else ["--backend", "openai", "--base-url",
                                                                     secure.openai_base_url]
    flags = [*target, "--api-key", KEYS[0], "--workload", "fixed", "--prompt-len", "16", "--output-len", "3",
             "--num-requests", "3", "--quiet"]
    assert main([*flags, "--tls-ca", str(ca["ca"]), "--json", str(tmp_path / "run.json")]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["completed"] == 3 and run["failed"] == 0 and run["total_output_tokens"] == 9
    # without the throwaway CA, the server's certificate is not trusted: a clear refusal, not a run of failures
    assert main([*flags, *(["--tls"] if backend == "grpc" else [])]) == 1
    assert "pdserve bench: no " in capsys.readouterr().err
