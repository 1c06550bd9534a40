"""The package layering: `kernels/` is a leaf (plain arrays; it imports
nothing from the engine or the models), and models reach the memory kernels only through the
engine's front door, `memory.apply(path="pallas")`.  The one kernel a model calls itself is
softmax attention's (`kernels/splash.py`): attention has no engine in between."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "nested_jax"


def _imports(package: str) -> dict[str, set[str]]:
    """{file: every nested_jax module it imports, at any depth of the file}."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        found[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("nested_jax")}
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("kernels", ("nested_jax.memory", "nested_jax.models", "nested_jax.train")),
    ("models", ("nested_jax.kernels",)),
    ("memory", ("nested_jax.models", "nested_jax.train")),
])
def test_no_import_runs_against_the_layering(package, forbidden):
    # `from nested_jax.kernels import splash` lists the package too; any other name it
    # imports from there is still caught.
    allowed = ({"nested_jax.kernels", "nested_jax.kernels.splash"} if package == "models"
               else set())
    bad = {f: sorted(n for n in names if n.startswith(forbidden) and n not in allowed)
           for f, names in _imports(package).items()}
    assert not {f: n for f, n in bad.items() if n}, bad


def test_the_check_sees_imports():
    """The scan is not vacuous: it finds the engine's own use of the kernels."""
    used = set().union(*_imports("memory").values())
    assert "nested_jax.kernels.plan" in used and "nested_jax.memory.level" in used
