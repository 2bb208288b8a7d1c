"""`vcstore verify`, run as a user runs it: a subprocess on real directories."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vcstore_testing.cli import _parse_mountinfo, filesystem_type

# Few examples: these tests check the command, not the backend.
EXAMPLES = "3"

PROPERTIES = ("lock-exclusivity", "token-bookkeeping", "round-trip", "crash-safety")

# Seconds of the stress mode: these tests check its row, not the backend.
STRESS_SECONDS = "1"

# Seconds of shrinking per failing property: the steps need not be the shortest here.
SHRINK_SECONDS = "3"

BROKEN_FACTORY = textwrap.dedent(
    """
    import vcstore

    class KeptLockStore:
        # item_unlock does not release the lock.
        def __init__(self, root):
            self._store = vcstore.open(root)

        def __getattr__(self, name):
            return getattr(self._store, name)

        def item_unlock(self, item, token):
            pass

    NOT_CALLABLE = 42
    """
)

RECORDING_FACTORY = textwrap.dedent(
    """
    import os
    import vcstore

    LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locks.log")

    class RecordingStore:
        # Appends each lock request to LOG: the sequence that hypothesis generated.
        def __init__(self, root):
            self._store = vcstore.open(root)

        def __getattr__(self, name):
            return getattr(self._store, name)

        def item_lock(self, item, exclusive, timeout=None):
            with open(LOG, "a") as log:
                log.write(f"{item.name} {exclusive}\\n")
            return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)
    """
)


def verify(*args, cwd=None, env=None):
    """Run ``vcstore verify ARGS`` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "vcstore_testing.cli", "verify", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def row(stdout: str, name: str) -> list:
    """Return the cells of the table row for property *name*."""
    for line in stdout.splitlines():
        if line.startswith(name + " "):
            return line.split(maxsplit=4)
    raise AssertionError(f"no row for {name} in:\n{stdout}")


def shm_is_tmpfs() -> bool:
    try:
        with open("/proc/mounts") as mounts:
            return any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts)
    except OSError:
        return False


@pytest.fixture
def factory_dir(tmp_path):
    directory = tmp_path / "factories"
    directory.mkdir()
    (directory / "broken_backend.py").write_text(BROKEN_FACTORY)
    (directory / "recording_backend.py").write_text(RECORDING_FACTORY)
    return directory


@pytest.fixture
def target(tmp_path):
    directory = tmp_path / "target"
    directory.mkdir()
    return directory


# ---------------------------------------------------------------------------
# A passing run


@dataclasses.dataclass
class Run:
    """One finished ``vcstore verify`` and where it ran."""

    finished: subprocess.CompletedProcess
    target: Path
    report: dict


def run_once(tmp_path_factory, name, *args, cwd=None) -> Run:
    """Run ``vcstore verify TARGET ARGS --json FILE`` in fresh directories."""
    base = tmp_path_factory.mktemp(name)
    target = base / "target"
    target.mkdir()
    report_path = base / "report.json"
    finished = verify(target, *args, "--json", report_path, cwd=cwd)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return Run(finished, target, report)


# One passing run serves every test that reads it: each run takes seconds.
@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    return run_once(tmp_path_factory, "passing", "--examples", EXAMPLES, "--stress", STRESS_SECONDS)


def test_verify_passes_on_tmp_dir(passing):
    assert passing.finished.returncode == 0, passing.finished.stdout + passing.finished.stderr


def test_verify_leaves_target_empty(passing):
    assert list(passing.target.iterdir()) == []


@pytest.mark.parametrize("name", PROPERTIES)
def test_verify_runs_every_property(passing, name):
    assert row(passing.finished.stdout, name)[4] == "passed"


def test_verify_names_default_backend(passing):
    assert "backend: vcstore.open" in passing.finished.stdout


def test_verify_names_target(passing):
    assert f"target: {passing.target}, file system: " in passing.finished.stdout


def test_verify_shows_progress_on_stderr(passing):
    assert f"lock-exclusivity: {EXAMPLES} of {EXAMPLES} examples" in passing.finished.stderr


def test_verify_json(passing):
    assert passing.report["target"] == str(passing.target)
    assert passing.report["filesystem"]
    assert passing.report["passed"] is True
    assert [p["name"] for p in passing.report["properties"]] == [*PROPERTIES, "stress"]


@pytest.mark.parametrize("index", range(len(PROPERTIES)))
def test_verify_json_property_fields(passing, index):
    checked = passing.report["properties"][index]

    assert checked["passed"] is True
    assert checked["status"] == "passed"
    assert checked["examples"] == int(EXAMPLES)
    assert checked["steps"] >= 1
    assert checked["seconds"] > 0
    assert checked["counterexample"] is None
    assert checked["error"] is None


