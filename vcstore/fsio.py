"""The I/O seam: every file-system call of the filesystem backend goes through it.

`OsIO` forwards to the real `os` and `fcntl` functions with their own
signatures. A test subclasses it and overrides one method to inject a fault that
cannot be produced for real (a full disk, a failing fsync); a simulated file
system can stand behind it too.
"""

import fcntl
import os


class OsIO:
    """The real system calls, with the signatures of `os` and `fcntl`."""

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        return os.open(path, flags, mode, dir_fd=dir_fd)

    def close(self, fd):
        os.close(fd)

    def read(self, fd, n):
        return os.read(fd, n)

    def write(self, fd, data):
        return os.write(fd, data)

    def fsync(self, fd):
        os.fsync(fd)

    def replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def flock(self, fd, operation):
        fcntl.flock(fd, operation)

    def stat(self, path, *, dir_fd=None, follow_symlinks=True):
        return os.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)

    def fstat(self, fd):
        return os.fstat(fd)

    def mkdir(self, path, mode=0o777, *, dir_fd=None):
        os.mkdir(path, mode, dir_fd=dir_fd)

    def unlink(self, path, *, dir_fd=None):
        os.unlink(path, dir_fd=dir_fd)

    def rmdir(self, path, *, dir_fd=None):
        os.rmdir(path, dir_fd=dir_fd)

    def listdir(self, path):
        return os.listdir(path)


DEFAULT_IO = OsIO()
