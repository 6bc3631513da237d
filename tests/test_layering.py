"""Dependencies run one way. Read from the source's import statements, so an upward import, a
cycle or a project import hidden inside a function fails here, not in a reviewer's head:

    core                      clbench, errors, config, files, record, task, metrics, backbones,
                              options, catalog (torch-free facts and checks), paper (the paper's numbers),
                              stopping (signals as a stop state)
    methods, benchmarks       clbench.methods, clbench.benchmarks (neither imports the other)
    engine                    loading, loggers, recipes, measure, protocol, plan, jobs, preflight, speed,
                              gpu_path, probe, gpu_check
    top                       clbench.slurm, clbench.report, status, sweep, cli, __main__

And ``report`` (and the command line's start-up) never imports torch.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where each package's source lives (pyproject.toml's package-dir).
PACKAGE_DIRS = {"clbench": ROOT / "clbench", "clbench.methods": ROOT / "methods",
                "clbench.benchmarks": ROOT / "benchmarks", "clbench.slurm": ROOT / "slurm",
                "clbench.paper": ROOT / "results" / "paper"}
LAYERS = [
    ("core", ["clbench", "clbench.errors", "clbench.config", "clbench.files", "clbench.record", "clbench.task",
              "clbench.metrics", "clbench.backbones", "clbench.options", "clbench.catalog", "clbench.paper",
              "clbench.stopping"]),
    ("methods and benchmarks", ["clbench.methods", "clbench.benchmarks"]),
    ("the request, checked without torch", ["clbench.request"]),
    ("engine", ["clbench.loading", "clbench.loggers", "clbench.recipes", "clbench.measure", "clbench.protocol",
                "clbench.plan", "clbench.jobs", "clbench.preflight", "clbench.speed", "clbench.gpu_path",
                "clbench.probe", "clbench.gpu_check"]),
    ("top", ["clbench.slurm", "clbench.report", "clbench.status", "clbench.sweep", "clbench.cli", "clbench.__main__"]),
]
INDEPENDENT = [("clbench.methods", "clbench.benchmarks")]  # same layer, but neither imports the other


def modules() -> dict[str, Path]:
    """Every project module by its import name."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def owner(name: str) -> str:
    """The layer entry a module belongs to: the longest listed prefix of its name."""
    entries = [e for _, es in LAYERS for e in es]
    matches = [e for e in entries if name == e or name.startswith(e + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return max(matches, key=len)


def layer(name: str) -> int:
    entry = owner(name)
    return next(i for i, (_, entries) in enumerate(LAYERS) if entry in entries)


def imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """``(imported project module, line, at module level)`` for every project import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = set()
    for node in tree.body:  # module level, and inside `if TYPE_CHECKING:` / try blocks at module level
        top_level.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "clbench" or target.startswith("clbench."):
                while target not in MODULES and "." in target:
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno, id(node) in top_level))
    return found


GRAPH = {name: imports(path, name) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        owner(name)


def test_no_import_goes_up_a_layer_or_across_independent_packages():
    problems = []
    for name, found in GRAPH.items():
        for target, line, _ in found:
            if layer(target) > layer(name):
                problems.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {name} ({LAYERS[layer(name)][0]}) imports "
                                f"{target} ({LAYERS[layer(target)][0]})")
            for a, b in INDEPENDENT:
                if {owner(name), owner(target)} == {a, b}:
                    problems.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {name} imports {target}")
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_project_imports_sit_at_module_level():
    hidden = [f"{MODULES[name].relative_to(ROOT)}:{line}: imports {target} inside a function or class"
              for name, found in GRAPH.items() for target, line, top in found if not top]
    assert not hidden, "\n".join(hidden)


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target, _, _ in GRAPH.get(name, []):
            if target == name or (name.startswith(target + ".") and MODULES[target].name == "__init__.py"):
                continue  # a module of a package importing names its package re-exports
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target)
        path.pop()
        state[name] = 2

    for name in MODULES:
        if state.get(name) is None:
            visit(name)


@pytest.mark.parametrize("argv", [["--help"], ["report", "--out", "{tmp}"]])
def test_the_command_line_starts_and_reports_without_torch(tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path / "results")) for a in argv]
    code = ("import sys\nfrom clbench.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('no torch')")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no torch" in done.stdout, done.stderr[-2000:]


# ----------------------------------------------------------------------------- one home per fact

REGISTRY_HOMES = {"METHODS": "clbench.methods.base", "BENCHMARKS": "clbench.benchmarks.base"}


def registered_names() -> set[str]:
    from clbench.benchmarks import BENCHMARKS
    from clbench.request import builtin_method_names

    return set(builtin_method_names()) | set(BENCHMARKS)


def literal_names(node: ast.AST) -> set[str]:
    """The strings a literal collection names: a dict's keys, a list's, tuple's or set's items."""
    if isinstance(node, ast.Dict):
        items = node.keys
    elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = node.elts
    else:
        return set()
    return {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}


def test_methods_and_benchmarks_have_one_registry_and_no_second_list():
    """A method's or a benchmark's facts live on its registration: only its registry's module
    defines the registry, no other module defines a dict, list, tuple or set of method or benchmark
    names (a table keyed by them, or a list of two or more: a second home that a new method or
    benchmark would have to be added to)."""
    names = registered_names()
    problems = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id in REGISTRY_HOMES and REGISTRY_HOMES[target.id] != name:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: a second {target.id} registry")
            value = getattr(node, "value", None)
            listed = literal_names(value) & names if value is not None else set()
            if targets and len(listed) >= (1 if isinstance(value, ast.Dict) else 2):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: a list of methods or benchmarks "
                                f"({', '.join(sorted(listed))}): put the fact on their registrations")
    assert not problems, "\n".join(problems)
