"""Data flows one way (DESIGN.md §1): no import cycles through the backend, the model, the ops, steering and graphs;
the shared launch helpers live in their own module, not in one op's.

Imports are read from the source with ast, function-level (lazy) imports included: a cycle closed lazily is
still a cycle in the design.
"""
import ast
import pathlib

import mfm_fast

PACKAGE = pathlib.Path(mfm_fast.__file__).parent
# modules that must sit on no import cycle ("mfm_fast.ops." covers every op module)
ACYCLIC = ("mfm_fast.backend", "mfm_fast.models.dit", "mfm_fast.ops.", "mfm_fast.steer", "mfm_fast.graphs",
           "mfm_fast.steps")


def module_names() -> dict:
    """dotted module name -> path, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict:
    """module -> set of package modules it imports (anywhere in its source)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "mfm_fast.ops.adaln" in graph["mfm_fast.ops.fused"]  # from .adaln import ...
    assert "mfm_fast.backend" in graph["mfm_fast.models.dit"]  # from .. import backend
    assert "mfm_fast.memory" in graph["mfm_fast.value"]  # a function-level import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_through_backend_model_ops_steer_or_graphs():
    bad = [c for c in cycles(import_graph()) if any(m == p or (p.endswith(".") and m.startswith(p))
                                                     for m in c for p in ACYCLIC)]
    assert not bad, f"import cycles: {bad}"


def test_backend_does_not_reach_into_the_model():
    assert not {m for m in import_graph()["mfm_fast.backend"] if m.startswith("mfm_fast.models")}


def test_graphs_does_not_import_steer():
    assert "mfm_fast.steer" not in import_graph()["mfm_fast.graphs"]


def _top_level_defs(module: str) -> set:
    tree = ast.parse(module_names()[module].read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_launch_helpers_live_in_their_own_module_not_in_adaln():
    helpers = {"new_buffer", "poisoned_outputs", "row_plan", "launch_rows", "check_kernel_inputs", "check_groups",
               "differentiable_by_recompute", "sum_partials", "group_view", "cdiv"}
    assert helpers <= _top_level_defs("mfm_fast.ops.launch")
    assert not helpers & _top_level_defs("mfm_fast.ops.adaln")
    # what the other LayerNorm-family ops take from adaln is ln_modulate itself, nothing else
    for op in ("gate_residual", "input_stage", "bias_gelu", "time_embed"):
        tree = ast.parse(module_names()[f"mfm_fast.ops.{op}"].read_text())
        taken = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "adaln"
                 for a in n.names}
        assert all(name.startswith("ln_modulate") for name in taken), (op, taken)
