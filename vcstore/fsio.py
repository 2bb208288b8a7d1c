"""The I/O seam: every file-system call of the filesystem backend goes through it.

`OsIO` forwards to the real `os` and `fcntl` functions with their own
signatures. A test subclasses it and overrides one method to inject a fault that
cannot be produced for real (a full disk, a failing fsync); a simulated file
system can stand behind it too.
"""

import fcntl
import os


class OsIO:
    """The real system calls, with the signatures of `os` and `fcntl`.

    The methods are the `os` functions themselves, so the seam adds no call
    frame; a subclass overrides one with an ordinary method.
    """

    open = staticmethod(os.open)
    close = staticmethod(os.close)
    read = staticmethod(os.read)
    write = staticmethod(os.write)
    fsync = staticmethod(os.fsync)
    replace = staticmethod(os.replace)
    flock = staticmethod(fcntl.flock)
    stat = staticmethod(os.stat)
    fstat = staticmethod(os.fstat)
    mkdir = staticmethod(os.mkdir)
    unlink = staticmethod(os.unlink)
    rmdir = staticmethod(os.rmdir)
    listdir = staticmethod(os.listdir)


DEFAULT_IO = OsIO()
