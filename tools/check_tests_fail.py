"""Show that the test suite catches broken guards: break one line, run its tests.

Each mutation replaces one guarded line of a copy of the source tree and runs
the tests that should catch it. A mutation that the tests do not catch is a
test that cannot fail, and this script exits 1. Run from the repository root::

    python tools/check_tests_fail.py            # every mutation (about 3 minutes)
    python tools/check_tests_fail.py no-flock   # the named ones
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time


@dataclasses.dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: list
    # Further (path, old, new) replacements applied together with the first.
    more: tuple = ()


MUTATIONS = [
    Mutation(
        "lock-always-shared",
        "vcstore/filesystem.py",
        "operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH",
        "operation = fcntl.LOCK_SH",
        ["tests/test_locks.py::test_exclusive_excludes_other_process_exclusive"],
    ),
    Mutation(
        "no-identity-recheck",
        "vcstore/filesystem.py",
        "        if _identity(at_path) != _identity(held):\n            return False",
        "        if False:\n            return False",
        ["tests/test_locks.py::test_waiter_retries_on_replaced_lock_file"],
    ),
    Mutation(
        "missing-lock-file-not-deleted",
        "vcstore/filesystem.py",
        "            raise self._deleted() from None\n        # A store deleted",
        "            return True\n        # A store deleted",
        ["tests/test_locks.py::test_delete_wakes_waiter_with_store_deleted"],
    ),
    Mutation(
        "known-lock-file-trusted-when-unlinked",
        "vcstore/filesystem.py",
        "        if held.st_nlink and known == (held.st_dev, held.st_ino):",
        "        if known == (held.st_dev, held.st_ino):",
        ["tests/test_locks.py::test_delete_wakes_waiter_that_locked_before"],
    ),
    Mutation(
        "release-before-remove",
        "vcstore/filesystem.py",
        "    def _delete(self) -> None:\n        self._remove_tree()\n",
        "    def _delete(self) -> None:\n        for held in TOKENS.pop_owner(self):\n            _release(self._io, held)\n        self._remove_tree()\n",
        ["tests/test_locks.py::test_delete_releases_token_after_removing_tree"],
    ),
    Mutation(
        "fork-keeps-parent-tokens",
        "vcstore/tokens.py",
        "os.register_at_fork(after_in_child=TOKENS.forget_after_fork)",
        "",
        ["tests/test_locks.py::test_fork_child_cannot_unlock_parent_token"],
    ),
    Mutation(
        "fork-unlocks-parent-lock",
        "vcstore/tokens.py",
        "                os.close(held.fd)\n            except OSError:",
        "                __import__('fcntl').flock(held.fd, 8)\n                os.close(held.fd)\n            except OSError:",
        ["tests/test_locks.py::test_fork_parent_keeps_lock"],
    ),
    Mutation(
        "no-deadlock-check",
        "vcstore/filesystem.py",
        "            if blocker is not None:\n                kind",
        "            if False:\n                kind",
        ["tests/test_locks.py::test_same_thread_exclusive_twice_raises_deadlock"],
    ),
    Mutation(
        "thread-ident-as-owner",
        "vcstore/tokens.py",
        "        return _thread_keys.key\n",
        "        return threading.get_ident()\n",
        ["tests/test_locks.py::test_exited_thread_token_is_no_deadlock"],
    ),
    Mutation(
        "unlock-ignores-item",
        "vcstore/tokens.py",
        "held.owner is owner and held.item is item:",
        "held.owner is owner:",
        ["tests/test_locks.py::test_unlock_with_other_item_keeps_lock"],
    ),
    Mutation(
        "unlock-ignores-store",
        "vcstore/tokens.py",
        "held.owner is owner and held.item is item:",
        "held.item is item:",
        ["tests/test_locks.py::test_unlock_on_other_store_keeps_lock"],
    ),
    Mutation(
        "store-in-place",
        "vcstore/filesystem.py",
        "                self._replace(temp_name, item, dir_fd)",
        "                self._replace(temp_name, item, dir_fd)\n"
        "                target = self._io.open(item.file_name, os.O_WRONLY | os.O_TRUNC, dir_fd=dir_fd)\n"
        "                _write_all(self._io, target, data[: len(data) // 2])\n"
        "                _write_all(self._io, target, data[len(data) // 2 :])\n"
        "                self._io.close(target)",
        ["tests/test_load_store.py::test_reader_never_sees_partial_value"],
    ),
    Mutation(
        "no-file-fsync",
        "vcstore/filesystem.py",
        "                self._io.fsync(fd)\n",
        "",
        ["tests/test_load_store.py::test_store_fsyncs_file_before_replace"],
    ),
    Mutation(
        "no-directory-fsync",
        "vcstore/filesystem.py",
        "            self._io.fsync(dir_fd)\n",
        "",
        ["tests/test_load_store.py::test_store_fsyncs_directory_after_replace"],
    ),
    Mutation(
        "temp-kept-on-fault",
        "vcstore/filesystem.py",
        "                _unlink_quietly(self._io, temp_name, dir_fd)\n                raise",
        "                raise",
        ["tests/test_load_store.py::test_fault_removes_temporary_file"],
    ),
    Mutation(
        "stale-temps-kept",
        "vcstore/filesystem.py",
        "            self._remove_stale_temps(dir_fd, item)\n",
        "",
        ["tests/test_load_store.py::test_next_store_removes_stale_temporary_file"],
    ),
    Mutation(
        "live-writer-temp-removed",
        "vcstore/filesystem.py",
        "                self._io.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n            except OSError:",
        "                pass\n            except OSError:",
        ["tests/test_load_store.py::test_live_writer_temporary_file_kept"],
    ),
    Mutation(
        "non-str-keys-accepted",
        "vcstore/store.py",
        "    _check_keys(value, item)\n",
        "",
        ["tests/test_load_store.py::test_store_rejects_non_json"],
    ),
    Mutation(
        "nan-accepted",
        "vcstore/store.py",
        "allow_nan=False, separators",
        "allow_nan=True, separators",
        ["tests/test_load_store.py::test_store_rejects_non_json"],
    ),
    Mutation(
        "deleted-store-resurrected",
        "vcstore/filesystem.py",
        "            dir_fd = self._io.open(self._dir, _DIR_FLAGS)\n        except (FileNotFoundError, NotADirectoryError):\n            raise self._deleted() from None",
        "            dir_fd = self._io.open(self._dir, _DIR_FLAGS)\n        except FileNotFoundError:\n            self._initialize(True)\n            return self._io.open(self._dir, _DIR_FLAGS)",
        ["tests/test_locks.py::test_call_after_delete_recreates_nothing"],
    ),
    Mutation(
        "recreated-store-not-told-apart",
        "vcstore/filesystem.py",
        "            if _identity(self._io.fstat(dir_fd)) != self._identity:\n                raise self._deleted()",
        "            pass",
        ["tests/test_locks.py::test_call_after_other_process_recreate_raises"],
    ),
    Mutation(
        "raw-id-unchecked",
        "vcstore/store.py",
        "            validate_id(id, \"raw file id\")",
        "            pass",
        ["tests/test_raw.py::test_invalid_id_cannot_escape"],
    ),
    Mutation(
        "raw-leaks-descriptor",
        "vcstore/filesystem.py",
        "                self._io.close(fd)\n                return path_to_url",
        "                return path_to_url",
        ["tests/test_raw.py::test_raw_leaks_no_descriptor"],
    ),
    Mutation(
        "foreign-host-dropped",
        "vcstore/urls.py",
        'if parts.netloc not in ("", "localhost"):',
        "if False:",
        ["tests/test_urls.py"],
    ),
    Mutation(
        "registry-unguarded",
        "vcstore/registry.py",
        "    with _mutex:\n        store = _stores.get((scheme, key))\n        if store is not None and store._is_current():\n            return store\n",
        "    if True:\n        store = _stores.get((scheme, key))\n        if store is not None and store._is_current():\n            return store\n        __import__('time').sleep(0.01)\n",
        ["tests/test_registry.py::test_concurrent_open_one_object"],
    ),
]


def _copy_tree(destination: str) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in listed:
        if not os.path.isfile(name):
            continue
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(name, target)


def _run(mutation: Mutation) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix="vcstore-mutant-") as copy:
        # The unprivileged-user tests skip unless user nobody can reach the tree.
        os.chmod(copy, 0o755)
        _copy_tree(copy)
        for relative, old, new in ((mutation.path, mutation.old, mutation.new), *mutation.more):
            path = os.path.join(copy, relative)
            with open(path) as source:
                text = source.read()
            count = text.count(old)
            if count != 1:
                raise SystemExit(
                    f"mutation {mutation.name}: {old!r} occurs {count} times in "
                    f"{relative}; make it match exactly one line"
                )
            with open(path, "w") as source:
                source.write(text.replace(old, new))

        started = time.monotonic()
        environment = dict(os.environ, PYTHONPATH=copy)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=copy,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        lines = result.stdout.strip().splitlines()
        # The first "E" line shows why the test failed, so a crash is not mistaken for a catch.
        reasons = [line[1:].strip()[:70] for line in lines if line.startswith("E ")]
        summary = lines[-1] if lines else ""
        if reasons:
            summary += f"  [{reasons[0]}]"
        return result.returncode != 0, time.monotonic() - started, summary


def _reliability_mutations() -> list[Mutation]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reliability_mutations import MUTATIONS as entries

    return [
        Mutation(f"reliability:{name}", *replacements[0], tests, tuple(replacements[1:]))
        for name, replacements, tests in entries
        if replacements
    ]


def main(argv: list[str]) -> int:
    everything = MUTATIONS + _reliability_mutations()
    chosen = [m for m in everything if not argv or m.name in argv]
    missed = []
    for mutation in chosen:
        caught, seconds, summary = _run(mutation)
        verdict = "caught" if caught else "MISSED"
        print(f"{mutation.name:32} {verdict:7} {seconds:6.1f} s  {summary}", flush=True)
        if not caught:
            missed.append(mutation.name)
    if missed:
        print(f"tests that cannot fail: mutations {', '.join(missed)} were not caught")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
