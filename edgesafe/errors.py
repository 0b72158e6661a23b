"""User-facing errors: one clear line each; the CLI prints them without a traceback and exits 2."""


class EdgesafeError(Exception):
    """Base of every error caused by the user's input (recipe, paths, models, budgets)."""

    exit_code = 2


class RecipeError(EdgesafeError):
    """A recipe file that is missing, unreadable or invalid."""


class ModelLoadError(EdgesafeError):
    """A model folder, zoo name or weights file that cannot be loaded."""


class BudgetError(EdgesafeError):
    """A compression budget that cannot be reached."""


class CheckpointError(EdgesafeError):
    """A checkpoint that is missing, truncated or from another model."""


class DiskFullError(EdgesafeError):
    """A write that found no space left; what was there before it is intact."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name when the message is empty), for the
    one-line errors edgesafe shows in place of a third-party traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
