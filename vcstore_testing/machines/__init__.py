"""Hypothesis state machines that check a store backend against a model.

Each machine is a `hypothesis.stateful.RuleBasedStateMachine` whose rules send
one synchronous command to one worker process. Point a machine at another
backend by subclassing it and setting ``store_factory``. The machines carry no
``@settings``: pass settings to `hypothesis.stateful.run_state_machine_as_test`
or load a settings profile.
"""

import importlib

__all__ = [
    "CrashSafetyMachine",
    "LockExclusivityMachine",
    "RoundTripMachine",
    "StoreMachine",
    "TokenBookkeepingMachine",
]

_HOMES = {
    "CrashSafetyMachine": "crash_safety",
    "LockExclusivityMachine": "lock_exclusivity",
    "RoundTripMachine": "round_trip",
    "StoreMachine": "base",
    "TokenBookkeepingMachine": "token_bookkeeping",
}


def __getattr__(name: str):
    # Each machine is imported when first named, so one machine's module can
    # be used without importing the others.
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
