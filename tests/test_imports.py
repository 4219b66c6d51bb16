"""What the Lucy-Richardson path imports, the optional extras, and the import graph.

A Lucy-Richardson worker imports no torch (its import costs seconds and ~180 MiB); the core
install (``pip install ssi-dask``) has no torch, matplotlib or scikit-image, and the commands
that need them say which extra to install in one line. Module imports point one way: no cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssi_dask"
BLOCKED = ("torch", "matplotlib", "skimage")

# Installed as sitecustomize.py on PYTHONPATH, so that it also runs in the Dask worker processes
# a local cluster spawns: importing a blocked module fails as if it were not installed, and every
# attempt is logged to $SSI_DASK_BLOCK_LOG.
BLOCKER = """
import os, sys

BLOCKED = {blocked!r}


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(os.environ["SSI_DASK_BLOCK_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


def test_lr_path_does_not_import_torch():
    code = (
        "import sys, ssi_dask, ssi_dask.blockwise, ssi_dask.store, ssi_dask.cli, ssi_dask.lr; "
        "print('torch' in sys.modules); ssi_dask.train; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]  # torch only once train is asked for


def test_cli_parser_imports_no_heavy_library():
    """``ssi-dask --help`` builds its parser without Dask, distributed, zarr or torch (the
    package's public names load on first use); every public name still resolves."""
    code = (
        "import sys, ssi_dask, ssi_dask.cli; ssi_dask.cli.build_parser(); "
        "print(sorted(m for m in ('dask', 'distributed', 'zarr', 'xarray', 'torch', 'numpy') "
        "if m in sys.modules)); "
        "print(all(getattr(ssi_dask, n) is not None for n in ssi_dask.__all__ if n != 'train')); "
        "print('dask.array' in sys.modules, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True", "True False"]
    help_text = subprocess.run(
        [sys.executable, "-m", "ssi_dask", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "COMMAND" in help_text.stdout


@pytest.fixture
def without_extras(tmp_path):
    """Run ``ssi-dask`` in a subprocess (and its workers) where torch, matplotlib and
    scikit-image cannot be imported; returns ``(run, log)``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=BLOCKED))
    log = tmp_path / "blocked.log"
    log.touch()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["SSI_DASK_BLOCK_LOG"] = str(log)

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ssi_dask", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )

    return run, log


def test_blocker_works(without_extras):
    run, log = without_extras
    result = subprocess.run(
        [sys.executable, "-c", "import torch"],
        capture_output=True,
        text=True,
        env={**os.environ, **_env_of(run)},
    )
    assert result.returncode != 0 and "blocked" in result.stderr
    assert log.read_text().split() == ["torch"]


def _env_of(run) -> dict:
    """The environment the fixture's ``run`` uses (read back from its closure)."""
    cell = dict(zip(run.__code__.co_freevars, run.__closure__, strict=True))["env"]
    return cell.cell_contents


def test_core_lr_run_without_torch_matplotlib_skimage(without_extras, tmp_path):
    """make-example and a real LR ``ssi-dask run`` (local cluster, worker processes) with the
    extras blocked: they finish, and nothing even tried to import a blocked module."""
    run, log = without_extras
    made = run("make-example", "ex", "--shape", "24,64,64")
    assert made.returncode == 0, made.stderr
    result = run(
        "run", "ex/volume.zarr", "ex/out.zarr", "--psf", "ex/psf.tif", "--iterations", "2",
        "--workers", "1", "--threads-per-worker", "1", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    import zarr

    out = zarr.open_array(str(tmp_path / "ex" / "out.zarr"), mode="r")
    assert out.shape == (24, 64, 64) and out.attrs["ssi_dask"]["complete"] is True
    verified = run("verify", "ex/out.zarr")
    assert verified.returncode == 0, verified.stderr
    assert log.read_text() == ""  # no attempt at all, not even a caught one


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["run", "in.zarr", "out.zarr", "--psf", "p.tif", "--method", "ssi"],
            "ssi-dask run --method ssi needs PyTorch: pip install 'ssi-dask[ssi]'",
        ),
        (
            ["train", "in.zarr", "--psf", "p.tif", "--out", "m.pt"],
            "ssi-dask train needs PyTorch: pip install 'ssi-dask[ssi]'",
        ),
        (
            ["demo", "--out", "d"],
            "ssi-dask demo needs PyTorch and matplotlib and scikit-image: "
            "pip install 'ssi-dask[ssi,bench]'",
        ),
    ],
)
def test_missing_extra_is_one_line(without_extras, tmp_path, argv, line):
    run, _ = without_extras
    result = run(*argv)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ssi-dask: error: {line}"
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.log", "site"]  # wrote nothing


def test_missing_extra_for_the_demo_names_only_what_is_missing(tmp_path):
    from ssi_dask.errors import MissingExtraError
    from ssi_dask.extras import require

    require("anything", "numpy")  # installed: no error
    with pytest.raises(
        MissingExtraError, match=r"^x needs PyTorch: pip install 'ssi-dask\[ssi\]'$"
    ):
        _without(["torch"], lambda: require("x", "torch", "numpy"))


def _without(modules, call):
    """Call ``call`` with ``modules`` made unimportable in this process (restored after)."""
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in modules}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in modules:
                raise ModuleNotFoundError(name, name=name)
            return None

    blocker = Blocker()
    sys.meta_path.insert(0, blocker)
    try:
        return call()
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(saved)


# --- the import graph -------------------------------------------------------------------------

# Cycles allowed, each with the reason (none: cli only calls pipeline.run).
ALLOWED_CYCLES: list[set[str]] = []


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module of ssi_dask."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """Edges ``a -> b`` for every ``import``/``from ... import`` of ssi_dask module ``b`` in
    module ``a``, at module level or inside functions (lazy imports count: they still tie the
    modules together). ``from .x import y`` points at ``x.y`` when that is a module."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.append(sub if sub in modules else module)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert {"ssi_dask.blockwise", "ssi_dask.bench.demo", "ssi_dask.ssi.model"} <= set(graph)
    assert "ssi_dask.multivolume" in graph["ssi_dask.xarray_support"]  # lazy imports are seen
    found = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
    detail = [sorted(f"{a} -> {b}" for a in c for b in graph[a] if b in c) for c in found]
    assert not found, f"import cycles: {detail}"


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_imports():
    """Every module of the package imports (with the extras installed, as in the tests)."""
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_runtime_modules_do_not_import_bench_code():
    """Nothing outside ssi_dask.bench (and cli's demo command) imports ssi_dask.bench."""
    graph = import_graph()
    users = sorted(
        a
        for a, targets in graph.items()
        if not a.startswith("ssi_dask.bench")
        and any(t.startswith("ssi_dask.bench") for t in targets)
    )
    assert users == ["ssi_dask.cli"]  # ssi-dask demo, imported inside its command
