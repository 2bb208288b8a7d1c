"""Hypothesis-generated ids, URLs, items and values through the public API.

Each example runs in a sandbox directory that contains the store and, beside
it, files that no call may touch. The whole sandbox tree is compared before and
after each call: an accepted call changes entries inside its store only (and,
when it creates a store, that store's missing parents), and a rejected input
raises a `StoreError` and changes nothing.

URLs are built so that their decoded, normalised path lies below the sandbox;
the test also runs with the sandbox as the working directory, so that a
relative path that slipped through would land inside the sandbox too.
"""

import math
import os
import posixpath
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import vcstore
from vcstore import Item
from helpers import snapshot
from reliability.helpers import tree_changes

pytestmark = [pytest.mark.reliability, pytest.mark.fuzz]

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# The id rule, restated from the contract: 1 to 255 ASCII characters, a letter
# or digit first, then letters, digits, '_', '.' and '-'.
ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}", re.ASCII)


@pytest.fixture
def sandbox(monkeypatch):
    """A directory holding a store (``store/``) and a neighbour no call may touch."""
    root = Path(tempfile.mkdtemp(prefix="vcstore-fuzz-"))
    (root / "neighbour").mkdir()
    (root / "neighbour" / "canary.json").write_text('{"canary": true}')
    monkeypatch.chdir(root)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def store(sandbox):
    opened = vcstore.open(sandbox / "store")
    opened.store(Item.STATE, {"value": "old"})
    yield opened
    opened.delete()


def changes_outside(before: dict, after: dict, inside: str) -> list:
    """Return the changed entries of the sandbox that are not *inside* (a relative path) or below it."""
    return [path for path in tree_changes(before, after) if path != inside and not path.startswith(inside + "/")]


# ---------------------------------------------------------------------------
# Raw file ids

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
ids = st.one_of(
    texts,
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", fullmatch=True),
    st.sampled_from(["..", ".", "../x", "a/../../b", "a\x00b", "/etc/passwd", "", " ", "-a", ".hidden", "a/b",
                     "x" * 255, "x" * 256, "\u0663", "a\u0301", "a\n", "raw", "lock", "state.json"]),
    st.binary(max_size=10),
    st.integers(),
    st.builds(Path, texts),
)


@FUZZ_SETTINGS
@given(raw_id=ids)
def test_raw_id_stays_inside_store(sandbox, store, raw_id):
    before = snapshot(sandbox)
    try:
        url = store.raw(raw_id)
    except vcstore.StoreError:
        url = None
    after = snapshot(sandbox)

    assert changes_outside(before, after, "store/raw") == []
    if url is None:
        assert after == before
    else:
        assert url == (store.path / "raw" / raw_id).as_uri()


@FUZZ_SETTINGS
@given(raw_id=ids)
def test_raw_id_rule(sandbox, store, raw_id):
    valid = isinstance(raw_id, str) and ID_RULE.fullmatch(raw_id) is not None
    try:
        store.raw(raw_id)
        accepted = True
    except Exception as error:  # noqa: BLE001 - the type is what is checked
        assert isinstance(error, vcstore.StoreError), repr(error)
        accepted = False
    assert accepted == valid


# ---------------------------------------------------------------------------
# Store URLs and paths

segments = st.lists(
    st.one_of(
        st.sampled_from([".", "..", "", "%", "%2e%2e", "%2F", "a b", "?", "#", "\x00", "lock", "raw", "~", "%00"]),
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
    ),
    min_size=1,
    max_size=4,
)


def expected_path(decoded: str):
    """Return the store path that a decoded absolute path names, or None if it is invalid."""
    if "\x00" in decoded:
        return None
    normal = posixpath.normpath(decoded)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    return normal


# How a path is passed to vcstore.open: as a str, a pathlib.Path or a file: URL.
valid_targets = st.tuples(
    st.sampled_from(["path", "pathlib", "url", "url-localhost", "url-upper", "url-no-authority"]),
    segments,
)


def build_target(base: str, form: str, parts: list):
    """Return ``(target, decoded path)`` for the path *base*/*parts* passed in *form*."""
    path = base + "/" + "/".join(parts)
    if form == "path":
        return path, path
    if form == "pathlib":
        return Path(path), str(Path(path))
    quoted = urllib.parse.quote(path, safe="/")
    prefix = {
        "url": "file://",
        "url-localhost": "file://localhost",
        "url-upper": "FILE://",
        "url-no-authority": "file:",
    }[form]
    return prefix + quoted, path


@FUZZ_SETTINGS
@given(drawn=valid_targets)
@example(drawn=("url", ["a%20b", "c"]))
@example(drawn=("path", ["..", "..", "x"]))
def test_open_stays_at_its_path(sandbox, drawn):
    form, parts = drawn
    base = str(sandbox / "stores" / "l1" / "l2" / "l3" / "l4")
    target, decoded = build_target(base, form, parts)
    expected = expected_path(decoded)
    assume(expected is None or expected.startswith(str(sandbox / "stores") + "/"))

    before = snapshot(sandbox)
    try:
        opened = vcstore.open(target)
    except vcstore.StoreError:
        opened = None
    after = snapshot(sandbox)
    try:
        check_open(sandbox, before, after, opened, expected)
    finally:
        # Each example starts without the stores of earlier ones, which could clash with it.
        if opened is not None:
            opened.delete()
        shutil.rmtree(sandbox / "stores", ignore_errors=True)


