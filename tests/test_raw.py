"""`raw`: raw file URLs, unique names, id validation, descriptors."""

import os
import pathlib
import stat
from urllib.parse import unquote

import pytest

import vcstore
from helpers import fd_count, snapshot


@pytest.fixture
def store(tmp_path):
    opened = vcstore.open(tmp_path / "store")
    yield opened
    opened.delete()


def raw_dir(store) -> pathlib.Path:
    return store.path / "raw"


def url_to_path(url: str) -> pathlib.Path:
    assert url.startswith("file://")
    return pathlib.Path(unquote(url[len("file://"):]))


# ---------------------------------------------------------------------------
# Named raw files


def test_raw_returns_file_url(store):
    assert store.raw("disk0") == (raw_dir(store) / "disk0").as_uri()


def test_raw_creates_file(store):
    store.raw("disk0")
    assert (raw_dir(store) / "disk0").is_file()


def test_raw_creates_empty_file(store):
    store.raw("disk0")
    assert (raw_dir(store) / "disk0").read_bytes() == b""


def test_raw_keeps_existing_content(store):
    # The Go original truncated an existing raw file with os.Create.
    (raw_dir(store) / "disk0").write_bytes(b"disk image")
    store.raw("disk0")
    assert (raw_dir(store) / "disk0").read_bytes() == b"disk image"


def test_raw_keeps_existing_mode(store):
    (raw_dir(store) / "disk0").write_bytes(b"disk image")
    os.chmod(raw_dir(store) / "disk0", 0o600)
    store.raw("disk0")
    assert stat.S_IMODE(os.stat(raw_dir(store) / "disk0").st_mode) == 0o600


def test_raw_same_id_same_url(store):
    assert store.raw("disk0") == store.raw("disk0")


def test_raw_file_mode_at_most_0640(store):
    store.raw("disk0")
    assert stat.S_IMODE(os.stat(raw_dir(store) / "disk0").st_mode) & ~0o640 == 0


@pytest.mark.parametrize("raw_id", ["a", "Z", "0", "disk-0.img", "a_b.c-d", "x" * 255, "a..b", "a."])
def test_raw_accepts_valid_id(store, raw_id):
    assert url_to_path(store.raw(raw_id)) == raw_dir(store) / raw_id


def test_raw_url_percent_encoded(tmp_path):
    store = vcstore.open(tmp_path / "with space")
    try:
        assert store.raw("disk0") == (tmp_path / "with space" / "raw" / "disk0").as_uri()
    finally:
        store.delete()


def test_raw_recreates_missing_raw_directory(store):
    os.rmdir(raw_dir(store))
    store.raw("disk0")
    assert (raw_dir(store) / "disk0").is_file()


# ---------------------------------------------------------------------------
# Unique raw files


def test_raw_without_id_creates_file(store):
    assert url_to_path(store.raw()).is_file()


def test_raw_without_id_in_raw_directory(store):
    assert url_to_path(store.raw()).parent == raw_dir(store)


def test_raw_without_id_unique(store):
    urls = [store.raw() for _ in range(100)]
    assert len(set(urls)) == 100


def test_raw_without_id_files_exist(store):
    urls = [store.raw() for _ in range(20)]
    assert sorted(os.listdir(raw_dir(store))) == sorted(url_to_path(url).name for url in urls)


def test_raw_without_id_never_reuses_existing_file(store):
    first = url_to_path(store.raw())
    first.write_bytes(b"taken")
    for _ in range(50):
        store.raw()
    assert first.read_bytes() == b"taken"


def test_raw_none_is_no_id(store):
    assert url_to_path(store.raw(None)).parent == raw_dir(store)


# ---------------------------------------------------------------------------
# Invalid ids

INVALID_IDS = [
    "",
    "/x",
    "a/b",
    "..",
    ".",
    "../escape",
    ".hidden",
    "-dash",
    "_under",
    "a\x00b",
    "x" * 256,
    "with space",
    "tab\t",
    "newline\n",
    "ünï",
    "a\\b",
    1,
    b"disk0",
    pathlib.Path("disk0"),
    ["disk0"],
]
INVALID_ID_NAMES = [repr(value)[:20] for value in INVALID_IDS]


@pytest.mark.parametrize("raw_id", INVALID_IDS, ids=INVALID_ID_NAMES)
def test_raw_rejects_invalid_id(store, raw_id):
    with pytest.raises(vcstore.InvalidIdError):
        store.raw(raw_id)


@pytest.mark.parametrize("raw_id", INVALID_IDS, ids=INVALID_ID_NAMES)
def test_invalid_id_is_value_error(store, raw_id):
    with pytest.raises(ValueError):
        store.raw(raw_id)


@pytest.mark.parametrize("raw_id", INVALID_IDS, ids=INVALID_ID_NAMES)
def test_invalid_id_named_in_message(store, raw_id):
    with pytest.raises(vcstore.InvalidIdError) as raised:
        store.raw(raw_id)
    # Long ids may be shortened in the message; their start must be there.
    assert repr(raw_id)[:30] in str(raised.value)


@pytest.mark.parametrize("raw_id", INVALID_IDS, ids=INVALID_ID_NAMES)
def test_invalid_id_creates_nothing(tmp_path, store, raw_id):
    before = snapshot(tmp_path)
    with pytest.raises(vcstore.InvalidIdError):
        store.raw(raw_id)
    assert snapshot(tmp_path) == before


def test_invalid_id_cannot_escape(tmp_path, store):
    # A "../x" id would create tmp_path/store/x, "../../x" tmp_path/x.
    for raw_id in ("../x", "../../x", "../../../x"):
        with pytest.raises(vcstore.InvalidIdError):
            store.raw(raw_id)
    assert not (tmp_path / "x").exists()
    assert not (store.path / "x").exists()


# ---------------------------------------------------------------------------
# Descriptors


def test_raw_leaks_no_descriptor(store):
    # The Go original never closed the file that raw(id) created.
    store.raw("warm-up")
    before = fd_count()
    for number in range(100):
        store.raw(f"disk{number}")
        store.raw(f"disk{number}")
        store.raw()
    assert fd_count() == before


def test_invalid_raw_leaks_no_descriptor(store):
    before = fd_count()
    for _ in range(50):
        with pytest.raises(vcstore.InvalidIdError):
            store.raw("../x")
    assert fd_count() == before
