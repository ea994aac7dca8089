"""User-facing errors.

Every mistake a user can make (a bad config key, a missing data path, more ways than classes)
raises :class:`UserError` with a message that names the problem and the fix. The CLI prints it in
one or two lines and exits with status 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, with a message that says how to fix it.

    Example:
        >>> raise UserError("ways=30 but the split has 20 classes; use --ways 20 or fewer")
        Traceback (most recent call last):
        ...
        metaml.errors.UserError: ways=30 but the split has 20 classes; use --ways 20 or fewer
    """


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ``" (did you mean 'x'?)"`` hint for ``name`` among ``choices``, or ``""``.

    Example:
        >>> did_you_mean("conv5", ["conv4", "resnet12", "mlp"])
        " (did you mean 'conv4'?)"
    """
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def unknown_name_error(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """A :class:`UserError` for an unknown registry name, listing the known ones.

    Example:
        >>> str(unknown_name_error("backbone", "conv5", ["conv4", "mlp"]))
        "unknown backbone 'conv5' (did you mean 'conv4'?); known: conv4, mlp"
    """
    known = sorted(choices)
    return UserError(
        f"unknown {kind} {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}"
    )
