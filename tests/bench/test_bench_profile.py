"""The profile's stage clock (bench/profile.py): exclusive times, and wrappers that come off."""

from __future__ import annotations

import pytest

import bench.profile
from bench.profile import STAGES, StageClock


def test_a_nested_stage_is_charged_to_itself_not_to_its_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A clock the stages advance by hand: the figures are exact, whatever the machine's load.
    now = [0.0]
    monkeypatch.setattr(bench.profile.time, "perf_counter", lambda: now[0])

    def spend(seconds: float) -> None:
        now[0] += seconds

    clock = StageClock()
    inner = clock.wrap("inner", lambda: spend(5.0))

    def outer_body() -> None:
        spend(2.0)
        inner()

    clock.wrap("outer", outer_body)()
    # The caller keeps its own 2 s, not the 7 s it spent in all.
    assert clock.seconds == {"inner": 5.0, "outer": 2.0}
    assert clock.calls == {"inner": 1, "outer": 1}


def test_the_wrappers_are_installed_on_the_write_path_and_removed_afterwards() -> None:
    originals = [owner.__dict__[name] for _, owner, name in STAGES]
    with StageClock().installed():
        assert all(
            owner.__dict__[name] is not original
            for (_, owner, name), original in zip(STAGES, originals, strict=True)
        )
    assert [owner.__dict__[name] for _, owner, name in STAGES] == originals


def test_the_wrappers_come_off_after_an_error() -> None:
    originals = [owner.__dict__[name] for _, owner, name in STAGES]
    try:
        with StageClock().installed():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [owner.__dict__[name] for _, owner, name in STAGES] == originals
