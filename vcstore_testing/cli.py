"""The ``vcstore`` command: ``vcstore verify`` checks a backend on a real file system.

``vcstore verify [TARGET] [--factory MODULE:CALLABLE] [--workers N]
[--examples N] [--seed N] [--json FILE] [--shrink-seconds SECONDS]
[--stress SECONDS]`` runs each property check (a hypothesis state machine)
against the backend, in TARGET: a directory or a ``file://`` URL. The
properties are lock-exclusivity, token-bookkeeping, round-trip and
crash-safety; ``--factory`` applies to all of them. Without TARGET it uses a
fresh temporary directory and removes it afterwards. With TARGET, each test
case uses a fresh empty subdirectory of it and removes it afterwards, and a
missing TARGET (whose parent exists) is created and removed at the end.

Hypothesis shrinks a failure for at most ``--shrink-seconds`` per property,
then prints the shortest failing steps it found so far.

``--stress SECONDS`` then runs the stress mode (`vcstore_testing.stress`) for
that long in a fresh subdirectory, and adds a row named "stress": 1 example,
its steps are the lock operations that completed, and its counterexample is
the history checker's report.

Progress goes to stderr. Stdout gets the target and its file-system type, one
row per property (examples, steps, seconds, result) and, for a failure, the
shortest failing sequence of steps that hypothesis found. "examples" counts
the test cases that hypothesis did not discard (it discards one when no rule
can run, say), and "steps" the rules run in every test case. Both include the
test cases that hypothesis ran while shrinking a failure.

Exit status: 0 if every available property held, 1 if one failed, 2 on a
usage error (a bad option, TARGET or --factory) or when the ``testing`` extra
is not installed.

``--json FILE`` writes::

    {"target": str, "filesystem": str, "passed": bool,
     "properties": [{"name", "examples", "steps", "seconds", "passed",
                     "counterexample", "status", "error"}]}

"status" is "passed", "failed" or "not available". A property whose machine
cannot be imported is not available: it has "passed": null, null counts and
the import error in "error". "counterexample" is the failing steps as text
and "error" the failure's exception; both are null unless the property failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["main", "filesystem_type"]

# Test cases per property when --examples is not given, sized for a run of
# at most a minute. Measured with all four properties and 3 workers on a
# shared 2-core VM (Python 3.11, /tmp on ext4): 36 s at load average 1.8 and
# 48-54 s at load average 4-5. benchmarks/machines.py repeats the measurement.
DEFAULT_EXAMPLES = 100

# Every property, in the order of the table, and the machine that checks it.
PROPERTY_MACHINES = {
    "lock-exclusivity": "LockExclusivityMachine",
    "token-bookkeeping": "TokenBookkeepingMachine",
    "round-trip": "RoundTripMachine",
    "crash-safety": "CrashSafetyMachine",
}
PROPERTIES = tuple(PROPERTY_MACHINES)

# The name of the stress mode's row.
STRESS = "stress"

INSTALL_HINT = "pip install 'vcstore[testing]'"

# Seconds between progress lines when stderr is not a terminal.
PROGRESS_INTERVAL = 5.0

# Default seconds that hypothesis may spend shrinking one property's failure.
# Each step drives real processes, and a step that waits for a lock that is
# never released costs seconds, so shrinking without a bound can take many
# minutes. When the bound is hit, the steps printed are the shortest found so far.
SHRINK_SECONDS = 20.0


class UsageError(Exception):
    """A command-line value that cannot be used; the command exits with 2."""


@dataclass
class PropertyResult:
    name: str
    examples: int | None = None
    steps: int | None = None
    seconds: float | None = None
    passed: bool | None = None
    counterexample: str | None = None
    status: str = "not available"
    error: str | None = None
    # Whether shrinking stopped at SHRINK_SECONDS; not part of the JSON report.
    shrinking_cut_short: bool = field(default=False, metadata={"json": False})


def main(argv: list[str] | None = None) -> int:
    """Run the ``vcstore`` command with *argv* (default: sys.argv[1:]) and return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return _exit_code(exit)

    try:
        return _verify(args)
    except UsageError as error:
        print(f"vcstore verify: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nvcstore verify: interrupted", file=sys.stderr)
        return 130


