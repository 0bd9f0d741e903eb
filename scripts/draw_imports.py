"""Draw espo's imports by layer and check them: no circles, no private names across modules, arrows only go down.

    python scripts/draw_imports.py           # print the drawing and the check's findings (exit 1 on a finding)
    python scripts/draw_imports.py --write   # rewrite docs/imports.md, the committed drawing

Every import counts: at module level, inside functions and under ``if TYPE_CHECKING``. The Triton kernels
(the checkout's ``kernels/`` folder) are read as ``espo.kernels``, as the wheel installs them.
``tests/test_imports.py`` runs the same checks and holds docs/imports.md to what this script draws.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRAWING = ROOT / "docs" / "imports.md"
USERS = ("bench", "studies", "examples", "scripts")  # folders of code that uses the package: no private names either

# Lowest first. A module may import from its own layer and the layers before it, never from a later one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("espo.checks", "espo.threads", "espo.stats", "espo.version")),
    ("ops", ("espo.ops", "espo.kernels")),
    ("engine", ("espo.engine",)),
    ("tasks", ("espo.tasks",)),
    ("rl", ("espo.rl",)),
    ("integrations", ("espo.integrations",)),
    ("app", ("espo.app", "espo.__main__")),
    ("public API", ("espo",)),  # espo/__init__.py: the names `import espo` gives
]


def module_files() -> dict[str, Path]:
    """Module name -> file, for espo/ and kernels/ (as espo.kernels)."""
    found = {}
    for base, prefix in ((ROOT / "espo", "espo"), (ROOT / "kernels", "espo.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path, modules: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of an espo module in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "espo"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "espo":
                continue
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # `from espo.ops import philox`: an import of the module espo.ops.philox
                    out.append((sub, [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                out.append((target, names, node.lineno))
    return out


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "espo"):
            return i
    return len(LAYERS) - 1  # espo itself


def graph() -> dict[str, dict[str, list[int]]]:
    """module -> {imported module: [lines]} over espo's own modules (a module importing itself is left out)."""
    files = module_files()
    edges: dict[str, dict[str, list[int]]] = {m: defaultdict(list) for m in files}
    for module, path in files.items():
        for target, _, line in imports_of(module, path, set(files)):
            while target not in files and "." in target:
                target = target.rpartition(".")[0]
            if target != module:
                edges[module][target].append(line)
    return edges


def circles(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def findings() -> list[str]:
    """Every circle, private name imported across modules, and upward arrow, one line each."""
    files = module_files()
    edges = graph()
    out = [f"import circle: {' <-> '.join(c)}" for c in circles(edges)]
    users = [(folder, path) for folder in USERS for path in sorted((ROOT / folder).rglob("*.py"))]
    for module, path in [*files.items(), *users]:  # the code beside the package uses its public names too
        for target, names, line in imports_of(module, path, set(files)):
            private = [n for n in [*names, target.split(".")[-1]] if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                out.append(f"{path.relative_to(ROOT)}:{line}: imports the private {', '.join(private)} of {target}")
    for module, targets in edges.items():
        for target, lines in targets.items():
            if layer_of(target) > layer_of(module):
                out.append(f"{files[module].relative_to(ROOT)}:{lines[0]}: {module} ({LAYERS[layer_of(module)][0]}) "
                           f"imports {target} ({LAYERS[layer_of(target)][0]}), a layer above it")
    return out


def drawing() -> str:
    """docs/imports.md: the layers, lowest first, and what each module imports from the package."""
    edges = graph()
    lines = ["# espo's imports", "",
             "Written by `python scripts/draw_imports.py --write`; `tests/test_imports.py` fails when it is stale,",
             "when two modules import each other (directly or round a circle), when a module imports another's",
             "private name, or when an arrow goes up a layer. Every import counts: at module level, in a function",
             "or for type checking alike.", "", "Which layers each layer imports (highest first):", "", "```"]
    width = max(len(name) for name, _ in LAYERS)
    for i in reversed(range(len(LAYERS))):
        below = sorted({layer_of(t) for m in edges if layer_of(m) == i for t in edges[m]} - {i}, reverse=True)
        lines.append(f"{LAYERS[i][0]:<{width}}  -> " + (", ".join(LAYERS[j][0] for j in below) or "-"))
    lines += ["```", "", "Each module and the package modules it imports, lowest layer first:", ""]
    for i, (name, prefixes) in enumerate(LAYERS):
        lines += [f"## {i}. {name} ({', '.join(prefixes)})", ""]
        for module in sorted(m for m in edges if layer_of(m) == i):
            targets = sorted(edges[module])
            lines.append(f"- `{module}` <- " + (", ".join(f"`{t}`" for t in targets) if targets else "nothing"))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/imports.md")
    args = parser.parse_args()
    text = drawing()
    if args.write:
        DRAWING.parent.mkdir(exist_ok=True)
        DRAWING.write_text(text)
    else:
        print(text)
    problems = findings()
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