def test_stress_row_passes(passing):
    assert row(passing.finished.stdout, "stress")[4] == "passed"


def test_stress_json_entry(passing):
    stress = passing.report["properties"][-1]

    assert stress["name"] == "stress"
    assert stress["passed"] is True
    assert stress["examples"] == 1
    assert stress["steps"] >= 1


def test_verify_unimportable_machine_not_available(target):
    # A machine module that cannot be imported leaves its property unchecked, not failed.
    script = (
        "import sys\n"
        "sys.modules['vcstore_testing.machines.crash_safety'] = None\n"
        "from vcstore_testing.cli import main\n"
        f"sys.exit(main(['verify', {str(target)!r}, '--examples', {EXAMPLES!r}]))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert row(finished.stdout, "crash-safety")[4] == "not available"
    assert row(finished.stdout, "lock-exclusivity")[4] == "passed"


@pytest.mark.skipif(not shm_is_tmpfs(), reason="/dev/shm is not a tmpfs here")
def test_verify_on_shm_names_tmpfs():
    directory = f"/dev/shm/vcstore-cli-test-{os.getpid()}"
    os.mkdir(directory)
    try:
        finished = verify(directory, "--examples", EXAMPLES)
    finally:
        shutil.rmtree(directory)

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "file system: tmpfs" in finished.stdout


def test_verify_accepts_file_url(target):
    finished = verify(target.as_uri(), "--examples", EXAMPLES)

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"target: {target}," in finished.stdout


def test_verify_creates_and_removes_missing_target(tmp_path):
    missing = tmp_path / "new"

    finished = verify(missing, "--examples", EXAMPLES)

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert not missing.exists()


def test_verify_removes_default_temporary_dir(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = dict(os.environ, TMPDIR=str(temporary))

    finished = verify("--examples", EXAMPLES, env=env)

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert list(temporary.iterdir()) == []


def test_verify_seed_repeats_run(target, factory_dir):
    log_path = factory_dir / "locks.log"
    logs = []
    for _ in range(2):
        verify(
            target,
            "--examples",
            EXAMPLES,
            "--seed",
            "7",
            "--factory",
            "recording_backend:RecordingStore",
            cwd=factory_dir,
        )
        # Workers and the probe process append to one log, so lines of
        # different processes may interleave differently: compare them sorted.
        logs.append(sorted(log_path.read_text().splitlines()))
        log_path.unlink()

    assert logs[0]
    assert logs[0] == logs[1]


# ---------------------------------------------------------------------------
# A failing backend


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    factories = tmp_path_factory.mktemp("broken-factories")
    (factories / "broken_backend.py").write_text(BROKEN_FACTORY)
    return run_once(
        tmp_path_factory,
        "broken",
        "--examples",
        "20",
        "--shrink-seconds",
        SHRINK_SECONDS,
        "--factory",
        "broken_backend:KeptLockStore",
        cwd=factories,
    )


def test_broken_factory_exits_1(broken):
    assert broken.finished.returncode == 1, broken.finished.stdout + broken.finished.stderr
    assert row(broken.finished.stdout, "lock-exclusivity")[4] == "failed"


def test_broken_factory_prints_steps(broken):
    assert "Shortest failing steps found by hypothesis" in broken.finished.stdout
    assert "state = LockExclusivityMachine()" in broken.finished.stdout
    assert "state.item_lock(" in broken.finished.stdout


def test_broken_factory_names_backend(broken):
    assert "backend: broken_backend:KeptLockStore" in broken.finished.stdout


def test_broken_factory_says_how_to_replay(broken):
    assert (
        "subclass vcstore_testing.machines.LockExclusivityMachine with "
        "store_factory = broken_backend.KeptLockStore"
    ) in broken.finished.stdout


def test_broken_factory_json(broken):
    checked = broken.report["properties"][0]

    assert broken.report["passed"] is False
    assert checked["passed"] is False
    assert checked["status"] == "failed"
    assert "state.item_lock(" in checked["counterexample"]


def test_broken_factory_leaves_target_empty(broken):
    assert list(broken.target.iterdir()) == []


@pytest.fixture(scope="module")
def mutant(tmp_path_factory):
    return run_once(
        tmp_path_factory,
        "mutant",
        "--examples",
        "20",
        "--shrink-seconds",
        SHRINK_SECONDS,
        "--stress",
        STRESS_SECONDS,
        "--factory",
        "vcstore_testing.mutants:no_lock",
    )


def test_mutant_factory_exits_1(mutant):
    assert mutant.finished.returncode == 1, mutant.finished.stdout + mutant.finished.stderr
    assert row(mutant.finished.stdout, "lock-exclusivity")[4] == "failed"


def test_mutant_factory_prints_steps(mutant):
    assert "Shortest failing steps found by hypothesis" in mutant.finished.stdout
    assert "state = LockExclusivityMachine()" in mutant.finished.stdout
    assert "state.item_lock(" in mutant.finished.stdout


def test_stress_catches_mutant(mutant):
    assert row(mutant.finished.stdout, "stress")[4] == "failed"
    assert "overlap: process" in mutant.finished.stdout


# ---------------------------------------------------------------------------
# Usage errors


def test_unknown_option_exits_2(target):
    assert verify(target, "--no-such-option").returncode == 2


def test_zero_workers_exits_2(target):
    assert verify(target, "--workers", "0").returncode == 2


@pytest.mark.parametrize("seconds", ["0", "-1", "soon", "inf"])
def test_invalid_stress_seconds_exits_2(target, seconds):
    assert verify(target, "--stress", seconds).returncode == 2


def test_invalid_shrink_seconds_exits_2(target):
    assert verify(target, "--shrink-seconds", "0").returncode == 2


def test_target_file_exits_2(tmp_path):
    path = tmp_path / "file"
    path.write_text("")

    finished = verify(path)

    assert finished.returncode == 2
    assert "is not a directory" in finished.stderr


def test_target_missing_parent_exits_2(tmp_path):
    finished = verify(tmp_path / "missing" / "target")

    assert finished.returncode == 2
    assert "does not exist" in finished.stderr


def test_target_url_with_host_exits_2():
    finished = verify("file://tmp/x")

    assert finished.returncode == 2
    assert "empty host" in finished.stderr


def test_target_other_scheme_exits_2():
    finished = verify("s3://bucket/x")

    assert finished.returncode == 2
    assert "unsupported URL scheme" in finished.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("broken_backend", "expected MODULE:CALLABLE"),
        ("no_such_module:open", "cannot import module"),
        ("broken_backend:missing", "has no attribute"),
        ("broken_backend:NOT_CALLABLE", "not a callable"),
    ],
)
def test_bad_factory_exits_2(target, factory_dir, spec, message):
    finished = verify(target, "--factory", spec, cwd=factory_dir)

    assert finished.returncode == 2
    assert message in finished.stderr


