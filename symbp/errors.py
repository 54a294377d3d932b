"""The errors symbp raises: each names the culprit and what the user can do."""


class SymbpError(ValueError):
    """Base class of every error symbp raises on bad input."""


class ShapeError(SymbpError):
    """Two shapes disagree: in the expression, or between an array and its symbol."""


class UnsupportedError(SymbpError):
    """An expression head symbp cannot lower or differentiate."""


class InputError(SymbpError):
    """Arrays handed to a compiled function are missing, extra or of the wrong kind."""


class TrainingError(SymbpError):
    """Training stopped: a non-finite loss or parameter, or a bad checkpoint."""
