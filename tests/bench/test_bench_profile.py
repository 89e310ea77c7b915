"""The profile's stage clock (bench/profile.py): exclusive times, and wrappers that come off."""

from __future__ import annotations

import time

from bench.profile import STAGES, StageClock


def test_a_nested_stage_is_charged_to_itself_not_to_its_caller() -> None:
    clock = StageClock()
    inner = clock.wrap("inner", lambda: time.sleep(0.05))

    def outer_body() -> None:
        time.sleep(0.02)
        inner()

    clock.wrap("outer", outer_body)()
    assert clock.seconds["inner"] >= 0.05
    # The caller keeps its own 20 ms, not the 70 ms it spent in all.
    assert 0.02 <= clock.seconds["outer"] < 0.045
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
