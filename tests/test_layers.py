"""The layers of docs/ARCHITECTURE.md import one way: the package imports nothing outside itself and has no cycle;
util/ and the models import nothing from training/ or the tasks; collectives and the process group are training/'s;
no module aliases another through sys.modules; each task has its script and its engine, in one shape."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {path.stem for path in ROOT.glob("*.py")} | {"training", "util", "benchmarks", "dmjd_encoders"}
TASKS = ("pretrain", "finetune", "linprobe", "segment", "detect")


def imported(path: Path, module_level_only: bool = False):
    """The modules `path` imports (relative imports resolved within its package); with `module_level_only`, those
    of its top level (what runs when it is imported)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    package = path.parent.name
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield f"{package}.{node.module}" if node.module else package
                if not node.module:  # from . import x
                    yield from (f"{package}.{alias.name}" for alias in node.names)
            else:
                yield node.module


def ours(paths):
    return [p for p in paths if p.name != "__init__.py" or p.parent.name != "tests"]


def test_the_package_imports_nothing_outside_itself_and_has_no_import_cycle():
    files = sorted((ROOT / "dmjd_encoders").glob("*.py"))
    for path in files:
        outside = [m for m in imported(path) if m.split(".")[0] in TOP_LEVEL - {"dmjd_encoders"}]
        assert not outside, f"{path.name} imports {outside}"
    graph = {f"dmjd_encoders.{p.stem}": {m for m in imported(p) if m.startswith("dmjd_encoders.")} for p in files
             if p.stem != "__init__"}
    # every import inside the package, wherever it is written (a function-local import is a cycle all the same)
    seen, done = set(), set()

    def visit(module, path):
        assert module not in seen or module in done, f"import cycle: {' -> '.join(path + [module])}"
        if module in done:
            return
        seen.add(module)
        for other in sorted(graph.get(module, ())):
            visit(other, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not any(hasattr(importlib.import_module(m), "__getattr__") for m in graph), "a module __getattr__"


def test_util_and_the_models_import_nothing_from_training_the_tasks_or_the_scripts():
    for path in sorted((ROOT / "util").glob("*.py")) + sorted(ROOT.glob("models_*.py")):
        upward = [m for m in imported(path) if m.split(".")[0] in {"training", "benchmarks"} or
                  m.split(".")[0].startswith(("main_", "engine_"))]
        assert not upward, f"{path.relative_to(ROOT)} imports {upward}"


def test_the_training_layer_imports_no_task_script_or_benchmark():
    for path in sorted((ROOT / "training").glob("*.py")):
        upward = [m for m in imported(path) if m.split(".")[0] in TOP_LEVEL - {"training", "util", "dmjd_encoders"}
                  and not m.startswith("models_")]
        assert not upward, f"{path.relative_to(ROOT)} imports {upward}"


def test_collectives_and_the_process_group_are_the_training_layers():
    outside = [p for p in ours(ROOT.glob("*.py")) + sorted((ROOT / "util").glob("*.py")) +
               sorted((ROOT / "dmjd_encoders").glob("*.py"))
               if any(m.startswith("torch.distributed") for m in imported(p))]
    assert not outside, f"torch.distributed outside training/: {[str(p.relative_to(ROOT)) for p in outside]}"


def test_no_module_aliases_another_through_sys_modules():
    for path in ours(list(ROOT.glob("*.py")) + [p for d in ("training", "util", "dmjd_encoders")
                                                for p in (ROOT / d).glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "modules" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{path.relative_to(ROOT)} reads or writes sys.modules (line {node.lineno})")


@pytest.mark.parametrize("task", TASKS)
def test_each_task_is_a_script_and_an_engine_in_one_shape(task):
    """main_<task>.py: its parser (get_args_parser), check_data, validate_args and main; engine_<task>.py: its
    config (<Task>Config), validate_args(args, parser), resolve_config(args, parser), its Task and
    run_<...>(run, cfg), the entry the script calls."""
    script, engine = importlib.import_module(f"main_{task}"), importlib.import_module(f"engine_{task}")
    for name in ("get_args_parser", "validate_args", "main"):
        assert callable(getattr(script, name, None)), f"main_{task}.py has no {name}"
    assert f"engine_{task}" in set(imported(ROOT / f"main_{task}.py", module_level_only=True))
    from training.config import TrainConfig
    from training.task import Task
    configs = [v for v in vars(engine).values() if isinstance(v, type) and issubclass(v, TrainConfig)
               and v.__module__ == engine.__name__]
    tasks = [v for v in vars(engine).values() if isinstance(v, type) and issubclass(v, Task)
             and v.__module__ == engine.__name__]
    assert [c.__name__ for c in configs] == [f"{task.capitalize()}Config"], configs
    assert len(tasks) == 1 and tasks[0].__name__.endswith("Task"), tasks
    runs = [n for n, v in vars(engine).items()
            if n.startswith("run_") and getattr(v, "__module__", "") == engine.__name__]
    assert len(runs) == 1, runs
    for name in ("validate_args", "resolve_config"):
        assert callable(getattr(engine, name, None)), f"engine_{task}.py has no {name}"


def test_the_transfer_report_plans_without_torch_or_any_engine():
    """main_transfer.py runs the transfer scripts as subprocesses: what it and engine_transfer.py import when they
    load is the standard library, training.signals and util/ (the report's curves, pictures and checkpoint facts load
    more, inside the functions that draw or read them)."""
    import sys
    for name in ("engine_transfer.py", "main_transfer.py"):
        loaded = {m.split(".")[0] for m in imported(ROOT / name, module_level_only=True)}
        ours = loaded & (TOP_LEVEL | {"torch", "timm", "torchvision", "matplotlib"})
        assert ours <= {"training", "util", "engine_transfer"}, f"{name} imports {ours}"
        assert not {m for m in imported(ROOT / name, module_level_only=True) if m.startswith("training.")} - {
            "training.signals"}, name
    assert all(m in sys.stdlib_module_names or m in TOP_LEVEL for m in
               {m.split(".")[0] for m in imported(ROOT / "engine_transfer.py", module_level_only=True)})
