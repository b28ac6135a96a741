"""The build of the native kernels (bame_optim.kernels.native; the bame_optim.kernels.build
entry): folders keyed by Python, torch, ABI and sources; one build message per cache;
BAME_OPTIM_REQUIRE_NATIVE; the pre-build entry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bame_optim.kernels import build, native

from .test_kept_sgd_cpu import require_kernel

ROOT = Path(__file__).resolve().parents[1]


def test_environments_get_different_folders(tmp_path):
    base = dict(python="3.11", torch_version="2.5.1+cpu", abi=True, source_hash="0" * 16)
    variants = [base, base | dict(python="3.12"), base | dict(torch_version="2.6.0+cpu"),
                base | dict(abi=False), base | dict(source_hash="1" * 16)]
    folders = {native.build_directory(native.build_key(**v), tmp_path) for v in variants}
    assert len(folders) == len(variants)
    assert all(f.parent == tmp_path / native.NAME for f in folders)
    assert native.build_key(**base) == "py3.11-torch2.5.1+cpu-abi1-0000000000000000"


def test_default_key_is_this_process(monkeypatch, tmp_path):
    import sys

    import torch

    key = native.build_key()
    assert key.startswith(f"py{sys.version_info.major}.{sys.version_info.minor}-"
                          f"torch{torch.__version__}-abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}-")
    assert key.endswith(native.sources_hash())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert native.build_directory() == tmp_path / native.NAME / key


def test_source_hash_follows_sources_and_flags(monkeypatch, tmp_path):
    digest = native.sources_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert native.sources_hash([*native.flags(), "-DOTHER"]) != digest
    assert native.sources_hash(paths=[*native.SOURCES, *native.HEADERS]) == digest
    assert native.sources_hash(paths=native.SOURCES) != digest  # another tree: its own key
    copy = tmp_path / "kept_common.h"
    copy.write_text(native.HEADERS[0].read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "HEADERS", (copy,))
    assert native.sources_hash() != digest


def test_flags_ask_for_the_cpp_standard_the_sources_use():
    """The sources use C++20 (``std::bit_cast``), which torch 2.11's extension builder does
    not ask for (it passes ``-std=c++17``; 2.14 passes ``-std=c++20``): without the flag the
    kernels fail to build there and every step falls back to the eager path."""
    sources = [path.read_text() for path in (*native.SOURCES, *native.HEADERS)]
    assert any("std::bit_cast" in text for text in sources)
    assert "-std=c++20" in native.flags()


def test_build_message_is_one_line_once_per_folder(tmp_path, capsys):
    folder = tmp_path / "a" / "key"
    assert native.announce(folder, "first use")
    assert not native.announce(folder, "first use")
    assert native.announce(tmp_path / "b" / "key", "first use")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("compiling the native CPU kernels" in line for line in err)
    assert str(folder) in err[0] and "first use" in err[0] and "about" in err[0]


def _failing_build(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_cpp_extension", broken)
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)


def test_failed_build_warns_and_falls_back(monkeypatch):
    _failing_build(monkeypatch)
    monkeypatch.delenv(native.REQUIRE_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert native.load() is None
    assert native.load() is None  # cached, no second warning
    assert "no compiler here" in native.error()


def test_failed_build_is_an_error_when_required(monkeypatch):
    _failing_build(monkeypatch)
    monkeypatch.setenv(native.REQUIRE_ENV, "1")
    with pytest.raises(RuntimeError, match=f"{native.REQUIRE_ENV} is set: .*no compiler here"):
        native.load()


class _Unavailable:
    @staticmethod
    def available():
        return False

    @staticmethod
    def disabled():
        return False

    @staticmethod
    def error():
        return "broken build"


def test_kernel_test_modules_fail_rather_than_skip_when_required(monkeypatch):
    monkeypatch.setenv(native.REQUIRE_ENV, "1")
    with pytest.raises(AssertionError, match="broken build"):
        require_kernel(_Unavailable)
    monkeypatch.setenv(native.REQUIRE_ENV, "0")
    with pytest.raises(pytest.skip.Exception, match="broken build"):
        require_kernel(_Unavailable)


@pytest.mark.parametrize("name", ["DISABLE_ENV", "REQUIRE_ENV", "NO_AVX512_ENV"])
def test_environment_flags_read_words_and_refuse_anything_else(monkeypatch, name):
    variable = getattr(native, name)
    read = {"DISABLE_ENV": native.disabled, "REQUIRE_ENV": native.required,
            "NO_AVX512_ENV": lambda: not native.avx512_allowed()}[name]
    for value in ("1", "true", " TRUE ", "yes", "On"):
        monkeypatch.setenv(variable, value)
        assert read() is True, value
    for value in ("", "0", "false", "No", "off "):
        monkeypatch.setenv(variable, value)
        assert read() is False, value
    monkeypatch.delenv(variable)
    assert read() is False
    # the mistake: a value meant as "off" that the old reading took as set
    monkeypatch.setenv(variable, "flase")
    with pytest.raises(ValueError, match=f"Invalid {variable} value: 'flase'"):
        read()


def test_make_test_requires_the_native_kernels():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("\ntest:"):]
    target = target[: target.index("\n\n")] if "\n\n" in target else target
    assert "BAME_OPTIM_REQUIRE_NATIVE=1" in target
    assert "\nkernels:" in makefile and "bame_optim.kernels.build" in makefile


def test_prebuild_entry_says_where(capsys):
    if native.disabled():
        pytest.skip(f"native kernels disabled by {native.DISABLE_ENV}")
    try:
        build.main()
    except SystemExit as failure:  # no compiler here
        if native.required():
            raise
        pytest.skip(str(failure))
    out = capsys.readouterr().out
    assert "ready in" in out and native.build_key() in out


def test_a_failed_rounding_probe_makes_the_kernel_unavailable_once(monkeypatch):
    import threading
    import types

    module, calls = types.ModuleType("fake"), []

    def probe(m):
        calls.append(m)
        raise RuntimeError("rounds neither way")

    monkeypatch.delenv(native.REQUIRE_ENV, raising=False)
    state: dict[str, object] = {}
    with pytest.warns(RuntimeWarning, match="the fake kernel is unavailable, using the eager "
                      r"path \(rounds neither way\)"):
        assert native.probe_once(lambda: module, state, threading.Lock(), "fma", probe,
                                "the fake kernel is") is None
    assert native.probe_once(lambda: module, state, threading.Lock(), "fma", probe,
                            "the fake kernel is") is None
    assert calls == [module] and state["error"] == "rounds neither way"
    monkeypatch.setenv(native.REQUIRE_ENV, "1")
    with pytest.raises(RuntimeError, match="rounds neither way"):
        native.probe_once(lambda: module, {}, threading.Lock(), "fma", probe, "the fake kernel is")
    assert native.probe_once(lambda: module, {}, threading.Lock(), "fma", lambda m: True,
                            "the fake kernel is") is module
