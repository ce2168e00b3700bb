"""The dependency rules, checked on the source:

- `src/synthtune` never imports Prefect (`flows -> tasks -> synthtune`; only the CLI reaches the
  Prefect layer, lazily, to run and deploy flows);
- a stage module never imports another stage's module (shared code lives in synthtune/*.py); a
  stage's private child-process module (`stages/_*.py`) belongs to the stage named by its `STAGE`;
- no import circle among `src/synthtune` modules (lazy and type-checking imports included), so the
  config schemas sit below the stages (`synthtune.configs`);
- no private Prefect module (`_` anywhere in its path) is imported anywhere;
- no `sys.path` manipulation anywhere: `flows` and `tasks` are packages of the installed project;
- `flows/pipeline.py` stays a short, straight-line file.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "synthtune"
CODE = [p for folder in ("src", "tasks", "flows", "tests", "bench", "deployments") for p in (ROOT / folder).rglob("*.py")]


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names, at any depth (lazy imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def stage_of(path: Path) -> str | None:
    """The `STAGE = "..."` a module under stages/ declares."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["STAGE"]:
            return ast.literal_eval(node.value)
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_graph() -> dict[str, set[str]]:
    """synthtune module -> the synthtune modules it imports (a name imported from a package counts as
    the package unless it is a module of its own)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m if m in modules else m.rsplit(".", 1)[0] for m in imported_modules(path)
                       if m.startswith("synthtune") and (m in modules or m.rsplit(".", 1)[0] in modules)} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_library_never_imports_prefect():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "prefect")
                 for p in SRC.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_cli_reaches_the_prefect_layer():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] in ("flows", "tasks"))
                 for p in SRC.rglob("*.py") if "cli" not in p.relative_to(SRC).parts}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_stage_module_imports_another_stage():
    stages = {f"synthtune.stages.{p.stem}": stage_of(p) for p in (SRC / "stages").glob("*.py") if p.stem != "__init__"}
    assert all(stages.values()), f"every module under stages/ declares its STAGE: {stages}"
    assert {"synthtune.stages._train_child", "synthtune.stages._distilabel_run"} <= set(stages)
    crossings = {}
    for path in (SRC / "stages").glob("*.py"):
        own = stage_of(path)
        if own is None:
            continue
        other = sorted(m for m in imported_modules(path) if m in stages and stages[m] != own)
        if other:
            crossings[path.name] = other
    assert not crossings, f"stage modules importing other stages: {crossings}"


def test_no_import_circle_in_the_library():
    graph = library_graph()
    assert "synthtune.configs" in graph["synthtune.stages.train"]  # the checker sees the edges it should
    assert not cycles(graph), cycles(graph)


def test_the_config_schemas_sit_below_the_stages():
    graph = library_graph()
    below = {m for m in graph if m.startswith("synthtune.configs")}
    assert below and not {m: sorted(d) for m in below for d in [graph[m] & {n for n in graph if n.startswith(
        "synthtune.stages")}] if d}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_prefect_module_is_imported():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "prefect"
                                                  and any(part.startswith("_") for part in m.split(".")[:-1]))
                 for p in CODE}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_sys_path_manipulation_anywhere():
    offenders = []
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        if "sys.path.insert" in path.read_text() and path != Path(__file__):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_the_flow_file_is_short():
    assert len((ROOT / "flows" / "pipeline.py").read_text().splitlines()) <= 120


def test_the_checker_sees_lazy_imports(tmp_path):
    """The scan must not miss an import inside a function (heavy imports live there)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from prefect import flow\n    import synthtune.stages.train\n")
    assert {"prefect", "prefect.flow", "synthtune.stages.train"} <= imported_modules(probe)
