"""The vcstore pytest plugin, run by pytest in a subprocess on downstream test files."""

import json

import pytest

pytest_plugins = ["pytester"]

# Bound on one downstream pytest run; a hung worker would otherwise hang the suite.
RUN_SECONDS = 120

# The plugin's environment fallbacks, and other variables that would change the downstream runs.
OUTSIDE_SETTINGS = (
    "VCSTORE_WORKERS",
    "VCSTORE_START_METHOD",
    "VCSTORE_PROFILE",
    "VCSTORE_PREFIX",
    "PYTEST_ADDOPTS",
)

# A downstream test that writes what the plugin configured to observed.json.
OBSERVE = """
    import json
    import os

    from hypothesis import settings
    from hypothesis.internal.conjecture import engine


    def test_observe(vcstore_workers):
        # A reply comes after a spawned worker has replaced its command line (exec).
        assert vcstore_workers[0].run(os.getpid) == vcstore_workers[0].pid
        with open(f"/proc/{vcstore_workers[0].pid}/cmdline", "rb") as cmdline:
            command = cmdline.read()
        observed = {
            "workers": len(vcstore_workers),
            "start_method": vcstore_workers.start_method,
            # A spawned worker runs a new interpreter; a forked one keeps pytest's command line.
            "spawned": b"spawn_main" in command,
            "profile": settings.get_current_profile_name(),
            "max_examples": settings.default.max_examples,
            "shrink_seconds": engine.MAX_SHRINKING_SECONDS,
        }
        with open("observed.json", "w") as output:
            json.dump(observed, output)
"""

# Every fixture, as a downstream project uses them.
DOWNSTREAM = """
    import os

    import pytest

    import vcstore
    import vcstore.vc
    from vcstore import Item

    PREFIX_BEFORE = vcstore.vc.get_prefix()
    OPENED = []


    def test_root_is_the_vc_prefix(vcstore_root):
        assert vcstore.vc.get_prefix() == str(vcstore_root)
        assert os.environ["VCSTORE_PREFIX"] == str(vcstore_root)
        assert list(vcstore_root.iterdir()) == []


    def test_open_names_the_store(vcstore_root, vcstore_open):
        named = vcstore_open("sandbox")
        fresh = vcstore_open()
        by_url = vcstore_open((vcstore_root / "by-url").as_uri())
        OPENED.extend([named.path, fresh.path, by_url.path])
        assert named.path == vcstore_root / "sandbox"
        assert fresh.path.parent == vcstore_root
        assert by_url.path == vcstore_root / "by-url"


    def test_open_rejects_path_outside_root(vcstore_open):
        with pytest.raises(ValueError, match="not inside"):
            vcstore_open("../escaped")


    def test_open_tolerates_deleted_store(vcstore_open):
        store = vcstore_open("gone")
        store.delete()
        OPENED.append(store.path)


    def test_workers_and_probe_see_one_lock(vcstore_open, vcstore_workers, vcstore_probe):
        store = vcstore_open("locked")
        token = vcstore_workers[0].item_lock(store.url, Item.STATE, exclusive=True, timeout=0)
        assert vcstore_probe(store.url, Item.STATE) == "exclusive"
        vcstore_workers[0].item_unlock(store.url, Item.STATE, token)
        assert vcstore_probe(store.url, Item.STATE) == "free"


    def test_teardown_deleted_stores_and_restored_prefix():
        assert OPENED
        assert [path for path in OPENED if path.exists()] == []
        assert vcstore.vc.get_prefix() == PREFIX_BEFORE
"""


def run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_SECONDS)


def observe(pytester, *args):
    """Run OBSERVE with *args* and return what it observed."""
    pytester.makepyfile(test_observe=OBSERVE)
    result = run(pytester, *args)
    result.assert_outcomes(passed=1)
    return json.loads((pytester.path / "observed.json").read_text())


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in OUTSIDE_SETTINGS:
        monkeypatch.delenv(name, raising=False)


# --- fixtures -------------------------------------------------------------------


def test_fixtures_downstream(pytester):
    pytester.makepyfile(test_downstream=DOWNSTREAM)
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=6)


def test_stress_fixture_downstream(pytester):
    pytester.makepyfile(
        test_stress="""
        def test_stress(tmp_path, vcstore_stress):
            result = vcstore_stress(seconds=0.5, workers=2)
            assert result.valid, str(result)
            assert result.increments > 0
            assert list((tmp_path / "stress-history-1").glob("*.jsonl"))
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1)


def test_store_factory_override(pytester):
    pytester.makeconftest(
        """
        import uuid

        import pytest

        import vcstore


        class NoLockStore:
            \"\"\"A backend whose item_lock takes no lock.\"\"\"

            def __init__(self, target):
                self._store = vcstore.open(target)

            def __getattr__(self, name):
                return getattr(self._store, name)

            def item_lock(self, item, exclusive, timeout=None):
                return uuid.uuid4().hex

            def item_unlock(self, item, token):
                pass


        @pytest.fixture
        def vcstore_store_factory():
            return NoLockStore
        """
    )
    pytester.makepyfile(
        test_override="""
        from conftest import NoLockStore
        from vcstore import Item


        def test_open_uses_factory(vcstore_open):
            assert isinstance(vcstore_open("s"), NoLockStore)


        def test_workers_and_probe_use_factory(vcstore_open, vcstore_workers, vcstore_probe):
            store = vcstore_open("s")
            vcstore_workers[0].item_lock(store.url, Item.STATE, exclusive=True, timeout=0)
            # The probe takes the lock that the worker's NoLockStore never took.
            assert vcstore_probe(store.url, Item.STATE) == "free"


        def test_stress_uses_factory(vcstore_stress):
            result = vcstore_stress(seconds=1)
            assert not result.valid
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=3)


