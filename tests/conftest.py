"""Test tiers: every test not marked e2e, slurm or slow is in the quick tier (marker ``quick``,
``make test-quick``); skipped SLURM, multi-host and other-Python tests are repeated in the summary with
the reason."""

from __future__ import annotations

import pytest

NOT_QUICK = ("e2e", "slurm", "slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in NOT_QUICK):
            item.add_marker(pytest.mark.quick)


def pytest_terminal_summary(terminalreporter):
    for marker, what in (("slurm", "SLURM"), ("hosts", "multi-host fault"), ("pythons", "other-Python")):
        skipped = [r for r in terminalreporter.stats.get("skipped", []) if marker in getattr(r, "keywords", {})]
        if skipped:
            reason = skipped[0].longrepr[2] if isinstance(skipped[0].longrepr, tuple) else str(skipped[0].longrepr)
            terminalreporter.write_sep("!", f"{len(skipped)} {what} tests did not run", yellow=True, bold=True)
            terminalreporter.write_line(reason.removeprefix("Skipped: "))
