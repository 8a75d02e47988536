"""The library's import graph flows one way (read statically from the source, function-level imports included).

Parts: the top-level modules (``contracts``, ``errors``, ``files``, ``activations``, ``quark_config``, ``nn``, ``cli``)
and the subpackages (``formats``, ``schemes``, ``checkpoint``, ``moe``, ``kernels``, ``models``, ``serving``). No
two parts import each other, directly or through others, and the compute core (``formats``, ``moe``, ``kernels``,
``activations``) never reaches the config parser, the schemes, checkpoint I/O, the modules or the CLI: it
reads only ``contracts`` (and ``errors``).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("formats", "moe", "kernels", "activations")
ABOVE_CORE = ("quark_config", "files", "schemes", "checkpoint", "nn", "cli", "models", "serving")


def _modules() -> dict[str, pathlib.Path]:
    """``{module name: file}`` of the library; ``kernels/`` is installed as ``quarkmoe_jax.kernels``."""
    found = {}
    for root, package in ((ROOT / "quarkmoe_jax", ("quarkmoe_jax",)), (ROOT / "kernels", ("quarkmoe_jax", "kernels"))):
        for path in root.rglob("*.py"):
            parts = package + path.relative_to(root).with_suffix("").parts
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
    assert "models" in graph["serving"] and "serving" in graph["cli"]  # the engine runs models; the CLI, the engine
    assert {"quarkmoe_jax.kernels.pallas.grouped_gemm", "quarkmoe_jax.kernels.triton.backend"} <= set(_modules())


BACKEND_NAMES = {"pallas", "triton", "emulation"}
LAYOUT_NAMES = {"chunk", "fragment"}
TILE_FAMILIES = {"pallas", "triton_mx"}
NAMES_ALLOWED_IN = {
    # a backend object names itself; the registry names the default orders through the objects
    "quarkmoe_jax.kernels.pallas.backend",
    "quarkmoe_jax.kernels.triton.backend",
    # the tile table's families (keys of kernels/tiles.json)
    "quarkmoe_jax.kernels.tiles",
    # the layouts' own modules register their names
    "quarkmoe_jax.formats.kernel_layout",
    "quarkmoe_jax.formats.fragment_layout",
    # the op adds the oracle to the kernel backends
    "quarkmoe_jax.moe.op",
}


def _string_constants(path: pathlib.Path) -> set[str]:
    """String literals of a module other than docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_backends_and_layouts_are_named_only_by_their_own_objects():
    """A backend, its layout and its tile family are one object each (kernels/*/backend.py): no other module
    names them in code (choices go through ``KERNEL_BACKENDS``, ``KernelBackend.layout`` and the layout
    constants), so a new backend or layout touches its own files only."""
    names = BACKEND_NAMES | LAYOUT_NAMES | TILE_FAMILIES
    found = {
        module: sorted(_string_constants(path) & names)
        for module, path in _modules().items()
        if module not in NAMES_ALLOWED_IN and _string_constants(path) & names
    }
    assert not found, found
    assert _string_constants(_modules()["quarkmoe_jax.kernels.pallas.backend"]) & names  # the reader reads


#: The one registry of model families (``FAMILIES``): the only module that may branch on a ``model_type``.
FAMILY_REGISTRY = "quarkmoe_jax.checkpoint.architectures"
#: Other modules that name a model family, and why: a default value, never a branch.
NAMES_A_FAMILY = {
    "quarkmoe_jax.checkpoint.synthetic": "the default model_type argument of synthetic_moe / write_float_checkpoint",
    "quarkmoe_jax.cli": "the demo's model and `quarkmoe synthetic --model-type`'s default",
}


def _family_names(tree: ast.AST, families: set[str]) -> list[ast.Constant]:
    return [
        n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in families
    ]


def test_only_the_family_registry_branches_on_a_model_type():
    """A model family is one entry of ``checkpoint.architectures.FAMILIES``: no other module compares a
    ``model_type`` (or anything) with a family's name, keys a table by it, or names it at all outside the
    short list of defaults above."""
    from quarkmoe_jax.checkpoint.architectures import FAMILIES

    families = set(FAMILIES)
    assert families >= {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"}
    branches, named = [], []
    for module, path in _modules().items():
        if module == FAMILY_REGISTRY:
            continue
        tree = ast.parse(path.read_text())
        constants = {id(c) for c in _family_names(tree, families)}
        for node in ast.walk(tree):
            operands = []
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                operands = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.match_case):
                operands = [node.pattern]
            for operand in operands:
                if any(id(c) in constants for c in ast.walk(operand)):
                    branches.append(f"{module}:{node.lineno if hasattr(node, 'lineno') else '?'}")
        if constants and module not in NAMES_A_FAMILY:
            named.append(f"{module}: {sorted({c.value for c in _family_names(tree, families)})}")
    assert not branches, f"a model_type branch outside {FAMILY_REGISTRY}: {branches} (ask the ModelFamily instead)"
    assert not named, f"family names outside {FAMILY_REGISTRY} and NAMES_A_FAMILY: {named}"


def test_the_family_check_sees_the_registry():
    """The test above cannot pass by reading nothing: the registry's own branches are found."""
    from quarkmoe_jax.checkpoint.architectures import FAMILIES

    tree = ast.parse(_modules()[FAMILY_REGISTRY].read_text())
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    found = {c.value for c in _family_names(tree, set(FAMILIES))}
    assert found == set(FAMILIES) and any(c.value in FAMILIES for n in compares for c in _family_names(n, found))
