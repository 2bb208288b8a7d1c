"""The bound on the time hypothesis spends shrinking a failure, shared by the plugin and the CLI."""

from __future__ import annotations

__all__ = ["set_shrink_bound"]


def set_shrink_bound(seconds: float) -> float:
    """Set how many seconds hypothesis may shrink each failure; return the previous bound.

    A failing machine program can take minutes to shrink, because each test
    case starts processes. Hypothesis then reports the shortest program found
    so far, with a warning that still speaks of its default of five minutes.
    """
    # Hypothesis's source marks this module constant as monkeypatchable for another bound.
    from hypothesis.internal.conjecture import engine

    previous = engine.MAX_SHRINKING_SECONDS
    engine.MAX_SHRINKING_SECONDS = seconds
    return previous