def _exit_code(exit: SystemExit) -> int:
    if exit.code is None:
        return 0
    return exit.code if isinstance(exit.code, int) else 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid value {text}: must be a number of seconds > 0")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vcstore",
        description="Tools for vcstore, the virtcontainers store.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the store's properties against a real file system",
        description=(
            "Run hypothesis state machines with competing worker processes "
            "against the backend, in TARGET. Exit status: 0 if every available "
            "property held, 1 if one failed, 2 on a usage error."
        ),
    )
    verify.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help=(
            "directory or file:// URL to test in; each test case uses a fresh "
            "subdirectory, removed afterwards (default: a temporary directory)"
        ),
    )
    verify.add_argument(
        "--factory",
        metavar="MODULE:CALLABLE",
        help=(
            "store factory to test instead of vcstore.open: a callable, importable "
            "from the current directory, that takes a root directory and returns "
            "a store"
        ),
    )
    verify.add_argument(
        "--workers",
        type=_positive_int,
        default=3,
        metavar="N",
        help="worker processes that compete for the store (default: 3)",
    )
    verify.add_argument(
        "--examples",
        type=_positive_int,
        default=DEFAULT_EXAMPLES,
        metavar="N",
        help=f"hypothesis test cases per property (default: {DEFAULT_EXAMPLES})",
    )
    verify.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed for hypothesis, to repeat a run (default: random)",
    )
    verify.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        help="also write the results to FILE as JSON",
    )
    verify.add_argument(
        "--shrink-seconds",
        type=_positive_float,
        default=SHRINK_SECONDS,
        metavar="SECONDS",
        help=(
            "time limit for shrinking a failure to its shortest steps, per property "
            f"(default: {SHRINK_SECONDS:g})"
        ),
    )
    verify.add_argument(
        "--stress",
        type=_positive_float,
        metavar="SECONDS",
        help=(
            "after the properties, run free lock contention for SECONDS seconds "
            "and check its history for overlapping holders and lost updates"
        ),
    )
    return parser


# ----------------------------------------------------------------------------
# verify


def _verify(args: argparse.Namespace) -> int:
    if not _testing_dependencies_installed():
        return 2

    factory = _load_factory(args.factory) if args.factory else None
    if args.json is not None and not args.json.parent.is_dir():
        raise UsageError(
            f"invalid --json {str(args.json)!r}: directory {args.json.parent} does not exist"
        )
    target, cleanup = _prepare_target(args.target)
    shown_target = str(target) if args.target else f"{target} (temporary, removed)"
    try:
        filesystem = filesystem_type(target)
        print(f"vcstore verify: testing in {shown_target}", file=sys.stderr)
        results = [_run_property(name, args, target, factory) for name in PROPERTIES]
        if args.stress is not None:
            results.append(_run_stress(args, target, factory))
    finally:
        cleanup()

    passed = all(result.passed is not False for result in results)
    _print_report(shown_target, filesystem, results, passed, args.shrink_seconds, args.factory)
    if args.json is not None:
        _write_json(args.json, str(target), filesystem, results, passed)
    return 0 if passed else 1


def _testing_dependencies_installed() -> bool:
    missing = []
    for module in ("hypothesis", "multiprocess"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        print(
            f"vcstore verify: error: {' and '.join(missing)} not installed; "
            f"install the testing extra: {INSTALL_HINT}",
            file=sys.stderr,
        )
    return not missing


def _load_factory(spec: str) -> Callable[[Any], Any]:
    """Import the store factory that ``MODULE:CALLABLE`` names."""
    module_name, sep, attribute_path = spec.partition(":")
    if not sep or not module_name or not attribute_path:
        raise UsageError(
            f"invalid --factory {spec!r}: expected MODULE:CALLABLE, such as "
            f"mybackend:open_store"
        )

    # A factory module next to the user is found like `python -m` finds it.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        value: Any = importlib.import_module(module_name)
    except Exception as error:
        raise UsageError(
            f"invalid --factory {spec!r}: cannot import module {module_name!r}: "
            f"{type(error).__name__}: {error}"
        ) from error

    for part in attribute_path.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageError(
                f"invalid --factory {spec!r}: {module_name!r} has no attribute "
                f"{attribute_path!r}"
            ) from None
    if not callable(value):
        raise UsageError(
            f"invalid --factory {spec!r}: {attribute_path} is a "
            f"{type(value).__name__}, not a callable"
        )
    return value


def _prepare_target(text: str | None) -> tuple[Path, Callable[[], None]]:
    """Return the directory to test in and a function that cleans up after."""
    if text is None:
        path = Path(tempfile.mkdtemp(prefix="vcstore-verify-"))
        return path, lambda: shutil.rmtree(path, ignore_errors=True)

    path = _target_path(text)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"invalid TARGET {text!r}: {path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(
                f"invalid TARGET {text!r}: no write permission on {path}; choose "
                f"a directory you can write to"
            )
        return path, lambda: None

    if not path.parent.is_dir():
        raise UsageError(
            f"invalid TARGET {text!r}: parent directory {path.parent} does not "
            f"exist; create it or choose another TARGET"
        )
    try:
        path.mkdir(mode=0o750)
    except OSError as error:
        raise UsageError(f"invalid TARGET {text!r}: cannot create {path}: {error}") from error
    return path, lambda: shutil.rmtree(path, ignore_errors=True)


