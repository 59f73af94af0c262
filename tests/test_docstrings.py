"""Every docstring example in the library and the training program runs, and every public
function (what the packages re-export) carries one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import lora_jax
import train

MODULES = sorted(m.name for pkg in (lora_jax, train) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))
PUBLIC = (lora_jax, lora_jax.models, lora_jax.generation, lora_jax.interop, lora_jax.sharding, lora_jax.training)


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_function_has_an_example():
    missing = [f"{pkg.__name__}.{n}" for pkg in PUBLIC for n in pkg.__all__
               if inspect.isfunction(getattr(pkg, n)) and ">>>" not in (inspect.getdoc(getattr(pkg, n)) or "")]
    assert not missing, f"public functions without a docstring example: {missing}"


def test_public_names_resolve():
    for pkg in PUBLIC:
        for n in pkg.__all__:
            assert hasattr(pkg, n), f"{pkg.__name__}.__all__ names {n!r}, which it does not define"
