"""The package's layout is its architecture: these tests read every module's
imports and hold the layers to it (see ARCHITECTURE.md).

- each layer imports only the layers below it;
- no module imports a private (``_name``) name from another module;
- there are no import circles, lazy imports inside functions included;
- lmcache is imported only by its integration (and the benchmark that
  drives LMCache's own backend), vllm and sglang only by their
  integrations and the testing modules that drive them, torch.cuda only by
  the CUDA transfer path.
"""

import ast
import pathlib

import slabcache

ROOT = pathlib.Path(slabcache.__file__).parent

# layer -> layers it may import
ALLOWED = {
    "errors": set(),
    "format": {"errors"},
    "device": {"errors", "format"},
    "index": {"errors", "format"},
    "runtime": {"errors"},
    "core": {"errors", "format", "device", "index", "runtime"},
    "admin": {"errors", "format", "device", "index", "core"},
    "bench": {"errors", "format", "device", "core", "admin"},
    "testing": {"errors", "format", "device", "index", "core", "admin"},
    "integrations": {"errors", "format", "runtime", "core"},
    "cli": {"errors", "format", "admin", "bench", "core"},
    "__init__": {"errors", "format", "core"},
    "__main__": {"cli"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str):
    """(imported module, names taken from it, line) for every import in ``mod``."""
    tree = ast.parse(MODULES[mod].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            names = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # `from . import owner`: a module, not a name
                    yield sub, [], node.lineno
                else:
                    names.append(a.name)
            if names:
                yield target, names, node.lineno


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _internal(target: str) -> str | None:
    """The slabcache module ``target`` names (the package itself for a name in it)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_every_module_is_in_a_layer():
    assert {_layer(m) for m in MODULES} <= set(ALLOWED), "add new folders to ALLOWED and ARCHITECTURE.md"


def test_layers_import_only_what_is_below_them():
    bad = []
    for mod in MODULES:
        for target, _names, line in _imports(mod):
            if not target.startswith("slabcache"):
                continue
            dep = _layer(_internal(target))
            if dep != _layer(mod) and dep not in ALLOWED[_layer(mod)]:
                bad.append(f"{mod}:{line} imports {target} ({_layer(mod)} -> {dep})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod in MODULES:
        for target, names, line in _imports(mod):
            if target.startswith("slabcache") and _internal(target) != mod:
                bad += [f"{mod}:{line} imports {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = {m: set() for m in MODULES}
    for mod in MODULES:
        for target, _names, _line in _imports(mod):
            dep = _internal(target) if target.startswith("slabcache") else None
            if dep and dep != mod and not mod.startswith(dep + "."):
                graph[mod].add(dep)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_heavy_or_optional_imports_stay_in_their_rooms():
    where = {"lmcache": ("slabcache.integrations.lmcache", "slabcache.bench.contenders"),
             "vllm": ("slabcache.integrations.vllm", "slabcache.testing.vllm_"),
             "sglang": ("slabcache.integrations.sglang", "slabcache.testing.sglang_"),
             "torch.cuda": ("slabcache.runtime.transfer",)}
    bad = []
    for mod in MODULES:
        for target, _names, line in _imports(mod):
            for lib, rooms in where.items():
                if (target == lib or target.startswith(lib + ".")) and not mod.startswith(rooms):
                    bad.append(f"{mod}:{line} imports {target}")
    assert not bad, "\n".join(bad)
