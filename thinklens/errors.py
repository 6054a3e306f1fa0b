"""One exception family for everything a user can get wrong.

Every message repeats the bad value and says what the valid choices are or how to fix
it, e.g. ``unknown site 'blocks.3.hook_resid'; did you mean 'blocks.3.hook_resid_post'?``
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ThinklensError(Exception):
    """Base class of every error thinklens raises on purpose."""


class ConfigError(ThinklensError, ValueError):
    """A bad argument or configuration value."""


class ModelLoadError(ThinklensError):
    """A model could not be found or loaded (missing path, unsupported format)."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one TransformerLens's bridge supports."""


class SiteError(ThinklensError, KeyError):
    """An unknown hook name or a glob that matches none."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PositionError(ThinklensError, IndexError):
    """Positions out of range for a trace, or an unknown position selector."""


class TokenizerMismatchError(ThinklensError):
    """A trace tokenized by a different tokenizer than the model's."""


class BudgetError(ThinklensError, MemoryError):
    """A capture whose estimated size exceeds the memory budget."""


class StoreError(ThinklensError):
    """An activation store that is missing, incompatible, truncated or altered."""


class ThinklensWarning(UserWarning):
    """Something a user should know but that does not stop the computation, e.g. traces
    that lack the thinking positions or sentences a request asks for (their rows are
    empty). Silence it with ``warnings.simplefilter("ignore", ThinklensWarning)``."""


def _closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The few valid names closest to ``name``, for 'did you mean' messages."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` did you mean 'a' or 'b'?`` or an empty string when nothing is close."""
    near = _closest(name, choices)
    if not near:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in near) + "?"


__all__ = ["ThinklensError", "ConfigError", "ModelLoadError", "UnsupportedArchitectureError",
           "SiteError", "PositionError", "TokenizerMismatchError", "BudgetError", "StoreError",
           "ThinklensWarning", "did_you_mean"]
