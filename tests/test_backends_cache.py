"""`auto` (and an explicit name) resolve from a cache: backend availability depends on no
tensor, so it is evaluated once per state of what it depends on, not on every op call."""

from __future__ import annotations

import torch

from lora_fused import backends


def counting_evaluations(monkeypatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    evaluate = backends._evaluate_unavailable_reason

    def counted(name, device_type):
        calls.append((name, device_type))
        return evaluate(name, device_type)

    monkeypatch.setattr(backends, "_evaluate_unavailable_reason", counted)
    monkeypatch.setattr(backends, "_reason_cache", {})
    monkeypatch.setattr(backends, "_auto_cache", {})
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    return calls


def test_auto_evaluates_availability_once(monkeypatch):
    calls = counting_evaluations(monkeypatch)
    for name in backends.BACKEND_NAMES:  # every loader has run: the registries no longer change
        try:
            backends._load(name)
        except backends.BackendUnavailableError:
            pass
    first = backends.resolve_backend("auto", "cpu", torch.float32, 4)
    evaluated = len(calls)
    assert evaluated >= 1
    for _ in range(5):
        assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32, 4) is first
        backends.resolve_backend(first.name, "cpu", torch.float32, 4)
    assert len(calls) == evaluated, calls


def test_the_cache_follows_what_availability_depends_on(monkeypatch):
    calls = counting_evaluations(monkeypatch)
    backends.unavailable_reason("torch", "cpu")
    before = len(calls)
    # triton's answer for CPU tensors depends on TRITON_INTERPRET: flip it
    monkeypatch.setenv("TRITON_INTERPRET", "0" if backends._triton_interpreting() else "1")
    backends.unavailable_reason("torch", "cpu")
    assert len(calls) == before + 1
    monkeypatch.setitem(backends._load_errors, "cuda", "backend 'cuda' is unavailable: test")
    monkeypatch.delitem(backends._loaded, "cuda", raising=False)
    assert backends.unavailable_reason("cuda", "cpu") == "backend 'cuda' is unavailable: test"
    assert "cuda" not in backends.candidate_backend_names("auto", "cpu")
