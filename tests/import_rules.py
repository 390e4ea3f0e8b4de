"""Reads every import of the project's packages with `ast` (nothing is imported or run) and checks
them against a table of forbidden directions, and for cycles. tests/test_import_directions.py holds
the table (DESIGN.md's "who may import whom") and the tests; this is only the reading and checking.

An import counts wherever it is written: at module level, inside a function or method, under
`if TYPE_CHECKING:`, relative (resolved against the importing module's package), and a call to
`importlib.import_module("...")` / `__import__("...")` whose module name is a string literal.
Each one notes whether it runs when its module loads (`module_level`): not inside a function and
not under `if TYPE_CHECKING:`. Cycles and the module-level rules count only those."""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ANY = "*"  # a target pattern that every module matches
STDLIB = "<stdlib>"  # a target pattern that the standard library's modules match


@dataclass(frozen=True)
class Import:
    """One import statement (or literal import call), as written in one file."""
    path: str  # the importing file, relative to the root, with / separators
    line: int
    importer: str  # the importing module's dotted name
    target: str  # the imported module's absolute dotted name (a project submodule where `from x import y` names one)
    module_level: bool  # runs as the importer loads: not in a function, not under `if TYPE_CHECKING:`


@dataclass(frozen=True)
class Rule:
    """A direction the design forbids: importers -> targets, less the allowed ones."""
    importers: tuple[str, ...]  # files it applies to: "engine/" (a folder, everything under it) or "pdserve/client.py"
    forbidden: tuple[str, ...]  # module prefixes ("replica" matches replica and replica.*), ANY, or STDLIB
    allowed: tuple[str, ...] = ()  # exceptions to `forbidden`, the same patterns
    module_level_only: bool = False  # True: only imports that run as the importer loads count


@dataclass
class Violation:
    """An import that goes against the table."""
    imp: Import
    rules: list[str] = field(default_factory=list)  # names of every rule the edge breaks

    def __str__(self) -> str:
        i = self.imp
        return f"{i.path}:{i.line}: {i.importer} -> {i.target} ({'; '.join(self.rules)})"


def module_name(rel: Path) -> str:
    """engine/attention/backend.py -> engine.attention.backend; engine/attention/__init__.py -> engine.attention."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(root: Path, packages: Iterable[str]) -> Iterator[Path]:
    """Every .py file of the packages that exist under root, sorted, caches skipped."""
    for package in packages:
        folder = root / package
        if folder.is_dir():
            yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def read_imports(root: Path, packages: Iterable[str]) -> list[Import]:
    """Every import of every .py file of the packages (those missing under root are skipped)."""
    files = list(python_files(root, packages))
    modules = {module_name(p.relative_to(root)) for p in files}
    imports: list[Import] = []
    for path in files:
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
        imports.extend(_Reader(rel.as_posix(), module_name(rel), rel.name == "__init__.py", modules).read(tree))
    return imports


class _Reader(ast.NodeVisitor):
    def __init__(self, path: str, module: str, is_package: bool, modules: set[str]) -> None:
        self.path, self.module, self.modules = path, module, modules
        # the package a relative import starts from: a package's own name, a module's parent
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0  # > 0: inside a function (runs later, if ever)
        self.type_checking = 0  # > 0: under `if TYPE_CHECKING:` (never runs)
        self.found: list[Import] = []

    def read(self, tree: ast.AST) -> list[Import]:
        self.visit(tree)
        return self.found

    def _add(self, node: ast.AST, target: str) -> None:
        self.found.append(Import(self.path, node.lineno, self.module, target,
                                 self.depth == 0 and self.type_checking == 0))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for decorator in getattr(node, "decorator_list", []):  # these and the defaults run where the def is
            self.visit(decorator)
        self.visit(node.args)
        self.depth += 1  # the body runs when called, if ever
        for part in node.body if isinstance(node.body, list) else [node.body]:
            self.visit(part)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:  # `else:` of TYPE_CHECKING runs
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve(node.module or "", node.level)
        if base is None:
            return
        targets = []
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            # `from engine.attention import paged_cpu` imports the submodule; `from torch import nn` stays torch
            targets.append(sub if sub in self.modules else base)
        for target in dict.fromkeys(targets):  # `from x import a, b` is one import of x
            self._add(node, target)

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args and _literal(node.args[0]) is not None:
            target = _literal(node.args[0])
            if target.startswith("."):  # import_module(".x", package="pkg")
                package = next((_literal(k.value) for k in node.keywords if k.arg == "package"), None)
                if package is None and len(node.args) > 1:
                    package = _literal(node.args[1])
                level = len(target) - len(target.lstrip("."))
                target = _up(package, level, target.lstrip(".")) if package else None
            if target:
                self._add(node, target)
        self.generic_visit(node)

    def _resolve(self, module: str, level: int) -> str | None:
        if level == 0:
            return module
        return _up(self.package, level, module)


def _up(package: str, level: int, module: str) -> str | None:
    """The absolute name of a relative import: `level` dots from inside `package`."""
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None  # beyond the top: Python refuses it too
    base = parts[:len(parts) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _matches(module: str, pattern: str) -> bool:
    if pattern == ANY:
        return True
    if pattern == STDLIB:
        return module.partition(".")[0] in sys.stdlib_module_names or module == "__future__"
    return module == pattern or module.startswith(pattern + ".")


def _applies(path: str, importer_pattern: str) -> bool:
    return path.startswith(importer_pattern) if importer_pattern.endswith("/") else path == importer_pattern


def broken_rules(imp: Import, rules: dict[str, Rule]) -> list[str]:
    """The names of the rules this one import breaks (empty: it is allowed)."""
    return [name for name, rule in rules.items()
            if any(_applies(imp.path, p) for p in rule.importers)
            and (imp.module_level or not rule.module_level_only)
            and any(_matches(imp.target, p) for p in rule.forbidden)
            and not any(_matches(imp.target, p) for p in rule.allowed)]


def check(imports: Iterable[Import], rules: dict[str, Rule]) -> list[Violation]:
    """Every import that breaks a rule, with all the rules it breaks."""
    return [Violation(imp, names) for imp in imports if (names := broken_rules(imp, rules))]


def cycles(imports: Iterable[Import], module_level_only: bool = True) -> list[list[Import]]:
    """Import cycles among the project's modules: for each strongly connected component of more
    than one module in the graph of imports (module-level ones only, or all), the imports that
    stay inside it."""
    imports = [i for i in imports if i.module_level or not module_level_only]
    modules = {i.importer for i in imports}  # a module that imports nothing is in no cycle
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if i.target in modules and i.target != i.importer:
            graph[i.importer].add(i.target)
    found = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            found.append(sorted((i for i in imports if i.importer in component and i.target in component
                                 and i.target != i.importer), key=lambda i: (i.path, i.line)))
    return sorted(found, key=lambda c: (c[0].path, c[0].line))


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on a long chain of imports)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components
