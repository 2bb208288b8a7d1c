"""URLs and paths that `vcstore.open` accepts and rejects."""

import pathlib

import pytest

import vcstore
from helpers import snapshot


@pytest.fixture
def root(tmp_path):
    yield tmp_path
    vcstore.delete_all()


def test_open_file_url(root):
    store = vcstore.open((root / "s").as_uri())
    assert store.path == root / "s"


def test_open_file_url_with_localhost(root):
    store = vcstore.open(f"file://localhost{root}/s")
    assert store.path == root / "s"


def test_open_absolute_path_str(root):
    store = vcstore.open(str(root / "s"))
    assert store.path == root / "s"


def test_open_path_like(root):
    store = vcstore.open(root / "s")
    assert store.path == root / "s"


def test_path_is_pathlib_path(root):
    store = vcstore.open(root / "s")
    assert isinstance(store.path, pathlib.Path)


def test_url_is_file_uri_of_path(root):
    store = vcstore.open(str(root / "s"))
    assert store.url == (root / "s").as_uri()


def test_localhost_url_is_normalised(root):
    store = vcstore.open(f"file://localhost{root}/s")
    assert store.url == (root / "s").as_uri()


@pytest.mark.parametrize(
    "spelling",
    [
        lambda root: f"{root}/s/",
        lambda root: f"{(root / 's').as_uri()}/",
        lambda root: f"file://localhost{root}/s",
        lambda root: root / "s",
    ],
    ids=["path-trailing-slash", "url-trailing-slash", "localhost", "pathlike"],
)
def test_spellings_open_one_store(root, spelling):
    assert vcstore.open(spelling(root)) is vcstore.open(str(root / "s"))


@pytest.mark.parametrize("name", ["with space", "per%cent", "p%20q", "ü-ni#code?x"])
def test_url_round_trip(root, name):
    store = vcstore.open(root / name)
    assert vcstore.open(store.url) is store


@pytest.mark.parametrize("name", ["with space", "per%cent", "p%20q", "ü-ni#code?x"])
def test_url_is_percent_encoded(root, name):
    store = vcstore.open(root / name)
    assert store.url == (root / name).as_uri()


def test_url_is_percent_decoded(root):
    store = vcstore.open(f"{root.as_uri()}/a%20b%25c")
    assert store.path == root / "a b%c"


REJECTED = [
    # (value built from the test root, error type, text the message must contain)
    (lambda root: f"http://localhost{root}/s", vcstore.UnsupportedSchemeError, "http"),
    (lambda root: f"s3://bucket{root}/s", vcstore.UnsupportedSchemeError, "s3"),
    (lambda root: f"file://otherhost{root}/s", vcstore.InvalidUrlError, "otherhost"),
    (lambda root: "relative/store", vcstore.InvalidUrlError, "relative/store"),
    (lambda root: "file:relative/store", vcstore.InvalidUrlError, "relative/store"),
    (lambda root: "", vcstore.InvalidUrlError, None),
    (lambda root: "file://", vcstore.InvalidUrlError, "file://"),
    (lambda root: f"{root}/before\x00after", vcstore.InvalidUrlError, "before"),
    (lambda root: f"{root.as_uri()}/before%00after", vcstore.InvalidUrlError, "before"),
]
REJECTED_IDS = ["http", "s3", "other-host", "relative", "file-relative", "empty", "no-path", "nul", "encoded-nul"]


@pytest.mark.parametrize(("value", "error", "_"), REJECTED, ids=REJECTED_IDS)
def test_open_rejects(root, monkeypatch, value, error, _):
    monkeypatch.chdir(root)
    with pytest.raises(error):
        vcstore.open(value(root))


@pytest.mark.parametrize(("value", "error", "text"), REJECTED, ids=REJECTED_IDS)
def test_rejection_names_value(root, monkeypatch, value, error, text):
    if text is None:
        pytest.skip("an empty value has nothing to quote")
    monkeypatch.chdir(root)
    with pytest.raises(error) as raised:
        vcstore.open(value(root))
    assert text in str(raised.value)


@pytest.mark.parametrize(("value", "error", "_"), REJECTED, ids=REJECTED_IDS)
def test_rejection_is_value_error(root, monkeypatch, value, error, _):
    monkeypatch.chdir(root)
    with pytest.raises(ValueError):
        vcstore.open(value(root))


@pytest.mark.parametrize(("value", "error", "_"), REJECTED, ids=REJECTED_IDS)
def test_rejection_creates_nothing(root, monkeypatch, value, error, _):
    # The relative forms would land in the working directory, so it is the test root.
    monkeypatch.chdir(root)
    before = snapshot(root)
    with pytest.raises(error):
        vcstore.open(value(root))
    assert snapshot(root) == before


def test_unsupported_scheme_lists_known_schemes():
    value = "http://localhost/s"
    with pytest.raises(vcstore.UnsupportedSchemeError) as raised:
        vcstore.open(value)
    assert "file" in str(raised.value).replace(value, "")


def test_home_directory_shorthand_hint():
    with pytest.raises(vcstore.InvalidUrlError, match="expanduser"):
        vcstore.open("~/store")
