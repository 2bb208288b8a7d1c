"""Store addresses: parsing `file:` URLs and paths, and encoding paths as URLs."""

import os
import posixpath
import urllib.parse

from .errors import InvalidUrlError, UnsupportedSchemeError

FILE_SCHEME = "file"


def path_to_url(path: str) -> str:
    """Return the `file:` URL of an absolute path, percent-encoded as `Path.as_uri` does."""
    return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))


def split_target(target, known_schemes) -> tuple[str, str]:
    """Return ``(scheme, normalised absolute path)`` for a store URL or path.

    *target* is a URL such as ``file:///run/vc/sbs/abc``, an absolute path, or
    an `os.PathLike`. Raises `InvalidUrlError` or `UnsupportedSchemeError`.
    """
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if isinstance(target, bytes):
        target = os.fsdecode(target)
    if not isinstance(target, str):
        raise InvalidUrlError(
            f"invalid store URL {target!r}: expected a str such as "
            f"'file:///run/vc/sbs/abc', an absolute path or an os.PathLike"
        )
    if not target:
        raise InvalidUrlError(
            "invalid store URL '': give a URL such as 'file:///run/vc/sbs/abc' or an absolute path"
        )

    if target.startswith("/"):
        return FILE_SCHEME, _normalise(target, target)

    parts = urllib.parse.urlsplit(target)
    scheme = parts.scheme.lower()
    if not scheme:
        hint = " ('~' is not expanded: call os.path.expanduser first)" if target.startswith("~") else ""
        raise InvalidUrlError(
            f"invalid store URL {target!r}: a relative path is ambiguous{hint}; "
            f"give an absolute path or a URL such as 'file:///run/vc/sbs/abc'"
        )
    if scheme not in known_schemes:
        known = ", ".join(sorted(known_schemes))
        raise UnsupportedSchemeError(
            f"unsupported scheme {parts.scheme!r} in store URL {target!r}: "
            f"known schemes are {known}; register a backend for it with vcstore.register_backend"
        )
    if scheme != FILE_SCHEME:
        return scheme, target

    # file://tmp/x names host "tmp", not the path /tmp/x; Kata silently dropped it.
    if parts.netloc not in ("", "localhost"):
        raise InvalidUrlError(
            f"invalid store URL {target!r}: host {parts.netloc!r} is not supported; "
            f"write 'file:///{parts.netloc}{parts.path}' for a local path"
        )
    if parts.query or parts.fragment or target.endswith(("?", "#")):
        raise InvalidUrlError(
            f"invalid store URL {target!r}: a file URL takes no query or fragment; "
            f"percent-encode '?' as %3F and '#' as %23"
        )
    path = os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))
    return FILE_SCHEME, _normalise(path, target)


def _normalise(path: str, target: str) -> str:
    if "\0" in path:
        raise InvalidUrlError(f"invalid store URL {target!r}: the path contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidUrlError(
            f"invalid store URL {target!r}: the path {path!r} is not absolute; "
            f"give an absolute path such as 'file:///run/vc/sbs/abc'"
        )

    path = posixpath.normpath(path)
    # POSIX keeps a leading "//" as implementation-defined; Linux treats it as "/".
    if path.startswith("//"):
        path = "/" + path.lstrip("/")

    # Deleting a store removes its tree, so the root directory can never be one.
    if path == "/":
        raise InvalidUrlError(
            f"invalid store URL {target!r}: the root directory cannot be a store; "
            f"name a directory below it"
        )
    return path
