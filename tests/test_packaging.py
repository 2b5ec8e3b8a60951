"""laet_fast installs its kernels as laet_fast.kernels, never as a top-level `kernels` package.

The PyPI distribution `kernels` (Hugging Face's hub-kernel loader) owns that import name, and
transformers needs it to build a model. From the repository root, where the source folder
kernels/ is on sys.path, `import kernels` must still give Hugging Face's package, with laet_fast
run from the source checkout, an editable install or a wheel alike. Each case runs in a fresh
subprocess started in the repo root, as a user pasting the README's examples would.
"""
import ast
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = sorted(os.path.splitext(os.path.basename(p))[0]
                        for p in glob.glob(os.path.join(REPO, "kernels", "*.py")))

# Drops the editable install's import hooks, so that laet_fast is found as plain files on sys.path
# (the checkout itself from the repo root, or an unpacked wheel).
WITHOUT_EDITABLE = textwrap.dedent(
    """
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    """
)

CHECK = textwrap.dedent(
    f"""
    import importlib, os
    import kernels
    assert hasattr(kernels, "CUDAProperties"), f"`import kernels` gave {{kernels!r}}, not Hugging Face's package"
    import torch, transformers
    from transformers import LlamaForCausalLM
    import laet_fast, laet_fast.kernels
    for name in {KERNEL_MODULES!r}:
        importlib.import_module("laet_fast.kernels." + name)
    from laet_fast import find_layers
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    model = LlamaForCausalLM(config)
    out = model(torch.randint(0, 97, (2, 5)))
    assert out.logits.shape == (2, 5, 97) and torch.isfinite(out.logits).all()
    assert len(find_layers(model)) == 2
    print("OK", os.path.dirname(laet_fast.__file__), os.path.dirname(laet_fast.kernels.hidden_stats.__file__))
    """
)

needs_hf_kernels = pytest.mark.skipif(
    importlib.util.find_spec("kernels") is None
    or not os.path.isfile(getattr(importlib.util.find_spec("kernels"), "origin", None) or ""),
    reason="Hugging Face's `kernels` package is not installed (pip install -e '.[test]')",
)


def _run(script, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK"), result.stdout
    return result.stdout.split()[1:]


def _editable_installed():
    spec = importlib.util.find_spec("laet_fast")
    probe = "import laet_fast, os; print(os.path.dirname(laet_fast.__file__))"
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, timeout=120)
    return spec is not None and out.returncode == 0 and out.stdout.strip() == os.path.join(REPO, "laet_fast")


@needs_hf_kernels
def test_source_checkout_from_repo_root():
    package, kernels_dir = _run(WITHOUT_EDITABLE + CHECK, REPO)
    assert package == os.path.join(REPO, "laet_fast")
    assert kernels_dir == os.path.join(REPO, "kernels")


@needs_hf_kernels
def test_editable_install_from_repo_root_and_elsewhere(tmp_path):
    if not _editable_installed():
        pytest.skip("laet_fast is not installed in editable mode (pip install -e .)")
    for cwd in (REPO, str(tmp_path)):
        package, kernels_dir = _run(CHECK, cwd)
        assert package == os.path.join(REPO, "laet_fast")
        assert kernels_dir == os.path.join(REPO, "kernels")


@needs_hf_kernels
def test_wheel_install(tmp_path):
    """The wheel puts kernels/ at laet_fast/kernels/ and nothing at the top level `kernels`."""
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None:
        pytest.skip("this venv's setuptools cannot build wheels itself (setuptools >= 70.1 can)")
    source = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    files = [name for name in listed if os.path.isfile(os.path.join(REPO, name))]
    if not files:
        pytest.skip("not a git checkout")
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert not any(n.startswith("kernels/") for n in names), names
    assert {f"laet_fast/kernels/{m}.py" for m in KERNEL_MODULES} <= set(names)
    # From elsewhere the unpacked wheel is what Python finds; from the repo root the checkout wins.
    package, kernels_dir = _run(WITHOUT_EDITABLE + CHECK, str(tmp_path), pythonpath=str(site))
    assert package == str(site / "laet_fast") and kernels_dir == str(site / "laet_fast" / "kernels")
    package, _ = _run(WITHOUT_EDITABLE + CHECK, REPO, pythonpath=str(site))
    assert package == os.path.join(REPO, "laet_fast")


