"""The package's shape: every module imports on its own, no import cycle, evaluation never imports
the bake, and no module reaches for another module's private names."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "promptbake"


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":  # runs the CLI when imported: `python -m promptbake`
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports_of(path: Path, *, top_level_only: bool) -> set[str]:
    """promptbake modules that `path` imports (resolving relative imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("promptbake"):
                found.add(target)
                for alias in node.names:  # `from . import x` / `from .eval import run` may name submodules
                    if f"{target}.{alias.name}" in set(modules()):
                        found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("promptbake")}
    return found


def test_every_module_imports_alone_and_in_both_orders():
    # One interpreter, with promptbake's modules dropped before each import (torch and the other
    # libraries stay loaded, so this is fast): a cycle shows as an ImportError on a partial module.
    pairs = [("promptbake.bake", "promptbake.eval"), ("promptbake.eval", "promptbake.bake"),
             ("promptbake.setup", "promptbake.eval.run"), ("promptbake.eval.run", "promptbake.setup"),
             ("promptbake.finish", "promptbake.eval"), ("promptbake.eval", "promptbake.finish")]
    code = f"""
import importlib, sys
def fresh():
    for name in [m for m in sys.modules if m == 'promptbake' or m.startswith('promptbake.')]:
        del sys.modules[name]
for name in {modules()!r}:
    fresh(); importlib.import_module(name)
for first, second in {pairs!r}:
    fresh(); importlib.import_module(first); importlib.import_module(second)
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_no_cycle_among_top_level_imports():
    graph = {m: set() for m in modules()}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        # A package's own __init__ is imported with any of its submodules: not an edge of the cycle check.
        graph[name] = {t for t in imports_of(path, top_level_only=True) if t in graph and t != name
                       and not name.startswith(t + ".")}

    def visit(node, trail):
        if node in trail:
            raise AssertionError(" -> ".join(trail[trail.index(node):] + [node]))
        for nxt in graph[node]:
            visit(nxt, trail + [node])

    for m in graph:
        visit(m, [])


def test_evaluation_never_imports_the_bake():
    for path in (PACKAGE / "eval").rglob("*.py"):
        imported = imports_of(path, top_level_only=False)
        assert not imported & {"promptbake.bake", "promptbake.train", "promptbake.finish", "promptbake.methods"}, path


def test_no_private_names_imported_across_modules():
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("promptbake")):
                offenders += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert offenders == []


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py"))
               if f"`{p.relative_to(ROOT)}`" not in readme]
    assert missing == []
