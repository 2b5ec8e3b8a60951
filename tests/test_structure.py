"""The package's shape: no module imports one that imports it back (directly or through others, lazy imports
included), and no private name (``_x``) is imported from another module."""
import ast
import os

import laet_fast

ROOT = os.path.dirname(laet_fast.__file__)


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = "laet_fast." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: str, modules: dict) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in the file, relative ones resolved."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, None) if full in modules else (base, alias.name))
    return out


def test_no_import_cycles_and_no_private_imports():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        graph[name] = set()
        for module, imported in _imports(name, path, modules):
            if module in modules and module != name:
                graph[name].add(module)
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append(f"{name} imports {module}.{imported}")
    assert not private

    def reaches(start: str) -> set:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(name for name in graph if name in reaches(name))
    assert not cycles, f"modules on an import cycle: {cycles}"
