"""The dependency rules, checked on the source: `src/synthtune` never imports Prefect, and a stage
module never imports another stage's module (shared code lives in synthtune/*.py). A stage's private
child-process module (`stages/_*.py`) belongs to the stage named by its `STAGE`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "synthtune"


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


def test_the_library_never_imports_prefect():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "prefect")
                 for p in SRC.rglob("*.py")}
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


def test_the_checker_sees_lazy_imports(tmp_path):
    """The scan must not miss an import inside a function (heavy imports live there)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from prefect import flow\n    import synthtune.stages.train\n")
    assert {"prefect", "prefect.flow", "synthtune.stages.train"} <= imported_modules(probe)
