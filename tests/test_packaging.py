"""The layout works from a checkout and from a wheel: the checkout's top-level ``kernels/`` folder never shadows
the Hugging Face ``kernels`` package, ``python -m pemoe`` is the ``pemoe`` command, ``pemoe bench`` runs from an
installed wheel, and imports flow one way (kernels import nothing else of pemoe; benchmarks never the CLI)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: pathlib.Path, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | kw.pop("env", {})
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_checkout_root_does_not_shadow_the_kernels_package():
    """From the checkout root (``python -m pytest``, ``python -c``: the root comes first on sys.path),
    transformers' hub-kernels integration imports, and ``import kernels`` is the installed package."""
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must not be a top-level regular package"
    code = (
        "import transformers.models.t5.modeling_t5, transformers.integrations.hub_kernels\n"
        "import kernels, pemoe.kernels.triton, pemoe.kernels.pallas\n"
        "print(kernels.__file__)\n"
    )
    done = _run([sys.executable, "-c", code], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    importlib.metadata.distribution("kernels")  # transformers depends on it: installed wherever transformers is
    assert not pathlib.Path(done.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), done.stdout


def test_python_dash_m_pemoe_is_the_pemoe_command():
    args = ["params", "--sizes", "small", "--methods", "MoV-10"]
    by_module = _run([sys.executable, "-m", "pemoe", *args], cwd=ROOT)
    assert by_module.returncode == 0, by_module.stderr[-3000:]
    script = pathlib.Path(sys.executable).parent / "pemoe"
    by_script = _run([str(script), *args], cwd=ROOT)
    assert by_script.returncode == 0, by_script.stderr[-3000:]
    assert by_module.stdout == by_script.stdout and "small" in by_module.stdout
    assert _run([sys.executable, "-m", "pemoe", "nope"], cwd=ROOT).returncode == 2


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_imports_flow_one_way():
    """kernels/ imports only pemoe.kernels (never the rest of pemoe, nor transformers); bench/ never imports the
    command line; nothing imports the top-level folders by their checkout names."""
    for path in (ROOT / "kernels").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top != "transformers" and top not in ("kernels", "bench"), f"{path}: {name}"
            assert top != "pemoe" or name.startswith("pemoe.kernels"), f"{path}: {name}"
    for folder in ("bench", "pemoe", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                assert name.split(".")[0] not in ("kernels", "bench"), f"{path}: {name}"
                if folder == "bench":
                    assert not name.startswith("pemoe.cli") and not name.startswith("pemoe.train.cli"), path
    # and at run time: loading every benchmark module does not load the command line
    code = (
        "import importlib, pkgutil, sys, pemoe.bench as b\n"
        "skip = {'pemoe.bench.__main__', 'pemoe.bench.conftest', 'pemoe.bench.test_bench'}\n"
        "for m in pkgutil.iter_modules(b.__path__, 'pemoe.bench.'):\n"
        "    if m.name not in skip: importlib.import_module(m.name)\n"
        "assert 'pemoe.cli' not in sys.modules, 'a benchmark module imported pemoe.cli'\n"
        "print(len([n for n in sys.modules if n.startswith('pemoe.bench.')]))\n"
    )
    done = _run([sys.executable, "-c", code], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout) >= 8


def test_wheel_installs_a_working_pemoe_bench(tmp_path):
    """Build a wheel, install it (no editable link to this checkout) into a fresh virtual environment whose
    dependencies come from this one, and run a tiny ``pemoe bench`` and ``python -m pemoe.bench`` elsewhere."""
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(dist)]
    build += ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    done = _run([*build, str(ROOT)], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = dist.glob("pemoe-*.whl")
    env_dir = tmp_path / "venv"
    done = _run([sys.executable, "-m", "venv", str(env_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    python = env_dir / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    # the dependencies (torch, numpy, ...) from this environment, after the fresh one's own site-packages
    (pathlib.Path(site.stdout.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check"]
    done = _run([*pip, str(wheel)], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [str(python), "-c", "import pemoe, pemoe.bench.harness as h; print(pemoe.__file__, h.__file__)"], cwd=elsewhere
    )
    assert where.returncode == 0, where.stderr[-3000:]
    assert str(ROOT) not in where.stdout and str(env_dir) in where.stdout, where.stdout
    tiny = ["--ops", "mov_linear", "--tokens", "8", "--shape-scale", "16", "--dtypes", "float32", "--rounds", "1"]
    tiny += ["--modes", "fwd", "--providers", "pemoe-torch"]
    env = {"TRITON_CACHE_DIR": str(tmp_path / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    for command in ([str(env_dir / "bin" / "pemoe"), "bench"], [str(python), "-m", "pemoe.bench"]):
        out = elsewhere / pathlib.Path(command[-1]).name
        done = _run([*command, *tiny, "--out", str(out)], cwd=elsewhere, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = (out / "results.csv").read_text().splitlines()
        assert any(",pemoe-torch,fwd," in r and "time_ms" in r for r in rows), rows[:5]
    shutil.rmtree(env_dir)


OWN_OPS = {
    "pemoe.bench.mov_linear": ["mov_linear"],
    "pemoe.bench.llama_step": ["llama_step"],
    "pemoe.bench.jax_ops": ["jax_mov_linear", "jax_molora_linear", "jax_mov_ffn"],
}


@pytest.mark.parametrize("module", list(OWN_OPS))
def test_bench_op_modules_run_their_own_op(module, tmp_path, monkeypatch):
    """``python -m pemoe.bench.<op>`` defaults ``--ops`` to that module's own ops."""
    from pemoe.bench import runner

    seen = {}
    monkeypatch.setattr(runner, "run", lambda args, benches: seen.setdefault("ops", args.ops) and 0)
    assert importlib.import_module(module).main(["--out", str(tmp_path)]) == 0
    assert seen["ops"] == OWN_OPS[module]


#: The public names of ``pemoe`` and the module that defines each (the package loads them on first use).
PUBLIC = {
    "pemoe.ops": ("mov", "mov_linear", "mov_ffn", "molora_linear", "molora_adapter"),
    "pemoe.adapters": (
        "inject", "MoVConfig", "IA3Config", "MoLoRAConfig", "LoRAConfig", "save_adapter", "load_adapter",
        "save_pretrained", "from_pretrained", "export_peft", "import_peft", "merge", "unmerge", "is_merged",
        "sentence_routing",
    ),
    "pemoe.router_health": ("RouterMonitor", "routing_by_task", "plot_routing"),
    "pemoe.banks": ("load_adapters", "add_adapter", "remove_adapter", "bank_names", "adapter_batch"),
}  # fmt: skip
SUBMODULES = ("ops", "reference", "adapters", "models", "router_health", "hf")


def test_pemoe_loads_its_public_names_on_first_use():
    """``import pemoe`` imports no framework; every public name, ``from pemoe import *``, ``dir()`` and the
    submodules (public or not) still resolve, to the defining module's objects."""
    code = (
        "import importlib, json, sys\n"
        "import pemoe\n"
        "cold = sorted(m for m in ('torch', 'jax', 'transformers') if m in sys.modules)\n"
        f"public, submodules = {PUBLIC!r}, {SUBMODULES!r}\n"
        "def defined(m, n):\n"
        "    return getattr(importlib.import_module(m), n)\n"
        "same = all(getattr(pemoe, n) is defined(m, n) for m, ns in public.items() for n in ns)\n"
        "subs = all(getattr(pemoe, s) is importlib.import_module('pemoe.' + s) for s in submodules)\n"
        "star = {}\n"
        "exec('from pemoe import *', star)\n"
        "try:\n"
        "    pemoe.no_such_name\n"
        "    missing = 'resolved'\n"
        "except AttributeError as e:\n"
        "    missing = str(e)\n"
        "print(json.dumps(dict(cold=cold, same=same, subs=subs, all=pemoe.__all__, dir=dir(pemoe),\n"
        "    star=sorted(n for n in star if n != '__builtins__'), banks=pemoe.banks.__name__, missing=missing,\n"
        "    version=pemoe.__version__)))\n"
    )
    done = _run([sys.executable, "-c", code], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["cold"] == [], got["cold"]
    assert got["same"] and got["subs"]
    names = {n for ns in PUBLIC.values() for n in ns} | set(SUBMODULES) | {"__version__"}
    assert set(got["all"]) == names and len(got["all"]) == len(names)
    assert names <= set(got["dir"])
    assert set(got["star"]) == names
    assert got["banks"] == "pemoe.banks" and got["version"] == "0.1.0"
    assert got["missing"] == "module 'pemoe' has no attribute 'no_such_name'"
