"""The rule for ids that become file or directory names inside a store."""

import re

from .errors import InvalidIdError

MAX_ID_LENGTH = 255

# An alphanumeric first character rules out "", ".", ".." and hidden names, and
# the rest admits no separator, so an id can never leave the store's directory.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)


def validate_id(value: object, kind: str = "id") -> str:
    """Return *value* if it is a valid id, else raise `InvalidIdError`.

    *kind* names the id in the message ("raw file id", "sandbox id").
    """
    if not isinstance(value, str):
        raise InvalidIdError(
            f"invalid {kind} {value!r}: expected a str of 1 to {MAX_ID_LENGTH} "
            f"characters from [A-Za-z0-9_.-], starting with a letter or digit"
        )
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdError(
            f"invalid {kind} {value[:40]!r}... ({len(value)} characters): "
            f"use at most {MAX_ID_LENGTH} characters"
        )
    if not _ID.fullmatch(value):
        raise InvalidIdError(
            f"invalid {kind} {value!r}: use 1 to {MAX_ID_LENGTH} characters from "
            f"[A-Za-z0-9_.-], starting with a letter or digit (no '/', '..' or NUL)"
        )
    return value