def test_fixtures_documented(pytester):
    result = run(pytester, "--fixtures")
    assert result.ret == 0
    fixtures = {
        "vcstore_root": "An empty directory (a `pathlib.Path`) for this test's stores.",
        "vcstore_open": "Open a store under vcstore_root; every store it opened is deleted at teardown.",
        "vcstore_workers": "A `vcstore_testing.WorkerPool` of worker processes that compete for stores.",
        "vcstore_probe": 'Return "free", "shared" or "exclusive": how a store item\'s lock is held now.',
        "vcstore_stress": "Run free-running lock contention and return its checked history.",
        "vcstore_store_factory": "The callable that opens a store from a URL or path: `vcstore.open`.",
    }
    for name, docstring in fixtures.items():
        result.stdout.fnmatch_lines([f"{name}*", f"*{docstring}"])


def test_helper_modules_rewrite_asserts(pytester):
    pytester.makepyfile(
        test_rewrite="""
        import vcstore_testing.history
        import vcstore_testing.machines.lock_exclusivity


        def test_rewritten():
            for module in (vcstore_testing.history, vcstore_testing.machines.lock_exclusivity):
                assert type(module.__loader__).__name__ == "AssertionRewritingHook", module
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1)


# --- machines ---------------------------------------------------------------------


def test_failing_machine_shows_steps(pytester):
    pytester.makepyfile(
        test_machine="""
        import vcstore
        from vcstore_testing.machines import LockExclusivityMachine


        class KeptLockStore:
            \"\"\"A backend whose item_unlock keeps the lock.\"\"\"

            def __init__(self, root):
                self._store = vcstore.open(root)

            def __getattr__(self, name):
                return getattr(self._store, name)

            def item_unlock(self, item, token):
                pass


        class KeptLockMachine(LockExclusivityMachine):
            store_factory = KeptLockStore
            workers = 2
            # Try-locks and unlocks catch this bug; rules that wait only slow the shrinking.
            pending_waiters = False
            deletes = False
            worker_deaths = False


        TestKeptLock = KeptLockMachine.TestCase
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    # hypothesis's shortest failing program, which the user can paste to replay.
    result.stdout.fnmatch_lines(["*state = KeptLockMachine()*", "*state.item_lock(*"])


# --- leftover processes -----------------------------------------------------------


def test_workers_reaped_after_error(pytester):
    pytester.makepyfile(
        test_errors="""
        import os

        import pytest

        import vcstore
        from vcstore import Item

        PIDS = []


        def running(pid):
            try:
                with open(f"/proc/{pid}/stat") as status:
                    return status.read().rsplit(")", 1)[1].split()[0] != "Z"
            except FileNotFoundError:
                return False


        def test_fails_while_blocked(vcstore_open, vcstore_workers, vcstore_probe):
            store = vcstore_open("s")
            PIDS.extend(worker.pid for worker in vcstore_workers)
            PIDS.append(vcstore_probe.pid)
            vcstore_workers[0].item_lock(store.url, Item.LOCK, exclusive=True, timeout=0)
            vcstore_workers[1].submit("item_lock", store.url, Item.LOCK, True)
            raise RuntimeError("the test fails while a worker waits for a lock")


        @pytest.fixture
        def broken(vcstore_workers):
            PIDS.extend(worker.pid for worker in vcstore_workers)
            raise RuntimeError("a fixture fails after the workers started")


        def test_errors_in_setup(broken):
            pass


        def test_no_worker_left():
            assert len(PIDS) == 7
            assert [pid for pid in PIDS if running(pid)] == []
        """
    )
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1, errors=1)


# --- options ----------------------------------------------------------------------


def test_defaults(pytester):
    observed = observe(pytester)
    assert observed["workers"] == 3
    assert observed["start_method"] == "fork"
    assert observed["spawned"] is False
    assert observed["profile"] == "vcstore-fast"
    assert observed["max_examples"] == 25


def test_workers_option_sets_pool_size(pytester):
    observed = observe(pytester, "--vcstore-workers", "2")
    assert observed["workers"] == 2


def test_start_method_option_spawns(pytester):
    observed = observe(pytester, "--vcstore-start-method", "spawn")
    assert observed["start_method"] == "spawn"
    assert observed["spawned"] is True


