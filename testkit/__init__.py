"""What the tests and the benchmarks share: real server processes (the gateway, vLLM) on free ports, a tiny exported
model, real photos, cosine helpers.

A plain package beside ``tests/`` and ``benchmarks/`` (not installed; both run from the checkout's root): it never
imports pytest, ``tests`` or ``benchmarks``, so a benchmark reuses the tests' launcher without importing a test
module. Everything a process started from here writes goes under a folder the caller gives (a temporary one), never
into the checkout's ``data/`` or ``model_repo/``, so tests run beside a user's own gateway.
"""
