"""Argument checks whose errors name the argument, what was expected and what was given.

Every integer, float, choice and name check in attnlab goes through here, so a typo gets
the same "did you mean" wherever it is made, and ``True`` is never taken for ``1``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import numpy as np

__all__ = ["close_matches", "did_you_mean", "check_int", "check_float", "check_choice",
           "check_bool"]


def close_matches(value, choices: Iterable, *, n: int = 2, cutoff: float = 0.5) -> list[str]:
    """The ``n`` entries of ``choices`` closest to ``value`` (as strings; maybe none)."""
    return difflib.get_close_matches(str(value), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(value, choices: Iterable, *, n: int = 2, cutoff: float = 0.5,
                 style: str = "; ") -> str:
    """``"; did you mean 'x' or 'y'?"`` for the closest ``choices``, or ``""`` when none
    is close. ``style="paren"`` gives ``" (did you mean 'x'?)"`` for use inside a list."""
    close = close_matches(value, choices, n=n, cutoff=cutoff)
    if not close:
        return ""
    text = f"did you mean {' or '.join(map(repr, close))}?"
    return f" ({text})" if style == "paren" else f"; {text}"


def _where(who: str) -> str:
    return f"{who}: " if who else ""


def check_int(name: str, value, *, low: int | None = 1, high: int | None = None,
              nullable: bool = False, who: str = "") -> int | None:
    """``value`` as an int in ``[low, high]``, else ``TypeError`` (not an int: ``bool`` is
    refused, since ``True`` must not silently mean 1) or ``ValueError`` (out of range)."""
    if value is None and nullable:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        kind = "an int" + (" or None" if nullable else "")
        raise TypeError(f"{_where(who)}{name} must be {kind}; "
                        f"got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{_where(who)}{name} must be {bounds}; got {value!r}")
    return int(value)


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                high_inclusive: bool = True, nullable: bool = False, who: str = "") -> float | None:
    """``value`` as a finite float in ``[low, high]`` (``[low, high)`` with
    ``high_inclusive=False``), else ``TypeError`` or ``ValueError``."""
    if value is None and nullable:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{_where(who)}{name} must be a float; "
                        f"got {type(value).__name__} {value!r}")
    x = float(value)
    above = high is not None and (x > high if high_inclusive else x >= high)
    if x != x or x in (float("inf"), float("-inf")) or (low is not None and x < low) or above:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        closing = "]" if high_inclusive and high is not None else ")"
        raise ValueError(f"{_where(who)}{name} must be a finite number in [{lo}, {hi}{closing}; "
                         f"got {value!r}")
    return x


def check_choice(name: str, value, choices: Iterable, *, who: str = ""):
    """``value`` if it is one of ``choices``, else ``ValueError`` with the closest ones."""
    choices = list(choices)
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{_where(who)}{name} must be one of {', '.join(map(repr, choices))}; "
                     f"got {value!r}{did_you_mean(value, choices)}")


def check_bool(name: str, value, *, who: str = "") -> bool:
    """``value`` as a Python bool, else ``TypeError``. Only ``bool`` (and NumPy's ``bool_``)
    passes: ``bool("no")`` is ``True``, so coercing would turn a typo into its opposite."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{_where(who)}{name} must be a bool; got {type(value).__name__} {value!r}")
