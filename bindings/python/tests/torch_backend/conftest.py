"""Shared setup of the oxccl.torch tests.

These tests need torch and the built `oxccl` package. When either is missing they are
skipped with the reason printed; with OXCCL_REQUIRE_TORCH=1 (as CI sets) they fail instead.
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _missing() -> str | None:
    try:
        import torch  # noqa: F401
        import torch.distributed as dist
    except Exception as e:  # noqa: BLE001
        return f"torch is not importable ({e})"
    if not dist.is_available():
        return "this torch has no torch.distributed"
    try:
        import oxccl.torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"oxccl.torch is not importable ({e}); build it with `pip install ./bindings/python`"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("OXCCL_REQUIRE_TORCH") == "1":
        raise pytest.UsageError(f"OXCCL_REQUIRE_TORCH=1 but {reason}")
    print(f"\noxccl.torch tests skipped: {reason}", file=sys.stderr)
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))
