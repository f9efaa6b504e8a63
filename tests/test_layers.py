"""The package's structure, read from its source: imports only point down the layers, none hides in a function,
there are no import cycles, and files stay small enough to read.

Layers, bottom up: 1 core (``jaxdebias/*.py``) <- 2 models (``jaxdebias.models``) <- 3 checkpoints
(``jaxdebias.convert``) <- 4 applications (``jaxdebias.cli``, ``jaxdebias.eval``, ``jaxdebias.toy``, the
``python -m jaxdebias`` entry point).
"""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# installed package name -> source folder (pyproject's package-dir)
SOURCES = {"jaxdebias": "jaxdebias", "jaxdebias.models": "models", "jaxdebias.convert": "convert"}
APPS = ("jaxdebias.cli", "jaxdebias.eval", "jaxdebias.toy", "jaxdebias.__main__")
# one model a reader holds in their head may be longer than the rest
LONG_OK = {"jaxdebias.models.llama": 420}
MAX_LINES = 360


def layer(module: str) -> int:
    if module == APPS[-1] or any(module == a or module.startswith(a + ".") for a in APPS):
        return 4
    if module.startswith("jaxdebias.convert"):
        return 3
    if module.startswith("jaxdebias.models"):
        return 2
    return 1


def modules() -> dict[str, str]:
    """Every project module -> its file."""
    found = {}
    for package, folder in SOURCES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, base)
            if package == "jaxdebias" and rel.split(os.sep)[0] in ("models", "convert"):
                continue
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in filenames:
                if name.endswith(".py"):
                    mod = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    found[mod] = os.path.join(dirpath, name)
    return found


MODULES = modules()


def imports(path: str, module: str):
    """(imported project module, line, inside a function) for every import statement of a file."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for name in names:
                if name == "jaxdebias" or name.startswith("jaxdebias."):
                    out.append((name, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def test_the_layout_is_found():
    for expected in ("jaxdebias", "jaxdebias.prune", "jaxdebias.models.llava", "jaxdebias.models.generate",
                     "jaxdebias.convert.load", "jaxdebias.convert.write"):
        assert expected in MODULES
    assert layer("jaxdebias.methods.fastv") == 1 and layer("jaxdebias.models.rows") == 2
    assert layer("jaxdebias.convert.load") == 3 and layer("jaxdebias.cli.main") == 4


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_sit_at_the_top(module):
    for target, line, in_function in imports(MODULES[module], module):
        where = f"{os.path.relpath(MODULES[module], ROOT)}:{line} imports {target}"
        assert not in_function, f"{where} inside a function; import project modules at the top"
        assert layer(target) <= layer(module), f"{where}, a higher layer ({layer(target)} > {layer(module)})"


def test_no_import_cycles():
    graph = {m: {t for t, _, f in imports(p, m) if not f and t in MODULES and t != m} for m, p in MODULES.items()}
    state = {}

    def walk(m, stack):
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                raise AssertionError(" -> ".join(stack + [m, t]))
            if t not in state:
                walk(t, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            walk(m, [])


def test_the_core_needs_no_model_or_flax():
    for module, path in MODULES.items():
        if layer(module) == 1:
            tree = ast.parse(open(path).read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(n.split(".")[0] in ("flax", "torch", "transformers", "matplotlib")
                                   for n in names), f"{path} imports {names}: the core is jax, chex and optax"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_readable(module):
    with open(MODULES[module]) as f:
        n = sum(1 for _ in f)
    limit = LONG_OK.get(module, MAX_LINES)
    assert n <= limit, f"{module} has {n} lines (> {limit}); split it by concern"


def test_every_package_is_installed():
    """Each folder with an __init__.py is listed in pyproject's packages (else `pip install .` leaves it out)."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    packages = {m for m, path in MODULES.items() if path.endswith("__init__.py")}
    assert packages <= listed, sorted(packages - listed)


BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPTS = sorted(os.path.join(BENCHMARKS, f) for f in os.listdir(BENCHMARKS) if f.endswith(".py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_benchmarks_import_the_package_at_the_top(path):
    """The benchmarks sit above every layer: they may import any project module, at the top, and only modules
    that exist."""
    for target, line, in_function in imports(path, "benchmarks." + os.path.basename(path)[:-3]):
        assert not in_function, f"{os.path.relpath(path, ROOT)}:{line} imports {target} inside a function"
        assert target == "jaxdebias" or target in MODULES, f"{os.path.relpath(path, ROOT)}:{line}: no {target}"


METHOD_NAMES = re.compile(r"fastv|pdrop|pyramid|sparsevlm|himap|tokencarve|visionzip|illava", re.I)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("jaxdebias.models")))
def test_the_models_name_no_method(module):
    """A method is one module of ``jaxdebias.methods``: the models' code (docstrings and comments aside) never
    names one, so the prefill loop and generation treat every method alike."""
    tree = ast.parse(open(MODULES[module]).read())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            body[0].value.value = ""  # a docstring
    code = ast.unparse(tree)
    found = sorted(set(m.group(0) for m in METHOD_NAMES.finditer(code)))
    assert not found, f"{MODULES[module]} names {found} outside docstrings and comments"


FAMILY_CLASSES = re.compile(r"isinstance\([^)]*\b(Llava\w*|VideoLlava|\w+LoadedModel)\b")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("jaxdebias.cli")))
def test_the_commands_ask_the_model(module):
    """The commands ask the loaded model (``loaded.check``, ``loaded.media``, ``loaded.request`` ...: its family's
    ``LoadedModel``, picked by ``model_type``) instead of testing its class; only ``resolve_model`` tells a loaded
    model from a path."""
    found = [m.group(0) for m in FAMILY_CLASSES.finditer(open(MODULES[module]).read())
             if not m.group(0).startswith("isinstance(model, LoadedModel")]
    assert not found, f"{MODULES[module]} picks a model family with {found}"
