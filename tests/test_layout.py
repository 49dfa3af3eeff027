"""The package's shape: every module imports, no import cycle (including imports hidden inside
functions), the core needs no optional dependency, and every tool runs both as
`python tools/X.py` and as its console script."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddpm_dist"
TOOLS = {"fid": "ddpm-fid", "fid_stats": "ddpm-fid-stats", "fid_sample": "ddpm-fid-sample",
         "eval_nll": "ddpm-eval-nll", "export": "ddpm-export", "make_shards": "ddpm-make-shards",
         "convert_diffusers": "ddpm-convert-diffusers", "track_fid": "ddpm-track-fid"}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of a (possibly relative) `from X import ...`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, known: set[str]) -> set[str]:
    """Our modules that `module` imports anywhere in its file (top level or inside functions)."""
    path = ROOT / Path(*module.split("."))
    is_package = path.is_dir()
    tree = ast.parse((path / "__init__.py" if is_package else path.with_suffix(".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name in known and name != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_hidden_cycle():
    # The control: a cycle through an import inside a function is one too.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_anywhere_in_the_package():
    known = set(module_names())
    graph = {m: imports_of(m, known) - {"ddpm_dist"} for m in known}
    # A package imports its own modules in __init__ by design; that is not a cycle back up.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# The README's import order: a module imports only from its own tier or the tiers before it.
TIERS = [{"data", "training", "metrics"}, {"modelio"}, {"evaluation", "train"}, {"launch"}, {"reproduce"},
         {"cli"}]


def tier_of(module: str) -> int:
    """0 for the core (the top-level modules and utils/), else 1 + the index of its tier."""
    part = module.split(".")[1] if "." in module else ""
    return next((i + 1 for i, tier in enumerate(TIERS) if part in tier), 0)


def test_imports_run_one_way_from_the_core_up_to_the_tools():
    known = set(module_names())
    upward = sorted(f"{m} -> {d}" for m in known for d in imports_of(m, known) if tier_of(d) > tier_of(m))
    assert not upward, f"imports against the README's order: {upward}"


def strings_naming_the_tools(module: str) -> list[str]:
    """String constants of `module` (docstrings aside) that name a module under ddpm_dist.cli:
    an upward dependency (`python -m ddpm_dist.cli.X`) that no import shows."""
    path = ROOT / Path(*module.split("."))
    tree = ast.parse((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and "ddpm_dist.cli" in node.value and id(node) not in docstrings]


def test_the_library_never_runs_its_own_command_line_tools():
    library = [m for m in module_names() if not m.startswith("ddpm_dist.cli")]
    found = {m: names for m in library if (names := strings_naming_the_tools(m))}
    assert not found, f"library modules that run a tool (build its command in ddpm_dist/cli/ instead): {found}"


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *module_names()], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_core_needs_only_torch_numpy_and_yaml():
    optional = ["tensorboard", "webdataset", "s3fs", "deepspeed", "submitit", "diffusers", "sklearn", "scipy"]
    code = ("import sys, ddpm_dist.diffusion, ddpm_dist.unet, ddpm_dist.config\n"
            f"print([m for m in {optional!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def _help(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen([*cmd, "--help"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_runs_as_script_and_as_console_script(tool):
    script = Path(sys.executable).parent / TOOLS[tool]
    assert script.is_file(), f"{script} missing: reinstall with scripts/setup.sh (pyproject [project.scripts])"
    procs = [_help([sys.executable, str(ROOT / "tools" / f"{tool}.py")]), _help([str(script)])]
    (shim_out, shim_err), (cli_out, cli_err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, shim_err[-2000:] + cli_err[-2000:]
    # The same parser: identical help after the usage block (which wraps by the program name).
    assert shim_out.split("\n\n", 1)[1] == cli_out.split("\n\n", 1)[1]
    assert shim_out.startswith(f"usage: {tool}.py") and cli_out.startswith(f"usage: {TOOLS[tool]}")


def test_submit_reproduce_and_train_run_as_documented():
    procs = [_help([sys.executable, str(ROOT / "launch" / "submit.py")]),
             _help([str(Path(sys.executable).parent / "ddpm-submit")]),
             _help([sys.executable, str(ROOT / "launch" / "reproduce.py")]),
             _help([str(Path(sys.executable).parent / "ddpm-reproduce")]),
             _help([sys.executable, "-m", "ddpm_dist.train"]),
             _help([str(Path(sys.executable).parent / "ddpm-train")])]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("usage:"), err[-2000:]
