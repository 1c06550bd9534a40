"""The docstring examples of nested_jax.optim run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import nested_jax.optim

MODULES = sorted(
    m.name for m in pkgutil.iter_modules(nested_jax.optim.__path__, "nested_jax.optim.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_every_public_function_has_an_example():
    for name in nested_jax.optim.__all__:
        obj = getattr(nested_jax.optim, name)
        if callable(obj) and not isinstance(obj, type) and name.startswith(("scale_by", "m3")):
            assert ">>>" in (obj.__doc__ or ""), name
