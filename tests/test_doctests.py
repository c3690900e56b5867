"""The docstring examples of the installed package run and say what they show."""
import doctest
import importlib

import pytest

MODULES = ["kvmmu", "kvmmu._types", "kvmmu.roles", "kvmmu.engine", "kvmmu.variants",
           "kvmmu.arch", "kvmmu.replay", "kvmmu.workloads", "kvmmu.analysis",
           "kvmmu.traces", "kvmmu.access", "kvmmu.accessc"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0


def test_readme_examples():
    from pathlib import Path

    readme = Path(__file__).resolve().parent.parent / "README.md"
    res = doctest.testfile(str(readme), module_relative=False,
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
