"""The pytest plugin of vcstore_testing: fixtures, options and hypothesis profiles.

pytest loads it through the ``pytest11`` entry point ``vcstore`` once the
``testing`` extra is installed; ``-p no:vcstore`` turns it off.

Fixtures (``pytest --fixtures`` shows their docstrings): ``vcstore_root``,
``vcstore_open``, ``vcstore_workers``, ``vcstore_probe``, ``vcstore_stress``
and ``vcstore_store_factory``, which a downstream ``conftest.py`` overrides to
run the others against its own backend.

Options, in the group "vcstore": ``--vcstore-workers``,
``--vcstore-start-method``, ``--vcstore-profile`` and
``--vcstore-shrink-seconds``. Each has an ini twin
(``vcstore_workers``...) and an environment variable (``VCSTORE_WORKERS``...).
The command line wins over the ini file, the ini file over the environment,
and the environment over the default. An empty value counts as unset.

The hypothesis profiles ``vcstore-fast`` (the default) and
``vcstore-thorough`` are registered when the plugin is imported, so that
``--hypothesis-profile`` and a ``conftest.py`` can name them too. A profile
chosen with hypothesis's own ``--hypothesis-profile`` wins over
``--vcstore-profile``.

At import time the plugin only registers the assert rewriting and the
profiles. The fixtures import the worker, probe and stress modules when a
test first uses them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import os
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Rewrite the asserts of the helper modules, so that a failing check shows the
# values involved. It must run before they are imported, which is why this
# module imports none of them at the top.
pytest.register_assert_rewrite(
    "vcstore_testing.history",
    "vcstore_testing.machines",
    "vcstore_testing.mutants",
    "vcstore_testing.probe",
    "vcstore_testing.stress",
    "vcstore_testing.workers",
)

from hypothesis import HealthCheck, settings  # noqa: E402 (after the rewrite hook)
from hypothesis.errors import InvalidArgument  # noqa: E402

from .shrinking import set_shrink_bound  # noqa: E402

__all__ = [
    "DEFAULT_PROFILE",
    "DEFAULT_START_METHOD",
    "DEFAULT_STRESS_SECONDS",
    "DEFAULT_WORKERS",
    "FAST_PROFILE",
    "THOROUGH_PROFILE",
    "StoreOpener",
    "VcstoreOptions",
    "register_profiles",
]

FAST_PROFILE = "vcstore-fast"
THOROUGH_PROFILE = "vcstore-thorough"

DEFAULT_WORKERS = 3
DEFAULT_START_METHOD = "fork"
DEFAULT_PROFILE = FAST_PROFILE

# The multiprocess start methods a pool accepts (those that the platform offers).
START_METHODS = ("fork", "spawn", "forkserver")

# Seconds of contention that vcstore_stress runs when the test passes no seconds.
DEFAULT_STRESS_SECONDS = 2.0


# ----------------------------------------------------------------------------
# Hypothesis profiles


def register_profiles() -> None:
    """Register the ``vcstore-fast`` and ``vcstore-thorough`` hypothesis profiles.

    Both inherit from the profile that is active when they are registered. That
    is hypothesis's ``default`` profile, or its ``ci`` profile when hypothesis
    detects a CI environment, which turns the example database off and
    derandomizes the runs. Every machine step drives real processes, so both
    profiles turn the deadline and the ``too_slow`` health check off.
    """
    parent = settings.get_profile(settings.get_current_profile_name())
    # For CI: a few seconds per machine, enough to catch the known bug kinds.
    settings.register_profile(
        FAST_PROFILE,
        parent,
        max_examples=25,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    # For a nightly job or before a release: minutes per machine.
    settings.register_profile(
        THOROUGH_PROFILE,
        parent,
        max_examples=500,
        stateful_step_count=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


register_profiles()


# ----------------------------------------------------------------------------
# Options


@dataclasses.dataclass(frozen=True)
class VcstoreOptions:
    """The plugin's option values for one pytest run, and where each came from.

    A ``*_source`` names the place that set the value, as an error message
    would: ``--vcstore-workers``, ``ini option vcstore_workers``,
    ``environment variable VCSTORE_WORKERS`` or ``default``.
    """

    workers: int
    workers_source: str
    start_method: str
    start_method_source: str
    # The profile that --vcstore-profile (or its twins) selects.
    profile: str
    profile_source: str
    # The profile that hypothesis's --hypothesis-profile selects, which wins.
    hypothesis_profile: str | None = None
    # None leaves hypothesis's own bound.
    shrink_seconds: float | None = None
    shrink_seconds_source: str = "default"


_OPTIONS_KEY = pytest.StashKey[VcstoreOptions]()
_PREVIOUS_PROFILE_KEY = pytest.StashKey[str]()
_PREVIOUS_SHRINK_KEY = pytest.StashKey[float]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vcstore", "vcstore: store backend checks with worker processes")
    group.addoption(
        "--vcstore-workers",
        metavar="N",
        default=None,
        help=(
            f"number of worker processes in vcstore_workers and vcstore_stress "
            f"(default {DEFAULT_WORKERS}; ini vcstore_workers; environment VCSTORE_WORKERS)"
        ),
    )
    group.addoption(
        "--vcstore-start-method",
        metavar="METHOD",
        default=None,
        help=(
            f"how worker processes start: {', '.join(START_METHODS)} (default "
            f"{DEFAULT_START_METHOD}; ini vcstore_start_method; environment "
            f"VCSTORE_START_METHOD)"
        ),
    )
    group.addoption(
        "--vcstore-shrink-seconds",
        metavar="SECONDS",
        default=None,
        help=(
            "bound on the seconds hypothesis spends shrinking each failure, for every "
            "hypothesis test of the run (default: hypothesis's own, 300; ini "
            "vcstore_shrink_seconds; environment VCSTORE_SHRINK_SECONDS)"
        ),
    )
    group.addoption(
        "--vcstore-profile",
        metavar="NAME",
        default=None,
        help=(
            f"hypothesis settings profile to load: {FAST_PROFILE}, {THOROUGH_PROFILE} "
            f"or any registered profile (default {DEFAULT_PROFILE}; ini vcstore_profile; "
            f"environment VCSTORE_PROFILE). --hypothesis-profile wins over it"
        ),
    )
    parser.addini(
        "vcstore_workers",
        f"number of worker processes (default {DEFAULT_WORKERS})",
        default=None,
    )
    parser.addini(
        "vcstore_start_method",
        f"how worker processes start: {', '.join(START_METHODS)} (default {DEFAULT_START_METHOD})",
        default=None,
    )
    parser.addini(
        "vcstore_shrink_seconds",
        "bound on the seconds hypothesis spends shrinking each failure",
        default=None,
    )
    parser.addini(
        "vcstore_profile",
        f"hypothesis settings profile to load (default {DEFAULT_PROFILE})",
        default=None,
    )


def _lookup(config: pytest.Config, name: str, default: str) -> tuple[str, str]:
    """Return the value of option *name* ("workers"...) and where it came from."""
    value = config.getoption(f"vcstore_{name}")
    if value not in (None, ""):
        return str(value).strip(), f"--vcstore-{name.replace('_', '-')}"

    # pytest before 8 returns "" for an unset ini option whatever its default.
    value = config.getini(f"vcstore_{name}")
    if value not in (None, ""):
        return str(value).strip(), f"ini option vcstore_{name}"

    variable = f"VCSTORE_{name.upper()}"
    value = os.environ.get(variable, "")
    if value != "":
        return value.strip(), f"environment variable {variable}"

    return default, "default"


def _parse_workers(text: str, source: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise pytest.UsageError(
            f"invalid {source} value {text!r}: expected a whole number of worker processes >= 1"
        )
    return workers


def _parse_start_method(text: str, source: str) -> str:
    if text not in START_METHODS:
        raise pytest.UsageError(
            f"invalid {source} value {text!r}: expected one of {', '.join(START_METHODS)}"
        )
    # multiprocess offers the same start methods as the standard library.
    available = multiprocessing.get_all_start_methods()
    if text not in available:
        raise pytest.UsageError(
            f"invalid {source} value {text!r}: this platform offers only "
            f"{', '.join(available)}"
        )
    return text


def _parse_shrink_seconds(text: str, source: str) -> float | None:
    if text == "":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise pytest.UsageError(
            f"invalid {source} value {text!r}: expected a number of seconds > 0"
        )
    return seconds


def _check_profile(name: str, source: str) -> str:
    try:
        settings.get_profile(name)
    except InvalidArgument:
        raise pytest.UsageError(
            f"invalid {source} value {name!r}: no hypothesis settings profile has that "
            f"name. Use {FAST_PROFILE}, {THOROUGH_PROFILE}, or register the profile with "
            f"hypothesis.settings.register_profile in a plugin or the root conftest.py"
        ) from None
    return name


def _read_options(config: pytest.Config) -> VcstoreOptions:
    workers_text, workers_source = _lookup(config, "workers", str(DEFAULT_WORKERS))
    start_method, start_method_source = _lookup(config, "start_method", DEFAULT_START_METHOD)
    profile, profile_source = _lookup(config, "profile", DEFAULT_PROFILE)
    shrink_text, shrink_source = _lookup(config, "shrink_seconds", "")
    # None when the hypothesis plugin is off (-p no:hypothesispytest).
    hypothesis_profile = config.getoption("hypothesis_profile", None) or None

    return VcstoreOptions(
        workers=_parse_workers(workers_text, workers_source),
        workers_source=workers_source,
        start_method=_parse_start_method(start_method, start_method_source),
        start_method_source=start_method_source,
        profile=_check_profile(profile, profile_source),
        profile_source=profile_source,
        hypothesis_profile=hypothesis_profile,
        shrink_seconds=_parse_shrink_seconds(shrink_text, shrink_source),
        shrink_seconds_source=shrink_source,
    )


# Runs before the hypothesis plugin's pytest_configure, which loads the profile
# of --hypothesis-profile and builds --hypothesis-verbosity and the explain
# phase on the active profile, so that profile must already be ours.
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vcstore_requires_fork: skip the test unless the workers start with fork "
        "(the default --vcstore-start-method) and the platform offers fork",
    )
    # `pytest --help` must work even when an option's value is invalid.
    if config.getoption("help", False):
        return

    options = _read_options(config)
    config.stash[_OPTIONS_KEY] = options
    config.stash[_PREVIOUS_PROFILE_KEY] = settings.get_current_profile_name()
    # --hypothesis-profile wins: the hypothesis plugin loads it after this hook.
    if options.hypothesis_profile is None:
        settings.load_profile(options.profile)

    if options.shrink_seconds is not None:
        config.stash[_PREVIOUS_SHRINK_KEY] = set_shrink_bound(options.shrink_seconds)


def pytest_unconfigure(config: pytest.Config) -> None:
    # Restore the profile for the next pytest run in this process (pytester's inline runs).
    previous = config.stash.get(_PREVIOUS_PROFILE_KEY, None)
    if previous is not None:
        settings.load_profile(previous)
    shrink_seconds = config.stash.get(_PREVIOUS_SHRINK_KEY, None)
    if shrink_seconds is not None:
        set_shrink_bound(shrink_seconds)


def pytest_report_header(config: pytest.Config) -> str | None:
    options = config.stash.get(_OPTIONS_KEY, None)
    if options is None:
        return None
    if options.hypothesis_profile is None:
        profile = f"hypothesis profile {options.profile!r} ({options.profile_source})"
    else:
        profile = f"hypothesis profile {options.hypothesis_profile!r} (--hypothesis-profile"
        if options.profile_source != "default":
            profile += f", which wins over {options.profile!r} from {options.profile_source}"
        profile += ")"
    header = (
        f"vcstore: {options.workers} workers ({options.workers_source}), start method "
        f"{options.start_method} ({options.start_method_source}), {profile}"
    )
    if options.shrink_seconds is not None:
        header += (
            f", shrinking bounded at {options.shrink_seconds:g} s "
            f"({options.shrink_seconds_source})"
        )
    return header


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _fork_unavailable_reason(config)
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("vcstore_requires_fork") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _fork_unavailable_reason(config: pytest.Config) -> str | None:
    """Return why a test marked vcstore_requires_fork cannot run, or None if it can."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "needs the fork start method, which this platform does not offer"
    options = config.stash[_OPTIONS_KEY]
    if options.start_method != "fork":
        return (
            f"needs workers started with fork; this run uses {options.start_method} "
            f"({options.start_method_source})"
        )
    return None


