"""Mutations that the reliability suite (tests/reliability) must catch.

Each entry is (name, [(path, old text, new text), ...], [test ids]); every
replacement of an entry is applied together. tools/check_tests_fail.py runs them.
"""

FS = "vcstore/filesystem.py"
R = "tests/reliability/"
MUTATIONS = [
    # -- faults
    ("temp-kept-on-fault", [(FS, "                _unlink_quietly(self._io, temp_name, dir_fd)\n                raise", "                raise")],
     [R + "test_faults.py::test_fault_leaves_no_temporary_file[store-06-write-ENOSPC]"]),
    ("rename-before-write", [(FS, "                _write_all(self._io, fd, data)\n                self._io.fsync(fd)\n                self._replace(temp_name, item, dir_fd)\n",
                              "                self._replace(temp_name, item, dir_fd)\n                _write_all(self._io, fd, data)\n                self._io.fsync(fd)\n")],
     [R + "test_faults.py::test_store_fault_keeps_previous_value"]),
    ("temp-descriptor-leaked", [(FS, "            finally:\n                self._io.close(fd)\n            # The rename", "            finally:\n                pass\n            # The rename")],
     [R + "test_faults.py::test_fault_leaks_no_descriptor[store-07-fsync-EIO]"]),
    ("eintr-retried", [(FS, "        written = io.write(fd, view)\n", "        try:\n            written = io.write(fd, view)\n        except InterruptedError:\n            continue\n")],
     [R + "test_faults.py::test_eintr_handled_like_eio[store-06-write-EIO]"]),
    ("eintr-swallowed-in-flock", [(FS, "            except BlockingIOError:\n                linked = False\n",
                                   "            except (BlockingIOError, InterruptedError):\n                linked = False\n")],
     [R + "test_faults.py::test_eintr_handled_like_eio[store-04-flock-EIO]"]),
    ("lock-fd-kept-on-error", [(FS, "            except BaseException:\n                _close_quietly(self._io, fd)\n                raise\n            # The lock file",
                                "            except BaseException:\n                raise\n            # The lock file")],
     [R + "test_faults.py::test_fault_leaks_no_descriptor[lock-try-01-flock-EIO]", R + "test_interrupts.py::test_interrupted_wait_leaves_no_descriptor"]),
    ("layout-skipped-when-dir-exists", [(FS, "                identity = _identity(self._io.fstat(dir_fd))\n                self._complete_layout(dir_fd)",
                                         "                identity = _identity(self._io.fstat(dir_fd))\n                if not os.listdir(self._dir):\n                    self._complete_layout(dir_fd)")],
     [R + "test_faults.py::test_creation_fault_leaves_store_creatable"]),
    # -- crash
    ("stale-temps-kept", [(FS, "            self._remove_stale_temps(dir_fd, item)\n", "")],
     [R + "test_crash_steps.py::test_next_store_removes_dead_writer_files"]),
    ("stale-removal-silent", [(FS, "        if stale:\n            _log.warning(", "        if False:\n            _log.warning(")],
     [R + "test_crash_steps.py::test_stale_file_removal_logged_by_name"]),
    ("temp-read-as-item", [(FS, "        path = self._dir_slash + item.file_name\n        try:\n            fd = self._io.open(path, _READ_FLAGS)",
                            "        path = self._dir_slash + item.file_name\n        temps = sorted(n for n in os.listdir(self._dir) if n.startswith('.' + item.file_name + '.'))\n        if temps:\n            path = self._dir_slash + temps[0]\n        try:\n            fd = self._io.open(path, _READ_FLAGS)")],
     [R + "test_crash_steps.py::test_written_temporary_file_never_read"]),
    ("write-in-place", [(FS, "                self._replace(temp_name, item, dir_fd)\n            except BaseException:",
                         "                self._replace(temp_name, item, dir_fd)\n                target = self._io.open(item.file_name, os.O_WRONLY | os.O_TRUNC, dir_fd=dir_fd)\n                _write_all(self._io, target, data[: len(data) // 2])\n                _write_all(self._io, target, data[len(data) // 2 :])\n                self._io.close(target)\n            except BaseException:")],
     [R + "test_crash_steps.py::test_crash_leaves_old_or_new_value"]),
    # -- hostile
    ("links-followed", [(FS, "_NOFOLLOW = os.O_NOFOLLOW\n", "_NOFOLLOW = 0\n")],
     [R + "test_hostile_trees.py::test_planted_entry_rejected[item-symlink-file-load]", R + "test_hostile_trees.py::test_planted_entry_never_opens_outside[item-symlink-file-load]"]),
    ("fifo-open-blocks", [(FS, "_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC", "_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC")],
     [R + "test_hostile_trees.py::test_planted_entry_rejected[item-fifo-load]"]),
    ("file-type-unchecked", [(FS, "def _require_regular(st, path: str, what: str) -> None:\n    if not stat.S_ISREG(st.st_mode):",
                              "def _require_regular(st, path: str, what: str) -> None:\n    if False:")],
     [R + "test_hostile_trees.py::test_planted_entry_rejected[item-directory-load]", R + "test_hostile_trees.py::test_planted_entry_rejected[raw-file-fifo-raw-id]"]),
    ("raw-dir-link-followed", [(FS, "                return self._io.open(RAW_DIR, _DIR_FLAGS, dir_fd=dir_fd)", "                return self._io.open(RAW_DIR, _DIR_FLAGS & ~_NOFOLLOW, dir_fd=dir_fd)")],
     [R + "test_hostile_trees.py::test_planted_entry_never_changes_outside[raw-dir-symlink-dir-raw-id]"]),
    ("delete-follows-links", [(FS, "                    mode = self._io.stat(name, dir_fd=fd, follow_symlinks=False).st_mode",
                               "                    mode = self._io.stat(name, dir_fd=fd, follow_symlinks=True).st_mode\n                    if stat.S_ISDIR(mode) and os.path.islink(f'/proc/self/fd/{fd}/{name}'):\n                        self._remove_contents(os.path.realpath(f'/proc/self/fd/{fd}/{name}'))\n                        self._io.unlink(name, dir_fd=fd)\n                        continue")],
     [R + "test_hostile_trees.py::test_planted_entry_never_changes_outside[raw-dir-symlink-dir-delete]"]),
    # -- fuzz
    ("raw-id-unchecked", [("vcstore/store.py", '            validate_id(id, "raw file id")', "            pass")],
     [R + "test_fuzz.py::test_raw_id_stays_inside_store", R + "test_fuzz.py::test_raw_id_rule"]),
    ("url-host-dropped", [("vcstore/urls.py", 'if parts.netloc not in ("", "localhost"):', "if False:")],
     [R + "test_fuzz.py::test_invalid_target_rejected"]),
    ("url-not-decoded", [("vcstore/urls.py", "path = os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))", "path = parts.path")],
     [R + "test_fuzz.py::test_open_stays_at_its_path"]),
    ("unknown-item-accepted", [("vcstore/store.py", "def _check_item(item) -> None:\n    if not isinstance(item, Item):", "def _check_item(item) -> None:\n    if False:")],
     [R + "test_fuzz.py::test_item_errors_are_store_errors"]),
    ("non-str-keys-accepted", [("vcstore/store.py", "    _check_keys(value, item)\n", "")],
     [R + "test_fuzz.py::test_invalid_value_rejected_before_disk"]),
    # -- permissions
    ("files-0644", [(FS, "FILE_MODE = 0o640", "FILE_MODE = 0o644")],
     [R + "test_permissions.py::test_files_at_most_0640", R + "test_permissions.py::test_created_entries_at_most_limits"]),
    ("directories-0755", [(FS, "DIR_MODE = 0o750", "DIR_MODE = 0o755")],
     [R + "test_permissions.py::test_directories_at_most_0750"]),
    ("umask-toggled", [(FS, "    def _complete_layout(self, dir_fd: int) -> None:\n", "    def _complete_layout(self, dir_fd: int) -> None:\n        os.umask(os.umask(0))\n")],
     [R + "test_permissions.py::test_umask_never_set"]),
    ("store-open-to-all", [(FS, "FILE_MODE = 0o640", "FILE_MODE = 0o644"), (FS, "DIR_MODE = 0o750", "DIR_MODE = 0o755")],
     [R + "test_permissions.py::test_root_store_closed_to_other_users"]),
    # -- load
    ("lock-always-shared", [(FS, "operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH", "operation = fcntl.LOCK_SH")],
     [R + "test_load.py::test_threads_never_overlap_exclusive", R + "test_load.py::test_processes_never_overlap"]),
    ("tokens-collide", [("vcstore/tokens.py", '    return f"{_prefix}-{next(_counter)}"', '    return f"{_prefix}-{next(_counter) % 7}"')],
     [R + "test_load.py::test_threads_get_unique_tokens"]),
    ("unlock-keeps-descriptor", [(FS, "        # Closing the last descriptor of the open file description releases it too.\n        io.close(held.fd)", "        pass")],
     [R + "test_load.py::test_threads_leak_no_descriptor"]),
    ("fork-keeps-parent-tokens", [("vcstore/tokens.py", "os.register_at_fork(after_in_child=TOKENS.forget_after_fork)", "")],
     [R + "test_load.py::test_child_cannot_unlock_parent_token"]),
    ("fork-mutex-kept", [("vcstore/tokens.py", "        self._mutex = threading.Lock()\n        for held", "        for held")],
     [R + "test_load.py::test_fork_while_token_table_busy"]),
    # -- interrupts
    ("enolck-not-unsupported", [(FS, "_UNSUPPORTED_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}", "_UNSUPPORTED_ERRNOS = {errno.ENOSYS, errno.EOPNOTSUPP}")],
     [R + "test_interrupts.py::test_lock_without_flock_raises_unsupported"]),
    ("interrupt-keeps-lock-fd", [(FS, "            except BaseException:\n                _close_quietly(self._io, fd)\n                raise\n            # The lock file",
                                  "            except Exception:\n                _close_quietly(self._io, fd)\n                raise\n            # The lock file")],
     [R + "test_interrupts.py::test_interrupted_wait_leaves_no_descriptor", R + "test_interrupts.py::test_interrupt_leaks_no_descriptor[lock-timeout-01-flock]"]),
]

BASELINE = ("baseline", [], sorted({test for _, _, tests in MUTATIONS for test in tests}))
MUTATIONS.insert(0, BASELINE)