def test_no_top_level_kernels_package_installed(tmp_path):
    """Outside the repo, `kernels` must not resolve to laet_fast's folder."""
    probe = "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.path.join(REPO, "kernels") not in result.stdout


WITHOUT_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # `import triton` now fails as on a machine without its wheel
    import laet_fast, laet_fast.cli as cli
    try:
        cli.main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0, stop.code
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--budget-gb", "12"]) == 0
    import importlib, torch, transformers
    for name in {modules!r}:
        importlib.import_module("laet_fast.kernels." + name)
    from laet_fast import LayerProbe
    from laet_fast.kernels.hidden_stats import accumulate_hidden_stats, hidden_stats_reference, new_stats_buffer
    torch.manual_seed(0)
    h_in, h_out, mask = torch.randn(21, 40), torch.randn(21, 40), torch.rand(21) > 0.3
    acc = new_stats_buffer(1, "cpu")
    accumulate_hidden_stats(h_in, h_out, mask, acc[0])
    torch.testing.assert_close(acc[0].double(), hidden_stats_reference(h_in, h_out, mask), rtol=1e-5, atol=1e-5)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (2, 5))
    with LayerProbe(model, grad_norms=True) as probe:
        model(input_ids=ids, labels=ids).loss.backward()
    scores = probe.scores()
    assert all(torch.isfinite(torch.as_tensor(scores[m])).all() for m in ("grad_norm", "block_influence"))
    assert sys.modules["triton"] is None
    print("OK")
    """
)


def test_runs_without_triton(tmp_path):
    """triton is required only where it has wheels (Linux): elsewhere the CLI, the planner and the
    PyTorch reference kernels run without it."""
    script = WITHOUT_TRITON.replace("{modules!r}", repr(KERNEL_MODULES))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", WITHOUT_EDITABLE + script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("OK")
    assert "triton is not installed; running the PyTorch reference kernels" in result.stderr


def _declared_requirements():
    """{extra or "": [Requirement]} as setup.py declares them (read from its source, not installed)."""
    from packaging.requirements import Requirement

    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords
                if k.arg in ("install_requires", "extras_require")}
    declared = {"": [Requirement(r) for r in keywords["install_requires"]]}
    declared.update({extra: [Requirement(r) for r in reqs] for extra, reqs in keywords["extras_require"].items()})
    return declared


def _third_party_imports():
    """Top-level names of the packages that laet_fast/ and kernels/ import, stdlib and our own left out."""
    names = set()
    for path in glob.glob(os.path.join(REPO, "laet_fast", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "kernels", "*.py")):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"laet_fast", "kernels", "__future__"}


def test_every_imported_package_is_declared():
    from packaging.utils import canonicalize_name

    declared = {canonicalize_name(r.name) for reqs in _declared_requirements().values() for r in reqs}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports()):
        dists = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in setup.py: {missing}"


def test_triton_required_only_where_it_has_wheels():
    (triton,) = [r for r in _declared_requirements()[""] if r.name == "triton"]
    assert triton.marker is not None
    assert triton.marker.evaluate({"sys_platform": "linux"})
    assert (not triton.marker.evaluate({"sys_platform": "darwin"})
            and not triton.marker.evaluate({"sys_platform": "win32"}))


def test_constraints_pin_every_declared_dependency_and_the_readme_uses_them():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in open(os.path.join(REPO, "constraints.txt"), encoding="utf-8"):
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            assert [s.operator for s in requirement.specifier] == ["=="], line
            pins[canonicalize_name(requirement.name)] = requirement
    declared = _declared_requirements()
    for extra in ("", "test", "bench", "demo"):
        for requirement in declared[extra]:
            name = canonicalize_name(requirement.name)
            assert name in pins, f"constraints.txt does not pin {name} (setup.py {extra or 'install_requires'})"
            (version,) = [s.version for s in pins[name].specifier]
            assert requirement.specifier.contains(version), (
                f"constraints.txt pins {name}=={version} outside {requirement}")
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    commands = [line for line in readme.splitlines() if line.startswith("pip install torch==") and "&&" in line]
    assert len(commands) == 2, commands  # the main job and the tests
    for command in commands:
        installs = [part for part in command.split("&&") if "pip install" in part and "torch==" not in part]
        assert installs and all("-c constraints.txt" in part for part in installs), command