def _target_path(text: str) -> Path:
    """Return TARGET as an absolute path; TARGET is a path or a file:// URL."""
    if "://" not in text and not text.startswith("file:"):
        return Path(os.path.abspath(os.path.expanduser(text)))

    url = urllib.parse.urlsplit(text)
    if url.scheme != "file":
        raise UsageError(
            f"invalid TARGET {text!r}: unsupported URL scheme {url.scheme!r}; "
            f"use a directory or a file:// URL"
        )
    if url.netloc not in ("", "localhost"):
        raise UsageError(
            f"invalid TARGET {text!r}: a file URL must have an empty host or "
            f"localhost, as in file:///tmp/x"
        )
    path = urllib.parse.unquote(url.path)
    if not path.startswith("/"):
        raise UsageError(f"invalid TARGET {text!r}: the URL's path must be absolute")
    return Path(path)


# ----------------------------------------------------------------------------
# File-system type


def filesystem_type(
    path: str | os.PathLike, mounts: Iterable[tuple[str, str]] | None = None
) -> str:
    """Return the type of the file system that contains *path* ("ext4", "tmpfs"...).

    *mounts* is (mount point, type) pairs in mount order, by default this
    process's mount table from /proc. The mount whose mount point is the
    longest prefix of the resolved path wins. Returns "unknown" if none does.
    """
    resolved = os.path.realpath(path)
    best_point, best_type = "", "unknown"
    for point, fstype in _mount_table() if mounts is None else mounts:
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        # ">=": a later mount on the same point hides the earlier one.
        if inside and len(point) >= len(best_point):
            best_point, best_type = point, fstype
    return best_type


def _mount_table() -> list[tuple[str, str]]:
    """Return (mount point, file-system type) pairs in mount order."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as file:
            return _parse_mountinfo(file.read())
    except OSError:
        pass
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as file:
            return _parse_mounts(file.read())
    except OSError:
        return []


def _parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """Return (mount point, type) pairs from the text of /proc/self/mountinfo."""
    mounts = []
    for line in text.splitlines():
        # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw":
        # the optional fields ("master:1") end at "-", and the type follows it.
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        if separator + 1 < len(fields):
            mounts.append((_unescape(fields[4]), fields[separator + 1]))
    return mounts


def _parse_mounts(text: str) -> list[tuple[str, str]]:
    """Return (mount point, type) pairs from the text of /proc/mounts."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((_unescape(fields[1]), fields[2]))
    return mounts