def test_shrink_seconds_option_bounds_shrinking(pytester):
    observed = observe(pytester, "--vcstore-shrink-seconds", "7.5")
    assert observed["shrink_seconds"] == 7.5


def test_shrink_seconds_default_is_hypothesis_own(pytester):
    from hypothesis.internal.conjecture import engine

    observed = observe(pytester)
    assert observed["shrink_seconds"] == engine.MAX_SHRINKING_SECONDS


def test_profile_option_loads_profile(pytester):
    observed = observe(pytester, "--vcstore-profile", "vcstore-thorough")
    assert observed["profile"] == "vcstore-thorough"
    assert observed["max_examples"] == 500


def test_profile_option_accepts_user_profile(pytester):
    pytester.makeconftest(
        """
        from hypothesis import settings

        settings.register_profile("mine", max_examples=7)
        """
    )
    observed = observe(pytester, "--vcstore-profile", "mine")
    assert observed["profile"] == "mine"
    assert observed["max_examples"] == 7


def test_hypothesis_profile_wins(pytester):
    pytester.makepyfile(test_observe=OBSERVE)
    result = run(pytester, "--vcstore-profile", "vcstore-thorough", "--hypothesis-profile", "ci")
    result.assert_outcomes(passed=1)
    observed = json.loads((pytester.path / "observed.json").read_text())
    assert observed["profile"] == "ci"
    result.stdout.fnmatch_lines(["vcstore: *'ci' (--hypothesis-profile, which wins over 'vcstore-thorough'*"])


def test_hypothesis_verbosity_keeps_profile(pytester):
    # The hypothesis plugin builds its verbosity profile on the active one, so ours must load first.
    observed = observe(pytester, "--vcstore-profile", "vcstore-thorough", "--hypothesis-verbosity", "verbose")
    assert observed["profile"] == "vcstore-thorough-with-verbose-verbosity"
    assert observed["max_examples"] == 500


def test_ini_twins(pytester):
    pytester.makeini(
        """
        [pytest]
        vcstore_workers = 2
        vcstore_start_method = spawn
        vcstore_profile = vcstore-thorough
        """
    )
    observed = observe(pytester)
    assert observed["workers"] == 2
    assert observed["spawned"] is True
    assert observed["profile"] == "vcstore-thorough"


def test_environment_fallbacks(pytester, monkeypatch):
    monkeypatch.setenv("VCSTORE_WORKERS", "1")
    monkeypatch.setenv("VCSTORE_START_METHOD", "spawn")
    monkeypatch.setenv("VCSTORE_PROFILE", "vcstore-thorough")
    observed = observe(pytester)
    assert observed["workers"] == 1
    assert observed["spawned"] is True
    assert observed["profile"] == "vcstore-thorough"


def test_command_line_beats_ini(pytester):
    pytester.makeini("[pytest]\nvcstore_workers = 2\n")
    observed = observe(pytester, "--vcstore-workers", "1")
    assert observed["workers"] == 1


def test_ini_beats_environment(pytester, monkeypatch):
    monkeypatch.setenv("VCSTORE_WORKERS", "1")
    pytester.makeini("[pytest]\nvcstore_workers = 2\n")
    observed = observe(pytester)
    assert observed["workers"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vcstore-workers", "0"], "invalid --vcstore-workers value '0'"),
        (["--vcstore-workers", "many"], "invalid --vcstore-workers value 'many'"),
        (["--vcstore-start-method", "thread"], "invalid --vcstore-start-method value 'thread'"),
        (["--vcstore-profile", "nosuch"], "invalid --vcstore-profile value 'nosuch'"),
        (["--vcstore-shrink-seconds", "0"], "invalid --vcstore-shrink-seconds value '0'"),
        (["--vcstore-shrink-seconds", "nan"], "invalid --vcstore-shrink-seconds value 'nan'"),
    ],
)
def test_invalid_option_usage_error(pytester, args, message):
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}*"])


def test_invalid_ini_usage_error(pytester):
    pytester.makeini("[pytest]\nvcstore_start_method = thread\n")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: invalid ini option vcstore_start_method value 'thread'*"])


def test_invalid_environment_usage_error(pytester, monkeypatch):
    monkeypatch.setenv("VCSTORE_WORKERS", "-1")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: invalid environment variable VCSTORE_WORKERS value '-1'*"])


# --- marker -----------------------------------------------------------------------

REQUIRES_FORK = """
    import pytest


    @pytest.mark.vcstore_requires_fork
    def test_needs_fork():
        pass
"""


def test_requires_fork_runs_with_fork(pytester):
    pytester.makepyfile(test_fork=REQUIRES_FORK)
    result = run(pytester, "--strict-markers")
    result.assert_outcomes(passed=1)


def test_requires_fork_skips_with_spawn(pytester):
    pytester.makepyfile(test_fork=REQUIRES_FORK)
    result = run(pytester, "--strict-markers", "--vcstore-start-method", "spawn", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs workers started with fork; this run uses spawn*"])
