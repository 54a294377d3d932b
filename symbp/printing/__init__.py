"""Printing for people: derivations, matrix formulas, the computational graph, plots.

``derive`` and ``matrix_formulas`` need SymPy only; ``graph.render`` runs Graphviz's
``dot`` and ``plots`` imports matplotlib, each on first use.
"""

from .derive import Derivation, Row, derive
from .formulas import Formulas, matrix_formulas

__all__ = ["Derivation", "Row", "derive", "Formulas", "matrix_formulas"]
