"""Every planted bug of tools/mutants.py still applies: its text is in its file exactly once.
A refactor that moves the code a mutant plants its bug in fails here, at once, instead of
leaving the mutant to report "not found" when the mutation check is next run."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mutants():
    spec = importlib.util.spec_from_file_location("mutants",
                                                  os.path.join(ROOT, "tools", "mutants.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


MUTANTS = _mutants()


@pytest.mark.parametrize("m", MUTANTS.MUTANTS, ids=lambda m: m.id)
def test_every_mutant_still_applies(m):
    assert MUTANTS.applies(m) == "", f"{m.id}: {MUTANTS.applies(m)}"
    assert m.original != m.replacement
