"""The suite's warning policy (pyproject's ``filterwarnings``): a deprecated call made by a
module under ``captioner`` fails the run, while a third party's own deprecation and our
deliberate deprecation aliases (which warn at their caller, ``stacklevel``) do not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

# A warning is attributed to the module whose frame ``stacklevel`` points at: its ``__name__``
# is what the filters' module field matches. Code run with a module's globals stands for a call
# made inside it (a deprecated torch function warns with stacklevel=2, at its caller).
PROBE = '''
import warnings

import pytest

CALL = "import warnings\\nwarnings.warn('old_api is deprecated', {category}, stacklevel=1)"


def _call_from(module, category="DeprecationWarning"):
    exec(compile(CALL.format(category=category), module.replace(".", "/") + ".py", "exec"),
         {"__name__": module})


def test_captioner_module_calls_a_deprecated_api():
    _call_from("captioner.models.encoder")


def test_captioner_module_future_warning():
    _call_from("captioner.inference", "FutureWarning")


def test_third_party_module_calls_a_deprecated_api():
    _call_from("somelib.core")


def test_deliberate_alias_is_testable():
    from captioner.data import convert

    with pytest.deprecated_call():
        convert.IMAGE_SUFFIXES


def test_deliberate_alias_warns_at_its_caller():
    from captioner.data import convert

    convert.IMAGE_SUFFIXES  # a warning in the summary, attributed to this (test) module
'''


def test_a_deprecation_in_captioner_code_fails_the_run(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(ROOT), str(probe)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = out.stdout
    assert out.returncode == 1, text[-3000:]
    assert "FAILED" in text and "2 failed, 3 passed" in text, text[-3000:]
    failed = {line.split("::")[-1].split(" ")[0] for line in text.splitlines() if line.startswith("FAILED")}
    assert failed == {"test_captioner_module_calls_a_deprecated_api", "test_captioner_module_future_warning"}, text