def _unescape(text: str) -> str:
    """Decode the octal escapes of the mount tables (``\\040`` for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


# ----------------------------------------------------------------------------
# Running a machine


class _Tally:
    """Examples and steps run so far, shown as progress on stderr."""

    def __init__(self, name: str, examples: int) -> None:
        self.name = name
        self.examples = examples
        self.test_cases = 0
        self.steps = 0
        self.start = time.monotonic()
        self.last_shown = 0.0
        self.tty = sys.stderr.isatty()

    def add(self, steps: int, counted: bool) -> None:
        if counted:
            self.test_cases += 1
        self.steps += steps
        now = time.monotonic()
        interval = 0.2 if self.tty else PROGRESS_INTERVAL
        if now - self.last_shown >= interval:
            self.last_shown = now
            self.show()

    def show(self, final: bool = False) -> None:
        if self.test_cases <= self.examples:
            count = f"{self.test_cases} of {self.examples} examples"
        else:
            # Past max_examples, hypothesis runs test cases only to shrink a failure.
            count = f"{self.test_cases} examples (shrinking a failure)"
        text = f"{self.name}: {count}, {self.steps} steps, {time.monotonic() - self.start:.1f} s"
        if self.tty:
            print("\r" + text + ("\n" if final else ""), end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


def _run_property(
    name: str, args: argparse.Namespace, target: Path, factory: Callable[[Any], Any] | None
) -> PropertyResult:
    from hypothesis import HealthCheck, seed, settings
    from hypothesis.reporting import with_reporter
    from hypothesis.stateful import run_state_machine_as_test

    from . import machines

    result = PropertyResult(name)
    class_name = PROPERTY_MACHINES[name]
    try:
        base = getattr(machines, class_name)
    except (ImportError, AttributeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        print(f"{name}: not available ({result.error})", file=sys.stderr)
        return result

    tally = _Tally(name, args.examples)
    attributes = {
        "workers": args.workers,
        "parent_directory": str(target),
        "teardown": _counting_teardown(base, tally),
    }
    if factory is not None:
        attributes["store_factory"] = staticmethod(factory)
    # The name that hypothesis prints in "state = LockExclusivityMachine()".
    machine = type(class_name, (base,), attributes)
    if args.seed is not None:
        machine = seed(args.seed)(machine)

    run_settings = settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    reported: list[str] = []
    print(f"{name}: running up to {args.examples} examples", file=sys.stderr)
    try:
        with with_reporter(reported.append), _shrinking_bounded(args.shrink_seconds):
            run_state_machine_as_test(machine, settings=run_settings)
    except Exception as error:
        result.passed = False
        result.status = "failed"
        result.error = f"{type(error).__name__}: {error}"
        result.counterexample = _failing_steps(reported, error)
        result.shrinking_cut_short = any(_SLOW_SHRINK_WARNING in text for text in reported)
    else:
        result.passed = True
        result.status = "passed"
    finally:
        tally.show(final=True)

    result.examples = tally.test_cases
    result.steps = tally.steps
    result.seconds = round(time.monotonic() - tally.start, 2)
    return result


def _run_stress(
    args: argparse.Namespace, target: Path, factory: Callable[[Any], Any] | None
) -> PropertyResult:
    import vcstore

    from .stress import run_stress

    result = PropertyResult(STRESS)
    print(f"{STRESS}: running for {args.stress:g} s", file=sys.stderr)
    started = time.monotonic()
    directory = tempfile.mkdtemp(prefix="vcstore-stress-", dir=target)
    try:
        checked = run_stress(
            directory,
            seconds=args.stress,
            workers=args.workers,
            store_factory=factory if factory is not None else vcstore.open,
        )
    except Exception as error:
        result.passed = False
        result.status = "failed"
        result.error = f"{type(error).__name__}: {error}"
        checked = None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result.seconds = round(time.monotonic() - started, 2)
    result.examples = 1
    if checked is None:
        return result

    result.steps = len(checked.windows)
    result.passed = checked.valid
    result.status = "passed" if checked.valid else "failed"
    print(
        f"{STRESS}: {checked.increments} increments, {len(checked.windows)} lock operations",
        file=sys.stderr,
    )
    if not checked.valid:
        result.error = (
            f"the history shows {len(checked.overlaps)} overlapping holders, "
            f"{len(checked.lost_updates)} lost updates and {len(checked.errors)} errors"
        )
        result.counterexample = str(checked)
    return result


# How hypothesis's report starts when it stops shrinking at its time bound.
_SLOW_SHRINK_WARNING = "WARNING: Hypothesis has spent more than"


@contextlib.contextmanager
def _shrinking_bounded(seconds: float):
    """Bound the time hypothesis spends shrinking a failure, for the ``with`` block."""
    from .shrinking import set_shrink_bound

    previous = set_shrink_bound(seconds)
    try:
        yield
    finally:
        set_shrink_bound(previous)


def _counting_teardown(base: type, tally: _Tally) -> Callable[[Any], None]:
    from hypothesis.errors import StopTest, UnsatisfiedAssumption

    def teardown(self) -> None:
        # Hypothesis calls teardown in a `finally` block, so the exception
        # that ends a discarded test case is still visible here.
        ending = sys.exc_info()[1]
        discarded = isinstance(ending, (StopTest, UnsatisfiedAssumption))
        try:
            base.teardown(self)
        finally:
            tally.add(self.steps, counted=not discarded)

    return teardown


def _failing_steps(reported: list[str], error: BaseException) -> str:
    """Return the failing program that hypothesis printed or noted on *error*.

    Keeps the lines from ``state = ...()`` to ``state.teardown()``; hypothesis
    reports them through its reporter or, in recent versions, as notes.
    """
    lines: list[str] = []
    for text in [*reported, *getattr(error, "__notes__", [])]:
        lines.extend(str(text).splitlines())

    start = next((i for i, line in enumerate(lines) if line.startswith("state = ")), None)
    if start is None:
        return "\n".join(lines)
    end = next(
        (i for i in range(start, len(lines)) if lines[i].strip() == "state.teardown()"),
        len(lines) - 1,
    )
    return "\n".join(lines[start : end + 1])


# ----------------------------------------------------------------------------
# Output


def _factory_expression(factory: str | None) -> str:
    """Return Python code for the factory that ``--factory MODULE:CALLABLE`` names."""
    if factory is None:
        return "vcstore.open"
    module, _, name = factory.partition(":")
    return f"{module}.{name}"


def _print_report(
    target: Any,
    filesystem: str,
    results: list[PropertyResult],
    passed: bool,
    shrink_seconds: float,
    factory: str | None = None,
) -> None:
    print(f"target: {target}, file system: {filesystem}")
    print(f"backend: {factory or 'vcstore.open'}")
    print()

    header = ("property", "examples", "steps", "seconds", "result")
    rows = [header]
    for result in results:
        rows.append(
            (
                result.name,
                "-" if result.examples is None else str(result.examples),
                "-" if result.steps is None else str(result.steps),
                "-" if result.seconds is None else f"{result.seconds:.1f}",
                result.status,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:4], widths[1:4])]
        cells.append(row[4])
        print("  ".join(cells))

    for result in results:
        if result.passed is False:
            print()
            print(f"{result.name} failed: {result.error}")
            if result.counterexample is None:
                continue
            if result.name == STRESS:
                print("What the history checker found:")
            elif result.shrinking_cut_short:
                print(
                    f"Shortest failing steps found by hypothesis (shrinking stopped after "
                    f"{shrink_seconds:g} s, so shorter ones may exist):"
                )
            else:
                print("Shortest failing steps found by hypothesis:")
            for line in result.counterexample.splitlines():
                print("    " + line)
            if result.name != STRESS:
                print(
                    f"To replay it, subclass vcstore_testing.machines."
                    f"{PROPERTY_MACHINES[result.name]} with store_factory = "
                    f"{_factory_expression(factory)}, name the subclass "
                    f"{PROPERTY_MACHINES[result.name]} as the steps do, and run them with "
                    f"state.teardown() in a finally block (docs/testing.md, \"Read a failure\")."
                )

    available = [result for result in results if result.passed is not None]
    print()
    if passed:
        missing = len(results) - len(available)
        text = f"passed: {len(available)} of {len(results)} checks ran"
        if missing:
            text += f", {missing} not available"
        print(text)
    else:
        failed = ", ".join(result.name for result in results if result.passed is False)
        print(f"failed: {failed}")


def _json_fields(result: PropertyResult) -> dict:
    return {
        item.name: getattr(result, item.name)
        for item in fields(result)
        if item.metadata.get("json", True)
    }


def _write_json(
    path: Path, target: str, filesystem: str, results: list[PropertyResult], passed: bool
) -> None:
    document = {
        "target": target,
        "filesystem": filesystem,
        "passed": passed,
        "properties": [_json_fields(result) for result in results],
    }
    try:
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write --json file {path}: {error}") from error


if __name__ == "__main__":
    sys.exit(main())
