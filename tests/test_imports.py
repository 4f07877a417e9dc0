"""How plait's modules import each other: ``import plait`` stays light, and no module
imports itself back through others (no import cycles)."""

import ast
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Libraries that cost seconds or pull in servers; none loads before it is needed.
HEAVY = (
    "torch",
    "triton",
    "transformers",
    "llguidance",
    "outlines_core",
    "fastapi",
    "uvicorn",
    "numpy",
    "PIL",
)
# plait's own modules that only some commands need.
LAZY_PLAIT = ("plait.runtime.server", "plait.bench")


def loaded_after(code: str) -> list[str]:
    """The modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def heavy_in(modules: list[str], plait_too: bool = True) -> list[str]:
    prefixes = HEAVY + (LAZY_PLAIT if plait_too else ())
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_import_plait_is_light():
    modules = loaded_after("import plait")
    assert "plait" in modules and "plait.runtime" in modules
    assert heavy_in(modules) == []


def test_cli_parser_imports_no_torch():
    modules = loaded_after("from plait.runtime.cli import build_parser\nbuild_parser()")
    assert "plait.runtime.cli" in modules
    assert heavy_in(modules, plait_too=False) == []


# ---- import cycles ------------------------------------------------------------------------

# Source folder -> package name, as pyproject's package-dir maps them; subfolders are
# subpackages (lang/lang/ is plait.lang).
PACKAGES = {
    "lang": "plait",
    "runtime": "plait.runtime",
    "radix": "plait.radix",
    "kernels": "plait.kernels",
    "multimodal": "plait.multimodal",
    "bench": "plait.bench",
}


def plait_sources() -> dict[str, tuple[str, bool]]:
    """Every plait module: name -> (source text, whether it is a package)."""
    found = {}
    for folder, package in PACKAGES.items():
        base = ROOT / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join([package, *parts])] = (path.read_text(), is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when the module loads: not those inside functions
    (they run on first call) nor under ``if TYPE_CHECKING:``."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.Try):
                visit(node.body + [s for h in node.handlers for s in h.body])
                visit(node.orelse + node.finalbody)
            elif isinstance(node, (ast.With, ast.ClassDef, ast.For, ast.While)):
                visit(node.body)  # these bodies run at import time

    visit(tree.body)
    return out


def import_graph(sources: dict[str, tuple[str, bool]], lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the modules among ``sources`` it imports at load time (with ``lazy``,
    also those its functions import). An import of ``a.b.c`` counts as one of ``a.b.c``
    (not of the packages above it, which are already loading when one of their modules
    imports a sibling)."""
    graph: dict[str, set[str]] = {}
    for name, (source, is_package) in sources.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(source, name)
        if lazy:
            imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        else:
            imports = module_level_imports(tree)
        for node in imports:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import f`, mod.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in sources else base)
        edges = set()
        for target in targets:
            while target and target not in sources:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``a -> b -> ... -> a``) through each group of modules that import
    each other, found by depth-first search."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_import_graph_follows_python_import_rules():
    sources = {
        "p": ("from p import a\nfrom p.b import f\n", True),
        "p.a": ("import p.b\nfrom . import c\nfrom .q import g\n", False),
        "p.b": ("import json\n\ndef f():\n    from p import a\n", False),
        "p.c": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\n",
            False,
        ),
        "p.q": (
            "from .. import a\ntry:\n    from p.c import x\nexcept ImportError:\n    pass\n",
            True,
        ),
    }
    assert import_graph(sources) == {
        "p": {"p.a", "p.b"},  # a package's __init__ importing its submodules
        "p.a": {"p.b", "p.c", "p.q"},
        "p.b": set(),  # imports inside functions wait for the call
        "p.c": set(),  # imports for type checkers never run
        "p.q": {"p.a", "p.c"},
    }
    assert import_graph(sources, lazy=True)["p.b"] == {"p.a"}


def test_import_graph_covers_the_package():
    graph = import_graph(plait_sources())
    assert {"plait", "plait.lang.ir", "plait.runtime.engine", "plait.radix"} <= graph.keys()
    assert "plait.api" in graph["plait.lang.api"]


def test_find_cycles_reports_the_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph(plait_sources()))
    shown = "\n".join(" -> ".join(c) for c in cycles)
    assert not cycles, textwrap.indent(f"import cycles:\n{shown}", "  ")


def test_kernels_do_not_import_the_runtime():
    """The runtime builds on the kernels, never the reverse (not even inside a function)."""
    graph = import_graph(plait_sources(), lazy=True)
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("plait.kernels")
        for target in targets
        if target.startswith("plait.runtime")
    )
    assert upward == []
