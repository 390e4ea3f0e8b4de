"""The import directions of DESIGN.md's package table ("who may import whom"), read from the source
with `ast` (tests/import_rules.py): every import, at module level or inside a function, relative or
absolute, or an import_module/__import__ call on a string literal. A forbidden edge is reported as
`file:line: importer -> imported (rule)`. Also: no import cycles among the project's modules, and
each rule below does catch an example of what it forbids."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from tests.import_rules import ANY, STDLIB, Import, Rule, check, cycles, read_imports

ROOT = Path(__file__).resolve().parent.parent
# the project's packages (tests/ is not read); a missing one (detok/ today) is skipped
PACKAGES = ("engine", "kv_transfer", "replica", "prefill_worker", "decode_worker", "router", "pdserve", "protos",
            "benchmarks", "detok", "blockkeys", "planner")
RUNTIME = tuple(f"{p}/" for p in PACKAGES if p != "benchmarks")  # what a deployment runs

# rule name -> the direction it forbids. Importers are files ("replica/contract.py") or folders
# ("engine/"); forbidden and allowed are module prefixes ("replica" is replica and replica.*).
RULES: dict[str, Rule] = {
    # the model runtime both workers share knows nothing of Ray, gRPC or the packages that serve it:
    # a worker is a thin shell that hands the engine what it needs (a rank launcher, a KV saver)
    "engine below serving": Rule(
        ("engine/",), ("ray", "grpc", "kv_transfer", "replica", "router", "prefill_worker", "decode_worker",
                       "pdserve", "benchmarks")),
    # the router must import without torch: protos, the replica contract, the cost model (slo_aware dispatch),
    # detok and torch-free libraries
    "router torch-free": Rule(
        ("router/",), ("torch", "engine", "kv_transfer", "prefill_worker", "decode_worker", "benchmarks", "replica",
                       "planner"),
        allowed=("replica.contract", "planner.cost")),
    # kv_transfer moves KV under the roles: engine's KV types and the contract's Reservation and
    # errors, never the roles, the actor shell or the serving face
    "kv_transfer below the roles": Rule(
        ("kv_transfer/",), ("prefill_worker", "decode_worker", "router", "pdserve", "benchmarks", "replica"),
        allowed=("replica.contract",)),
    # the actor shell and the ranks serve both roles: they know neither role nor the router
    "replica below the roles": Rule(("replica/",), ("prefill_worker", "decode_worker", "router", "pdserve")),
    # a worker package holds its role's actor: it builds on replica, engine and kv_transfer only
    "prefill worker holds one role": Rule(("prefill_worker/",), ("router", "pdserve", "benchmarks", "decode_worker")),
    "decode worker holds one role": Rule(("decode_worker/",), ("router", "pdserve", "benchmarks", "prefill_worker")),
    # the wire contract and its generated modules stand alone: everything else builds on them
    "protos import nothing of ours": Rule(("protos/",), PACKAGES, allowed=("protos",)),
    # the router<->replica contract is unpickled in the router's process: none of ours, no torch
    "replica contract stands alone": Rule(("replica/contract.py",), (*PACKAGES, "torch")),
    # the prefix cache's block keys, which the router computes as the engine does: a leaf, the standard library only
    "blockkeys stands alone": Rule(("blockkeys/",), (ANY,), allowed=(STDLIB,)),
    # the router's detokenizer, a leaf for the same reason: none of ours, no torch
    "detok stands alone": Rule(("detok/",), (*PACKAGES, "torch"), allowed=("detok",)),
    # the step model the router's dispatch will read: the standard library only, like the router's other leaves
    "the cost model stands alone": Rule(("planner/cost.py",), (ANY,), allowed=(STDLIB,)),
    # the planner runs the real scheduler, block manager and placement policies on a simulated clock: it sits
    # above them, and nothing below the public face depends on it
    "nothing below the face imports the planner": Rule(
        ("engine/", "kv_transfer/", "replica/", "prefill_worker/", "decode_worker/", "protos/", "detok/",
         "blockkeys/"), ("planner",)),
    # benchmarks measure the runtime; nothing a deployment runs may depend on them
    "nothing imports benchmarks": Rule(RUNTIME, ("benchmarks",)),
    # the client SDK works with only grpcio and protobuf installed: as `import pdserve` loads, only the
    # standard library, grpc, protobuf, protos and pdserve itself (the serving side loads lazily, in functions)
    "SDK needs only grpcio and protobuf": Rule(
        ("pdserve/__init__.py", "pdserve/client.py"), (ANY,),
        allowed=(STDLIB, "grpc", "google.protobuf", "protos", "pdserve"), module_level_only=True),
}


@cache
def _project_imports() -> tuple[Import, ...]:
    return tuple(read_imports(ROOT, PACKAGES))


def test_imports_go_the_directions_the_design_gives() -> None:
    violations = check(_project_imports(), RULES)
    if violations:
        pytest.fail(f"{len(violations)} imports go against DESIGN.md's package table:\n"
                    + "\n".join(map(str, violations)), pytrace=False)


# module level: a cycle there fails or half-initializes a module depending on which is imported
# first. All imports: a lazy import inside a function only hides a cycle (backend.py <-> the attention
# backends and llama.py <-> native_decoder.py were such), so none is allowed either.
@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level imports", "all imports"])
def test_no_import_cycles_among_the_projects_modules(module_level_only: bool) -> None:
    found = cycles(_project_imports(), module_level_only)
    if found:
        pytest.fail(f"{len(found)} import cycles:\n" + "\n\n".join(map(_cycle, found)), pytrace=False)


def _cycle(edges: list[Import]) -> str:
    modules = sorted({i.importer for i in edges})
    return f"{' <-> '.join(modules)}:\n" + "\n".join(f"  {i.path}:{i.line}: {i.importer} -> {i.target}" for i in edges)


# rule name -> a file that breaks it: (path, source). Each is written in a different form of import,
# so the test also shows that every form is read.
EXAMPLES: dict[str, tuple[str, str]] = {
    "engine below serving": ("engine/runner.py", "def launch():\n    import ray.util\n"),  # inside a function
    "router torch-free": ("router/policy.py", "from replica import ranks\n"),  # replica, not its contract
    "kv_transfer below the roles": ("kv_transfer/sender.py",
                                    "import importlib\nW = importlib.import_module('prefill_worker.worker')\n"),
    "replica below the roles": ("replica/actor.py", "from router.placement import Replica\n"),
    "prefill worker holds one role": ("prefill_worker/worker.py", "from router import placement\n"),
    "decode worker holds one role": ("decode_worker/worker.py", "def peer():\n    import prefill_worker\n"),
    "protos import nothing of ours": ("protos/v1/extra.py", "class Stub:\n    def f(self):\n"
                                                            "        return __import__('engine.config')\n"),
    "replica contract stands alone": ("replica/contract.py", "from . import ranks\n"),  # relative
    "blockkeys stands alone": ("blockkeys/__init__.py", "def f():\n    from engine.sequence import Sequence\n"),
    "detok stands alone": ("detok/stream.py", "from typing import TYPE_CHECKING\n"
                                              "if TYPE_CHECKING:\n    import torch\n"),  # types only still counts
    "nothing imports benchmarks": ("pdserve/cli.py", "def bench():\n    from benchmarks import serving\n"),
    "the cost model stands alone": ("planner/cost.py", "from planner.simulate import Service\n"),
    "nothing below the face imports the planner": ("engine/scheduler.py", "from planner import cost\n"),
    "SDK needs only grpcio and protobuf": ("pdserve/client.py", "import grpc\nimport numpy as np\n"),
}

# files that break no rule: the exceptions and the lazy imports the rules leave open
ALLOWED: dict[str, str] = {
    "replica/contract.py": "from dataclasses import dataclass\n",  # read: `from replica import contract` names it
    "router/replicas.py": "from replica import contract\nfrom replica.contract import Reservation\n"
                          "from protos.pdserve.v1 import pdserve_pb2\nimport grpc\n",
    "engine/model.py": "import torch\nfrom engine.layers import linear\n",
    "kv_transfer/roles.py": "from engine.kv_connector import KVSaver\nfrom replica.contract import Reservation\n",
    "protos/pdserve/v1/pdserve_pb2_grpc.py": "import grpc\nfrom protos.pdserve.v1 import pdserve_pb2\n",
    "pdserve/__init__.py": "from pdserve.client import Client\nfrom typing import TYPE_CHECKING\n"
                           "if TYPE_CHECKING:\n    import typing_extensions\n"
                           "def __getattr__(name):\n    import importlib\n"
                           "    return importlib.import_module('engine')\n",  # lazy: the serving side
    "benchmarks/serving.py": "import engine\nimport router.router\nimport ray\n",
    "planner/simulate.py": "from engine.scheduler import Scheduler\nfrom router.placement import Replica\n"
                           "from planner.cost import Profile\n",
    "planner/cost.py": "import json\nfrom bisect import bisect_right\n",
    "router/dispatch.py": "from planner.cost import StepModel\n",
}


def _tree(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    for rel, source in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(source)
    return read_imports(tmp_path, PACKAGES)


def test_every_rule_has_an_example() -> None:
    assert set(EXAMPLES) == set(RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_catches_what_it_forbids(tmp_path: Path, rule: str) -> None:
    path, source = EXAMPLES[rule]
    violations = check(_tree(tmp_path, {path: source}), RULES)
    assert any(v.imp.path == path and rule in v.rules for v in violations), (rule, [str(v) for v in violations])
    assert all(v.imp.path == path for v in violations)


def test_what_the_rules_allow_is_not_reported(tmp_path: Path) -> None:
    violations = check(_tree(tmp_path, ALLOWED), RULES)
    assert not violations, "\n".join(map(str, violations))


def test_imports_are_resolved_to_the_module_they_load(tmp_path: Path) -> None:
    imports = _tree(tmp_path, {
        "engine/__init__.py": "",
        "engine/attention/__init__.py": "from . import backend, flash\n",
        "engine/attention/backend.py": "",
        "engine/attention/flash.py": "from .backend import register_backend\nfrom .. import attention\n"
                                     "def f():\n    from torch import nn\n",
    })
    got = {(i.importer, i.target, i.module_level) for i in imports}
    assert got == {("engine.attention", "engine.attention.backend", True),
                   ("engine.attention", "engine.attention.flash", True),
                   ("engine.attention.flash", "engine.attention.backend", True),
                   ("engine.attention.flash", "engine.attention", True),
                   ("engine.attention.flash", "torch", False)}


def test_a_cycle_of_module_level_imports_is_found(tmp_path: Path) -> None:
    imports = _tree(tmp_path, {
        "engine/a.py": "from engine import b\n",
        "engine/b.py": "import engine.c\n",
        "engine/c.py": "from engine.a import X\n",  # a -> b -> c -> a
        "engine/d.py": "import engine.a\n",  # into the cycle, not part of it
        "engine/e.py": "def f():\n    import engine.f\n",  # e <-> f, but e's import waits for a call
        "engine/f.py": "import engine.e\n",
    })
    found = cycles(imports)
    assert [sorted({i.importer for i in c}) for c in found] == [["engine.a", "engine.b", "engine.c"]]
    assert "engine/c.py:1: engine.c -> engine.a" in _cycle(found[0])
    found = cycles(imports, module_level_only=False)
    assert [sorted({i.importer for i in c}) for c in found] == [["engine.a", "engine.b", "engine.c"],
                                                                ["engine.e", "engine.f"]]
