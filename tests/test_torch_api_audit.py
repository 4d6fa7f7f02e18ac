"""What sar_fast asks of torch beyond its public API, read from the package's source with
`ast`: process groups and device meshes are opened and closed only in
sar_fast/train/parallel.py, and every private torch name (a module, function or attribute
whose name starts with '_', FSDP2's internal state) is used only inside the one function
that fences it (a probe with a public fallback, or a clear error)."""
import ast
import os

from conftest import ROOT, dotted_name

PACKAGE = os.path.join(ROOT, "sar_fast")
PARALLEL = "sar_fast/train/parallel.py"
GROUP_CALLS = {"init_process_group", "new_group", "destroy_process_group", "init_device_mesh", "new_subgroups",
               "new_subgroups_by_enumeration", "split_group"}
# FSDP2's internal state, which no name of a torch module shows
FSDP_INTERNALS = {"_get_fsdp_state", "_fsdp_param_group", "_fsdp_param_groups", "_comm_ctx", "post_backward",
                  "finalize_backward", "reduce_scatter_state", "reduce_scatter_states", "reduce_grads",
                  "all_reduce_grads"}
# (file, function) -> the private names it may use; each function says why no public API does it
FENCED = {
    (PARALLEL, "_set_timeout_before_2_14"): {"torch.distributed.distributed_c10d._set_pg_timeout"},
    (PARALLEL, "_register_fake_backend"): {"torch.testing._internal.distributed.fake_pg"},
    (PARALLEL, "_reduce_now"): FSDP_INTERNALS,
    (PARALLEL, "compile_block"): {"torch._dynamo.config.recompile_limit"},
    ("sar_fast/train/memory.py", "_fake_tensor_mode"): {"torch._subclasses.fake_tensor.FakeTensorMode"},
    ("sar_fast/train/memory.py", "_memory_tracker"): {"torch.distributed._tools.mem_tracker.MemTracker"},
    # outside the trainer (the custom ops' fake-tensor checks, the C++ loader, the restricted
    # unpickler's allow-list): kept, each at one place
    ("sar_fast/ops/backend.py", None): {"torch._subclasses.fake_tensor.is_fake"},
    ("sar_fast/ops/attention.py", None): {"torch._guards.detect_fake_mode"},
    ("sar_fast/_C_loader.py", "_memory_format_of"): {"torch._prims_common.suggest_memory_format"},
    ("sar_fast/safe_load.py", "_torch_allowed"): {"torch._weights_only_unpickler"},
    ("sar_fast/safe_load.py", "restricted_pickle_load"): {"torch._weights_only_unpickler"},
}


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    yield os.path.relpath(path, ROOT), ast.parse(f.read(), path)



def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def _uses(tree):
    """(enclosing top-level or nested function name or None, what, line) for each group call
    and each private torch name."""
    found = []

    def visit(node, func):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Call):
            name = dotted_name(node.func)
            if name.split(".")[-1] in GROUP_CALLS:
                found.append((func, "group:" + name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                if alias.name in GROUP_CALLS:
                    found.append((func, "group:" + alias.name, node.lineno))
                full = f"{node.module}.{alias.name}"
                if _private(full):
                    found.append((func, full, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch" and _private(alias.name):
                    found.append((func, alias.name, node.lineno))
        elif isinstance(node, ast.Attribute):
            name = dotted_name(node)
            if name.startswith("torch.") and _private(name) and not isinstance(getattr(node, "_parent", None),
                                                                                 ast.Attribute):
                found.append((func, name, node.lineno))
            elif node.attr in FSDP_INTERNALS:
                found.append((func, node.attr, node.lineno))
        for child in ast.iter_child_nodes(node):
            child._parent = node
            visit(child, func)

    visit(tree, None)
    return found


def _allowed(path, func, what) -> bool:
    names = FENCED.get((path, func), set())
    return any(what == n or what.startswith(n + ".") or n.startswith(what + ".") for n in names)


def audit(modules) -> list[str]:
    bad = []
    for path, tree in modules:
        for func, what, line in _uses(tree):
            if what.startswith("group:"):
                if path != PARALLEL:
                    bad.append(f"{path}:{line} {what[6:]} outside {PARALLEL}")
            elif not _allowed(path, func, what):
                bad.append(f"{path}:{line} private torch API {what} in {func or 'module scope'}")
    return bad


def test_process_groups_only_in_parallel_and_private_torch_only_where_fenced():
    assert audit(_modules()) == []


def test_the_audit_sees_what_it_forbids():
    snippet = ast.parse(
        "import torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "def f(unit):\n"
        "    dist.new_group(backend='gloo')\n"
        "    torch._dynamo.config.cache_size_limit = 1\n"
        "    return unit._get_fsdp_state()\n")
    bad = audit([("sar_fast/train/checkpointing.py", snippet)])
    assert len(bad) == 5, bad
    assert any("new_group outside" in b for b in bad) and any("init_device_mesh outside" in b for b in bad)
    assert any("_get_fsdp_state in f" in b for b in bad) and any("torch._dynamo" in b for b in bad)
    # the same uses inside their fence pass
    fenced = ast.parse("def _reduce_now(units):\n    return units[0]._get_fsdp_state()._comm_ctx\n")
    assert audit([(PARALLEL, fenced)]) == []