def check_open(sandbox, before, after, opened, expected):
    if expected is None:
        assert opened is None
        assert after == before
        return
    assert opened is not None
    assert str(opened.path) == expected
    inside = os.path.relpath(expected, sandbox)
    # Creating a store also creates its missing parents, and nothing else.
    ancestors = {os.path.relpath(parent, sandbox) for parent in Path(expected).parents}
    assert [path for path in changes_outside(before, after, inside) if path not in ancestors] == []
    assert vcstore.open(opened.url) is opened


schemes = st.from_regex(r"[a-z][a-z0-9+.-]{0,8}", fullmatch=True).filter(lambda scheme: scheme != "file")
hosts = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,15}", fullmatch=True).filter(lambda host: host != "localhost")
invalid_targets = st.one_of(
    st.tuples(st.just("scheme"), schemes, segments),
    st.tuples(st.just("host"), hosts, segments),
    st.tuples(st.just("query"), st.sampled_from(["?", "#", "?x=1", "#frag"]), segments),
    st.tuples(st.just("relative"), texts.filter(lambda text: not text.startswith("/") and ":" not in text), st.just([])),
    st.tuples(st.just("not-a-string"), st.one_of(st.integers(), st.none(), st.floats(), st.lists(st.integers())), st.just([])),
)


@FUZZ_SETTINGS
@given(drawn=invalid_targets)
def test_invalid_target_rejected(sandbox, drawn):
    form, extra, parts = drawn
    path = urllib.parse.quote(str(sandbox / "stores") + "/" + "/".join(parts), safe="/")
    target = {
        "scheme": lambda: f"{extra}://{path}",
        "host": lambda: f"file://{extra}{path}",
        "query": lambda: f"file://{path}{extra}",
        "relative": lambda: extra,
        "not-a-string": lambda: extra,
    }[form]()
    # A backend registered by another test would accept its own scheme.
    assume(form != "scheme" or extra not in vcstore.registry._backends)

    before = snapshot(sandbox)
    with pytest.raises(vcstore.StoreError):
        vcstore.open(target)
    assert snapshot(sandbox) == before


# ---------------------------------------------------------------------------
# Items

items = st.one_of(
    st.sampled_from(list(Item)),
    st.sampled_from([item.name for item in Item] + [item.value for item in Item] + [item.file_name for item in Item]),
    texts,
    st.integers(),
    st.none(),
    st.builds(object),
)

ITEM_CALLS = {
    "load": lambda store, item: store.load(item),
    "store": lambda store, item: store.store(item, {"value": "new"}),
    "item_lock": lambda store, item: store.item_unlock(item, store.item_lock(item, exclusive=True, timeout=0)),
    "item_unlock": lambda store, item: store.item_unlock(item, "not-a-token"),
    "locked": lambda store, item: store.locked(item, timeout=0).__enter__(),
}


@FUZZ_SETTINGS
@given(item=items, call=st.sampled_from(sorted(ITEM_CALLS)))
def test_item_errors_are_store_errors(sandbox, store, item, call):
    before = snapshot(sandbox)
    try:
        ITEM_CALLS[call](store, item)
    except Exception as error:  # noqa: BLE001 - the type is what is checked
        assert isinstance(error, vcstore.StoreError), repr(error)
        if not isinstance(item, Item):
            assert snapshot(sandbox) == before
    assert changes_outside(before, snapshot(sandbox), "store") == []
    for token in list(vcstore.tokens.TOKENS._held.values()):
        if token.owner is store:
            store.item_unlock(token.item, token.token)


# ---------------------------------------------------------------------------
# Values

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
bad_leaves = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.binary(max_size=4),
    st.builds(set, st.lists(st.integers(), max_size=2)),
    st.builds(object),
    st.complex_numbers(max_magnitude=5, allow_nan=False),
)
bad_keys = st.one_of(st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False), st.tuples(st.integers()))


def values(leaves):
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(st.text(max_size=8), children, max_size=4),
        ),
        max_leaves=12,
    )


invalid_values = st.one_of(
    values(st.one_of(json_leaves, bad_leaves)).filter(lambda value: not _strict_json(value)),
    st.dictionaries(bad_keys, values(json_leaves), min_size=1, max_size=3),
    st.builds(lambda value: {"nested": [{1: value}]}, values(json_leaves)),
)


def _strict_json(value) -> bool:
    """Return True if *value* is strict JSON (tuples allowed, as lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_strict_json(child) for child in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _strict_json(child) for key, child in value.items())
    return False


def _as_loaded(value):
    if isinstance(value, (list, tuple)):
        return [_as_loaded(child) for child in value]
    if isinstance(value, dict):
        return {key: _as_loaded(child) for key, child in value.items()}
    return value


@FUZZ_SETTINGS
@given(value=values(json_leaves))
def test_strict_json_value_round_trips(sandbox, store, value):
    before = snapshot(sandbox)
    store.store(Item.STATE, value)
    assert store.load(Item.STATE) == _as_loaded(value)
    assert changes_outside(before, snapshot(sandbox), "store") == []


@FUZZ_SETTINGS
@given(value=invalid_values)
@example(value={"deep": [[{"key": float("nan")}]]})
def test_invalid_value_rejected_before_disk(sandbox, store, value):
    before = snapshot(sandbox)
    with pytest.raises((TypeError, ValueError)):
        store.store(Item.STATE, value)
    assert snapshot(sandbox) == before


@FUZZ_SETTINGS
@given(value=invalid_values)
@example(value={"deep": [[{"key": float("nan")}]]})
def test_invalid_value_error_is_store_error(store, value):
    with pytest.raises((TypeError, ValueError)) as raised:
        store.store(Item.STATE, value)
    assert isinstance(raised.value, vcstore.StoreError), repr(raised.value)


def test_deeply_nested_value_rejected(store):
    value = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(vcstore.StoreError):
        store.store(Item.STATE, value)
