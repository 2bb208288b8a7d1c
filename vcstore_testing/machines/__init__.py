"""Hypothesis state machines that check a store backend against a model.

Each machine is a `hypothesis.stateful.RuleBasedStateMachine` whose rules send
one synchronous command to one worker process. Point a machine at another
backend by subclassing it and setting ``store_factory``. The machines carry no
``@settings``: pass settings to `hypothesis.stateful.run_state_machine_as_test`
or load a settings profile.
"""

from .lock_exclusivity import LockExclusivityMachine

__all__ = ["LockExclusivityMachine"]