def _options(request: pytest.FixtureRequest) -> VcstoreOptions:
    return request.config.stash[_OPTIONS_KEY]


# ----------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def vcstore_store_factory() -> Callable[..., Any]:
    """The callable that opens a store from a URL or path: `vcstore.open`.

    vcstore_open, vcstore_workers, vcstore_probe and vcstore_stress open stores
    with it. Override this fixture in your conftest.py to run them against
    another backend. It must return a callable that takes a store URL or path
    and returns an object with the store API. Workers started by spawn or
    forkserver, and vcstore_stress, receive it pickled with dill, so a lambda
    or closure works.
    """
    import vcstore

    return vcstore.open


@pytest.fixture
def vcstore_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty directory (a `pathlib.Path`) for this test's stores.

    While the test runs, `vcstore.vc` puts its layout under it: the prefix is
    set with `vcstore.vc.set_prefix` in this process, and VCSTORE_PREFIX in the
    environment for processes started by spawn or as subprocesses. Both are
    restored at teardown. The directory is a subdirectory of ``tmp_path``.
    """
    import vcstore.vc

    root = tmp_path / "vcstore"
    root.mkdir()
    monkeypatch.setenv(vcstore.vc.PREFIX_ENVIRONMENT_VARIABLE, str(root))
    previous = vcstore.vc.set_prefix(root)
    try:
        yield root
    finally:
        vcstore.vc.set_prefix(previous)


class StoreOpener:
    """Open stores under *root* with *store_factory*, and delete them all at teardown.

    ``opener(name=None, **kwargs)`` returns ``store_factory(target, **kwargs)``
    (``create=False``, say, for `vcstore.open`). *name* is one of:

    - None: a new store ``store-1``, ``store-2``... under the root;
    - a relative path such as ``"sandbox"`` or ``"a/b"``, taken from the root;
    - an absolute path (``str`` or `os.PathLike`) inside the root;
    - a URL (a ``str`` containing ``://``). A ``file:`` URL must point inside
      the root; a URL of another scheme goes to the factory unchecked.

    Paths are passed to the factory as ``str``, URLs unchanged. A path that
    leaves the root, or is the root itself, raises `ValueError`, so a test
    cannot delete a real store by mistake.
    """

    def __init__(self, root: Path, store_factory: Callable[..., Any]) -> None:
        self.root = Path(root)
        self.store_factory = store_factory
        self.opened: list[Any] = []
        self._numbers = itertools.count(1)

    def __call__(self, name: str | os.PathLike[str] | None = None, **kwargs: Any) -> Any:
        store = self.store_factory(self.target(name), **kwargs)
        self.opened.append(store)
        return store

    def target(self, name: str | os.PathLike[str] | None) -> str:
        """Return what ``opener(name)`` passes to the factory, checked as above."""
        if name is None:
            path = self.root / f"store-{next(self._numbers)}"
            while path.exists():
                path = self.root / f"store-{next(self._numbers)}"
            return str(path)

        if isinstance(name, str) and "://" in name:
            parts = urllib.parse.urlsplit(name)
            path = urllib.parse.unquote(parts.path)
            # A URL the factory will reject anyway (relative, another host) is its error to report.
            if parts.scheme == "file" and path.startswith("/"):
                self._check_inside(Path(path), name)
            return name

        path = self.root / os.fspath(name)
        self._check_inside(path, name)
        return str(path)

    def _check_inside(self, path: Path, name: object) -> None:
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved == root or root not in resolved.parents:
            raise ValueError(
                f"vcstore_open: {name!r} is not inside the test's store root {self.root}; "
                f"pass a name relative to the root, a path inside it, or a URL of a path inside it"
            )

    def close(self) -> None:
        """Delete every store opened, newest first, tolerating stores already deleted.

        Every store is tried; the first error other than `FileNotFoundError`
        (`vcstore.StoreDeletedError` is one) is raised at the end.
        """
        errors = []
        seen: set[int] = set()
        while self.opened:
            store = self.opened.pop()
            # vcstore.open returns one object per store, which may have been opened twice.
            if id(store) in seen:
                continue
            seen.add(id(store))
            try:
                store.delete()
            except FileNotFoundError:
                pass
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def vcstore_open(vcstore_root: Path, vcstore_store_factory: Callable[..., Any]) -> Iterator[StoreOpener]:
    """Open a store under vcstore_root; every store it opened is deleted at teardown.

    ``vcstore_open()`` opens a new store; ``vcstore_open("name")``,
    ``vcstore_open(vcstore_root / "name")`` and ``vcstore_open(url)`` open the
    store there, which must be inside vcstore_root (ValueError otherwise).
    Keyword arguments go to the factory: ``vcstore_open("s", create=False)``.
    Stores come from the vcstore_store_factory fixture (`vcstore.open` unless
    overridden). A store already deleted by the test is no error.
    """
    opener = StoreOpener(vcstore_root, vcstore_store_factory)
    try:
        yield opener
    finally:
        opener.close()


@pytest.fixture
def vcstore_workers(request: pytest.FixtureRequest, vcstore_store_factory: Callable[..., Any]):
    """A `vcstore_testing.WorkerPool` of worker processes that compete for stores.

    ``vcstore_workers[i].item_lock(store.url, Item.LOCK, exclusive=True)`` and
    the rest of the store API, target first. Its size is --vcstore-workers
    (default 3) and its start method --vcstore-start-method (default fork).
    Workers open stores with the vcstore_store_factory fixture. Every worker,
    killed, restarted or blocked, is stopped and reaped at teardown, also when
    the test fails or errors.
    """
    from vcstore_testing.workers import WorkerPool

    options = _options(request)
    pool = WorkerPool(options.workers, vcstore_store_factory, options.start_method)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def vcstore_probe(request: pytest.FixtureRequest, vcstore_store_factory: Callable[..., Any]):
    """Return "free", "shared" or "exclusive": how a store item's lock is held now.

    For ``vcstore_probe(target, item)``, where *target* is a store URL or
    path, a separate process (one per test, stopped at teardown) makes
    non-blocking lock attempts through the backend's own API and releases each
    at once. ``vcstore_probe.states(target, items)`` probes several items in one
    round trip. The result is exact only while no other process locks or
    unlocks the item.
    """
    from vcstore_testing.probe import Prober

    options = _options(request)
    prober = Prober(vcstore_store_factory, options.start_method)
    try:
        yield prober
    finally:
        prober.close()


@pytest.fixture
def vcstore_stress(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    vcstore_root: Path,
    vcstore_store_factory: Callable[..., Any],
) -> Callable[..., Any]:
    """Run free-running lock contention and return its checked history.

    ``result = vcstore_stress()`` lets --vcstore-workers processes lock a new
    store under vcstore_root and increment a counter under the lock for 2
    seconds, then returns a `vcstore_testing.history.CheckResult`:
    ``assert result.valid, str(result)``. Keyword arguments override the
    defaults: ``vcstore_stress(target, seconds=5, workers=4, store_factory=...,
    start_method=..., history_dir=...)``; others go to
    `vcstore_testing.stress.run_stress`. The events are kept as JSON lines in
    ``tmp_path / "stress-history-1"`` (then ``-2``...) unless *history_dir*
    names another directory.
    """
    options = _options(request)
    numbers = itertools.count(1)

    def stress(
        target: Any = None,
        *,
        seconds: float = DEFAULT_STRESS_SECONDS,
        workers: int | None = None,
        store_factory: Callable[..., Any] | None = None,
        start_method: str | None = None,
        **kwargs: Any,
    ) -> Any:
        # Imported here so that the plugin loads without the stress module.
        from vcstore_testing.stress import run_stress

        number = next(numbers)
        if target is None:
            target = str(vcstore_root / f"stress-{number}")
        # Kept after the test, so that a failure can be read event by event.
        kwargs.setdefault("history_dir", tmp_path / f"stress-history-{number}")
        return run_stress(
            target,
            seconds=seconds,
            workers=options.workers if workers is None else workers,
            store_factory=vcstore_store_factory if store_factory is None else store_factory,
            start_method=options.start_method if start_method is None else start_method,
            **kwargs,
        )

    return stress
