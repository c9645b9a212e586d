"""The scheduler and the cache manager (and everything they import from the engine) import no torch."""
from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def runtime_imports(path: Path) -> tuple[set[str], set[Path]]:
    """(top-level modules, engine files imported relatively) of a module, skipping `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = [ast.Pass()]
    tmp = ast.unparse(tree)
    absolute, local = set(), set()
    for node in ast.walk(ast.parse(tmp)):
        if isinstance(node, ast.Import):
            absolute.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.add(node.module.split(".")[0])
                continue
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*(node.module or "").split("."))
            local.add(target.with_suffix(".py") if target.with_suffix(".py").exists() else target / "__init__.py")
    return absolute, local


def closure(start: Path) -> tuple[set[str], set[Path]]:
    seen, todo, mods = set(), [start], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        absolute, local = runtime_imports(p)
        mods |= absolute
        todo.extend(local)
    return mods, seen


def test_scheduler_and_cache_manager_import_no_torch():
    for name in ("scheduler.py", "cache_manager.py", "prefix_cache.py"):
        mods, files = closure(ENGINE / name)
        assert "torch" not in mods, f"{name} reaches torch through {sorted(f.name for f in files)}"
        assert "sequence.py" in {f.name for f in files} or name in ("cache_manager.py", "prefix_cache.py")


def test_the_check_sees_torch_where_it_is():
    mods, _ = closure(ENGINE / "runner.py")
    assert "torch" in mods
