"""The package's shape: stage subpackages in layers that import downwards only, with no import cycle."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kpnb"
# lowest first; a module may import its own layer's modules and lower layers, never a higher one
LAYERS = ["core", "poses", "synth", "models", "data", "diffusion", "evaluate", "train", "tuning", "original", "run",
          "cli", "__main__"]


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every kpnb module ``path`` imports, at module level or inside functions."""
    out = set()
    me = _module(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "kpnb" or mod.startswith("kpnb."):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names if (PKG.parent / f"{mod}.{a.name}".replace(".", "/")).exists())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("kpnb"))
    return out - {me}


MODULES = {_module(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: {i for i in _imports(p) if i in MODULES} for m, p in MODULES.items()}


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]) if n in path else n)
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_layers_import_downwards_only():
    upward = [f"{m} imports {n}" for m, deps in GRAPH.items() for n in deps
              if m != "kpnb" and n != "kpnb" and _layer(n) > _layer(m)]
    assert not upward, upward


def test_every_module_sits_in_a_layer():
    roots = sorted(p.name for p in PKG.glob("*.py"))
    assert roots == ["__init__.py", "__main__.py", "cli.py"]
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} <= set(LAYERS)
