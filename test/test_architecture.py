"""The package layout is the architecture (README "Architecture"): these tests read every
module's imports (module level and inside functions) with ``ast`` and fail on an import that
points up a layer, on any import circle, on rclpy outside ros/, and on oversized modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "perception2d_ros"
ROOT = Path(__file__).resolve().parents[1] / PKG

# bottom → top; a module may import its own layer and the layers below it
LAYERS = {
    "geometry": 0,
    "io": 1,
    "engines": 2,
    "models": 3,
    "eval": 4,
    "pipeline": 4,
    "ros": 5,
    "bench": 6, "cli": 6, "demo": 6,
}
# the bottom of pipeline/: what a model family's stage module may import from above
PIPELINE_BOTTOM = ("pipeline.frame", "pipeline.results")
# the only layers where ROS client libraries and ROS message packages may be imported
ROS_LAYERS = {"ros", "bench", "demo"}
ROS_MODULES = ("rclpy", "sensor_msgs", "std_msgs", "vision_msgs", "builtin_interfaces",
               "geometry_msgs", "tf2_msgs", "perception2d_interfaces", "diagnostic_msgs",
               "lifecycle_msgs", "rcl_interfaces")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an absolute import name refers to (longest existing prefix)."""
    if not name.startswith(PKG + "."):
        return None
    parts = name[len(PKG) + 1:].split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def _imports(mod: str) -> tuple[set[str], set[str]]:
    """(project modules, external top-level packages) that ``mod`` imports anywhere."""
    tree = ast.parse(MODULES[mod].read_text())
    ours, ext = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                r = _resolve(a.name)
                (ours.add(r) if r else ext.add(a.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{mod}: relative import; the layout uses absolute imports"
            base = node.module or ""
            if not base.startswith(PKG):
                ext.add(base.split(".")[0])
                continue
            for a in node.names:   # `from pkg import module` imports the module
                r = _resolve(f"{base}.{a.name}") or _resolve(base)
                if r:
                    ours.add(r)
    ours.discard(mod)
    return ours, ext


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(mod: str) -> str | None:
    top = mod.split(".")[0]
    return top if top in LAYERS else None


def test_every_module_lives_in_a_layer():
    loose = [m for m in MODULES if m and _layer(m) is None and m != "__main__"]
    assert not loose, f"modules outside the layer packages {sorted(LAYERS)}: {loose}"


def test_dependencies_point_down():
    bad = []
    for mod, (ours, _) in GRAPH.items():
        src = _layer(mod)
        if src is None:
            continue
        for dep in ours:
            dst = _layer(dep)
            if dst is None or LAYERS[dst] <= LAYERS[src]:
                continue
            if src == "models" and dep in PIPELINE_BOTTOM:
                continue
            bad.append(f"{mod} -> {dep}")
    assert not bad, "imports that point up a layer:\n" + "\n".join(sorted(bad))


def test_pipeline_bottom_imports_no_model():
    """Frame and the stage results sit under the models' stage modules: they import no model
    and nothing else of the pipeline (the registry, which names the stages, sits above)."""
    assert set(PIPELINE_BOTTOM) <= set(GRAPH), "the bottom of pipeline/ moved: update the test"
    bad = [f"{m} -> {d}" for m in PIPELINE_BOTTOM
           for d in GRAPH[m][0] if not d.startswith(("geometry", "io", "engines", "pipeline"))]
    bad += [f"{m} -> {d}" for m in PIPELINE_BOTTOM
            for d in GRAPH[m][0] if d.startswith("pipeline") and d not in PIPELINE_BOTTOM]
    assert not bad, bad


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v][0]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles() == []


def test_ros_only_in_the_ros_layers():
    bad = [f"{m} imports {sorted(e & set(ROS_MODULES))}" for m, (_, e) in GRAPH.items()
           if _layer(m) not in ROS_LAYERS and e & set(ROS_MODULES)]
    assert not bad, bad


def test_package_inits_say_what_lives_there_and_import_nothing():
    dirs = {p.parent for p in ROOT.rglob("*.py")}
    missing = sorted(str(d) for d in dirs if not (d / "__init__.py").is_file())
    assert not missing, f"no __init__.py (setup.py's find_packages would not install): {missing}"
    for p in ROOT.rglob("__init__.py"):
        tree = ast.parse(p.read_text())
        doc = ast.get_docstring(tree)
        assert doc and len(doc) > 40, f"{p}: a docstring saying what lives here"
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], \
            f"{p} imports: importing a package must stay cheap and circle-free"


def test_no_module_over_the_size_limit():
    big = {m: n for m, p in MODULES.items()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split by responsibility): {big}"


def test_the_checker_sees_real_imports():
    """Guard against a checker that passes because it reads nothing."""
    edges = sum(len(ours) for ours, _ in GRAPH.values())
    assert edges > 150, edges
    assert any(d.startswith("pipeline") for d in GRAPH["ros.perception_node"][0])
    assert "rclpy" in GRAPH["ros.perception_node"][1]
