"""The package graph follows the data flow: every import, lazy ones inside functions included, points down.

scheduling <- world <- sim, executor <- reports <- calibration <- cli (DESIGN.md): ``scheduling`` imports nothing
of pipesim outside itself, ``sim`` and ``executor`` never import each other, and no cycle exists between the
top-level parts of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipesim"

# A part may import only parts of a lower layer (never its own layer's other parts).
LAYERS: dict[str, int] = {
    "scheduling": 0,
    "strict": 0, "yamlio": 0, "cli_args": 0,
    "units": 1, "placement": 1, "executor_config": 1, "trace": 1, "hardware": 1,
    "models": 2, "metrics": 2, "acceptance_fit": 2,
    "scenario": 3,
    "world": 4, "describe": 4, "limits": 4,
    "sim": 5, "executor": 5,
    "reports": 6, "plan": 6,
    "calibration": 7,
    "cli": 8,
}


def _part(module: str) -> str:
    """The top-level part of ``pipesim.a.b`` (``a``)."""
    return module.split(".")[1]


def imports_of_the_package() -> list[tuple[str, str, str]]:
    """(importing part, imported part, file:line) for every import of pipesim inside pipesim, lazy ones too."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rsplit(".", 1)[0]
        if module == "pipesim":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    targets = [".".join([*base, node.module])] if node.module else [
                        ".".join([*base, alias.name]) for alias in node.names]
                else:
                    targets = [node.module or ""]
            else:
                continue
            for target in targets:
                if target.startswith("pipesim.") and _part(target) != _part(module):
                    found.append((_part(module), _part(target), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"))
    return found


IMPORTS = imports_of_the_package()


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts - set(LAYERS) == set(), "give the new part a layer in LAYERS"


@pytest.mark.parametrize("source,target,where", IMPORTS, ids=[f"{s}->{t}@{w}" for s, t, w in IMPORTS])
def test_imports_point_down(source, target, where):
    assert LAYERS[target] < LAYERS[source], f"{where}: {source} (layer {LAYERS[source]}) imports {target} " \
                                             f"(layer {LAYERS[target]})"


def test_the_graph_walker_sees_lazy_and_relative_imports():
    edges = {(s, t) for s, t, _ in IMPORTS}
    assert ("sim", "world") in edges and ("executor", "scheduling") in edges  # module-level, relative
    lazy = [w for s, t, w in IMPORTS if (s, t) == ("calibration", "world") and w.startswith("pipesim/calibration/probe")]
    assert lazy  # the probe builds the world inside its functions
    assert not any(s == "scheduling" for s, _t in edges)
    assert not ({("sim", "executor"), ("executor", "sim")} & edges)
