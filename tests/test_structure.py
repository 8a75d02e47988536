"""The library's import graph flows one way (read statically from the source, function-level imports included).

Parts: the top-level modules (``contracts``, ``errors``, ``files``, ``activations``, ``config``, ``nn``, ``cli``)
and the subpackages (``formats``, ``schemes``, ``checkpoint``, ``moe``, ``kernels``, ``models``). No two parts
import each other, directly or through others, and the compute core (``formats``, ``moe``, ``kernels``,
``activations``) never reaches the config parser, the schemes, checkpoint I/O, the modules or the CLI: it
reads only ``contracts`` (and ``errors``).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("formats", "moe", "kernels", "activations")
ABOVE_CORE = ("config", "files", "schemes", "checkpoint", "nn", "cli", "models")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in [*(ROOT / "quarkmoe_jax").rglob("*.py"), *(ROOT / "quarkmoe_jax" / "kernels").glob("*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _part(module: str) -> str:
    pieces = module.split(".")
    return "quarkmoe_jax" if len(pieces) == 1 else pieces[1]


def part_graph() -> dict[str, set[str]]:
    """``{part: parts it imports}`` over every import statement of the library (absolute imports)."""
    modules = _modules()
    graph: dict[str, set[str]] = {_part(m): set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target in modules and _part(target) not in (_part(module), "quarkmoe_jax"):
                    graph[_part(module)].add(_part(target))
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycle_between_parts():
    graph = part_graph()
    cycles = sorted(p for p in graph if p in reachable(graph, p))
    assert not cycles, {p: sorted(graph[p]) for p in cycles}


def test_the_compute_core_reaches_no_checkpoint_io_module_or_cli():
    graph = part_graph()
    for part in CORE:
        assert not reachable(graph, part) & set(ABOVE_CORE), (part, sorted(reachable(graph, part)))


def test_the_graph_reader_sees_the_known_edges():
    """The test above cannot pass by reading nothing: edges that must exist are found."""
    graph = part_graph()
    assert {"checkpoint", "moe", "contracts"} <= graph["nn"]
    assert "kernels" in graph["moe"] and "formats" in graph["kernels"]
    assert "moe" in graph["checkpoint"]  # the per-shard loader lays parameters out as the sharded op says
    assert "quarkmoe_jax.kernels.grouped_gemm" in _modules()