def test_missing_testing_extra_exits_2():
    script = (
        "import sys\n"
        "sys.modules['hypothesis'] = None\n"
        "from vcstore_testing.cli import main\n"
        "sys.exit(main(['verify']))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )

    assert finished.returncode == 2
    assert "pip install 'vcstore[testing]'" in finished.stderr


@pytest.mark.skipif(shutil.which("vcstore") is None, reason="console script not installed")
def test_console_script_help():
    finished = subprocess.run(
        ["vcstore", "verify", "--help"], capture_output=True, text=True, timeout=60
    )

    assert finished.returncode == 0
    assert "--examples N" in finished.stdout


# ---------------------------------------------------------------------------
# File-system type


def test_filesystem_type_longest_prefix_wins():
    mounts = [("/", "ext4"), ("/data/fast", "tmpfs"), ("/data", "nfs")]

    assert filesystem_type("/data/fast/x", mounts) == "tmpfs"
    assert filesystem_type("/data/x", mounts) == "nfs"
    assert filesystem_type("/srv", mounts) == "ext4"


def test_filesystem_type_prefix_is_whole_component():
    mounts = [("/", "ext4"), ("/data", "nfs")]

    assert filesystem_type("/database", mounts) == "ext4"


def test_filesystem_type_later_mount_wins():
    mounts = [("/", "ext4"), ("/mnt", "ext4"), ("/mnt", "tmpfs")]

    assert filesystem_type("/mnt/x", mounts) == "tmpfs"


def test_filesystem_type_unknown_without_mounts():
    assert filesystem_type("/x", []) == "unknown"


def test_mountinfo_parsed_with_optional_fields():
    text = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "36 22 0:30 / /mnt/my\\040disk rw master:1 shared:2 - xfs /dev/sdb rw\n"
        "40 22 0:31 / /run rw - tmpfs tmpfs rw\n"
    )

    assert _parse_mountinfo(text) == [
        ("/", "ext4"),
        ("/mnt/my disk", "xfs"),
        ("/run", "tmpfs"),
    ]
