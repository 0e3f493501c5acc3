"""glibc malloc tuning of the `safediff` command: applied on Linux/glibc, skipped when opted out."""

import ctypes
import sys

import pytest

from safediff import malloc_tuning
from safediff.malloc_tuning import tune_malloc


def test_opt_out_and_glibc_variables_leave_malloc_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("SAFEDIFF_MALLOC_TUNING", "0")
    assert tune_malloc() is False
    monkeypatch.delenv("SAFEDIFF_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert tune_malloc() is False
    assert calls == []  # libc never opened


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_are_set_through_mallopt(monkeypatch):
    monkeypatch.delenv("SAFEDIFF_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    seen = []

    class FakeMallopt:
        argtypes = restype = None

        def __call__(self, param, value):
            seen.append((param, value))
            return 1

    class FakeLibc:
        mallopt = FakeMallopt()

    monkeypatch.setattr(malloc_tuning.ctypes, "CDLL", lambda *a, **k: FakeLibc())
    assert tune_malloc(1 << 20) is True
    assert seen == [
        (malloc_tuning.M_MMAP_THRESHOLD, 1 << 20),
        (malloc_tuning.M_TRIM_THRESHOLD, 1 << 20),
    ]
    # a refusal (mallopt returns 0) is reported, not raised
    FakeMallopt.__call__ = lambda self, param, value: 0
    assert tune_malloc() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_real_glibc_accepts_the_default_threshold(monkeypatch):
    monkeypatch.delenv("SAFEDIFF_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert tune_malloc() is True
