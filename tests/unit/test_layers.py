"""The layers stay true: dependencies point down, and no project modules import each other in a cycle.

    app       pmetal/cli/ (and pmetal/__main__.py)      may import everything below
    methods   modules/ (pmetal.modules), callbacks/ (pmetal.callbacks)
    core      the rest of pmetal/ (and examples/, installed as pmetal.examples)

Every import statement of every file is read with ast, those inside functions too. The import
strings of the method table (pmetal/cli/methods.py) are data, not imports, and are not counted.
Tests and benchmarks sit outside the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"pmetal": "pmetal", "modules": "pmetal.modules", "callbacks": "pmetal.callbacks",
           "examples": "pmetal.examples"}
LAYERS = {"core": 0, "methods": 1, "app": 2}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the installed packages."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def layer_of(module: str) -> str:
    if module == "pmetal.__main__" or module == "pmetal.cli" or module.startswith("pmetal.cli."):
        return "app"
    if module.split(".")[:2] in (["pmetal", "modules"], ["pmetal", "callbacks"]):
        return "methods"
    return "core"


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from package import submodule` imports the submodule; `from module import name` the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import pmetal.cli.flags.x` style: the longest known prefix
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def test_the_map_sees_the_layers():
    known = project_modules()
    assert layer_of("pmetal.cli.runner") == "app" and "pmetal.cli.runner" in known
    assert layer_of("pmetal.modules.grpo") == "methods" and known["pmetal.modules.grpo"] == ROOT / "modules" / "grpo.py"
    assert layer_of("pmetal.callbacks.rollout") == "methods"
    assert layer_of("pmetal.rl.settings") == "core" and layer_of("pmetal.errors") == "core"
    graph = import_graph()
    # function-level and relative imports are read too
    assert "pmetal.callbacks.rollout" in graph["pmetal.modules.grpo"]  # inside configure_callbacks
    assert "pmetal.rl.settings" in graph["pmetal.modules.grpo"]
    assert "pmetal.cli.dispatch" in graph["pmetal.cli"]


def test_no_upward_import():
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if LAYERS[layer_of(target)] > LAYERS[layer_of(module)]
    ]
    assert not upward, "imports pointing up a layer:\n  " + "\n  ".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return components


def test_the_cycle_finder_finds_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = strongly_connected(import_graph())
    assert not cycles, "modules that import each other (directly or around a loop):\n  " + "\n  ".join(
        " <-> ".join(c) for c in cycles)


def test_no_state_is_stuck_onto_objects_that_do_not_own_it():
    """Run state is passed explicitly: nothing assigns a pmetal-named attribute onto another object
    (the Trainer, a module); a callback keeps its results on itself (`self.export_dir`)."""
    owned = {"pmetal_quantization": "a quantized model's record of how its own weights are stored (as HF's "
                                    "config.quantization_config), read back when it is saved or merged"}
    stuck = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                on_self = isinstance(getattr(target, "value", None), ast.Name) and target.value.id == "self"
                if (isinstance(target, ast.Attribute) and target.attr.lstrip("_").startswith("pmetal")
                        and target.attr not in owned and not on_self):
                    stuck.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(target)}")
    assert not stuck, "state set on objects that do not own it:\n  " + "\n  ".join(stuck)


def test_the_online_rl_core_imports_no_method_and_no_callback():
    """pmetal.rl (the typed rollout, the sampler, reward scoring, the rollout settings) sits beneath
    the methods: RolloutCallback and the online modules call it, never the other way round."""
    graph = import_graph()
    core = sorted(m for m in graph if m == "pmetal.rl" or m.startswith("pmetal.rl."))
    assert {"pmetal.rl.sampler", "pmetal.rl.rollout", "pmetal.rl.settings", "pmetal.rl.scoring"} <= set(core)
    upward = [f"{m} imports {t}" for m in core for t in sorted(graph[m]) if layer_of(t) != "core"]
    assert not upward, "\n  ".join(upward)
    assert "pmetal.rl.sampler" in graph["pmetal.callbacks.rollout"]  # the callback is a hook over the sampler


def test_no_trainer_setting_is_overwritten_by_a_module():
    """A module keeps its settings to itself: no `trainer.<setting> = ...` in modules/ or callbacks/
    (GRPO's manual update clips from its own `max_grad_norm`, not by taking the Trainer's over)."""
    written = []
    for module, path in project_modules().items():
        if layer_of(module) != "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if (isinstance(target, ast.Attribute) and isinstance(target.value, (ast.Name, ast.Attribute))
                        and ast.unparse(target.value).split(".")[-1] in ("trainer", "_trainer")):
                    written.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(target)}")
    assert not written, "Trainer settings overwritten:\n  " + "\n  ".join(written)


# What only pmetal/generation/hf_internals.py may touch: transformers' private attributes and the
# spellings that change between its versions (the attention switch, the module slots, the cache
# keyword and the cache's per-layer tensors).
HF_INTERNALS = {
    "_attn_implementation": "the attention dispatch switch (hf_internals.attn_implementation / dispatch_attention)",
    "._modules": "swapping child modules (hf_internals.swap_submodule)",
    "cache.layers": "a cache's per-layer tensors (hf_internals.cache_layers)",
    'getattr(cache, "layers"': "a cache's per-layer tensors (hf_internals.cache_layers)",
    "key_cache": "an older cache's tensors (hf_internals.cache_layers)",
    "inspect.signature": "sniffing the forward's cache keyword (hf_internals.forward_kwargs)",
    '"past_key_values"': "the cache keyword or output (hf_internals.forward_kwargs / output_cache)",
    "DynamicCache(": "building transformers' cache (hf_internals.new_prompt_cache)",
    "AttentionInterface": "registering an attention function (hf_internals.register_attention)",
}


def test_only_hf_internals_touches_transformers_internals_in_generation():
    generation = ROOT / "pmetal" / "generation"
    found = []
    for path in sorted(generation.rglob("*.py")):
        if path.name == "hf_internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{number}: {needle!r} ({where})"
                      for needle, where in HF_INTERNALS.items() if needle in line]
    assert not found, "transformers internals outside pmetal/generation/hf_internals.py:\n  " + "\n  ".join(found)
    own = (generation / "hf_internals.py").read_text()
    assert all(needle in own for needle in ("_attn_implementation", "._modules", "inspect.signature", "DynamicCache"))
