"""`import vcstore` needs only the standard library."""

import json
import subprocess
import sys
import textwrap

import pytest

LIST_NEW_MODULES = textwrap.dedent(
    """
    import json, sys
    before = set(sys.modules)
    import {module}
    print(json.dumps(sorted(set(sys.modules) - before)))
    """
)


def modules_imported_by(module: str) -> list:
    """Return the modules that importing *module* adds, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", LIST_NEW_MODULES.format(module=module)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("module", ["vcstore", "vcstore.vc", "vcstore.fsio", "vcstore.filesystem"])
def test_import_uses_only_standard_library(module):
    outside = [
        name
        for name in modules_imported_by(module)
        if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "vcstore"
    ]
    assert outside == []


def test_import_does_not_load_testing_package():
    assert [name for name in modules_imported_by("vcstore") if name.startswith("vcstore_testing")] == []


def test_import_loads_no_tracing_library():
    # opentelemetry, when installed, is loaded on the first traced call at the earliest.
    assert [name for name in modules_imported_by("vcstore") if name.startswith("opentelemetry")] == []
