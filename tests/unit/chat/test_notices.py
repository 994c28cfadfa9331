"""One notice per user per channel per interval; the rest are only acknowledged."""

from __future__ import annotations

from bot.chat.notices import NOTICE_INTERVAL_SECONDS, NOTICE_TABLE_SIZE, Notices


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_notice_per_user_and_channel_per_interval() -> None:
    clock = Clock()
    notices = Notices(clock=clock)
    assert notices.should_post(1, 10)
    assert not notices.should_post(1, 10)
    assert notices.should_post(2, 10), "another channel is told on its own"
    assert notices.should_post(1, 11), "another user is told on their own"
    clock.now += NOTICE_INTERVAL_SECONDS - 1
    assert not notices.should_post(1, 10)
    clock.now += 1
    assert notices.should_post(1, 10)
    assert not notices.should_post(1, 10), "posting starts the interval over"


def test_the_table_forgets_old_entries_but_not_recent_ones() -> None:
    clock = Clock()
    notices = Notices(clock=clock)
    for user in range(NOTICE_TABLE_SIZE):
        notices.should_post(1, user)
    clock.now += NOTICE_INTERVAL_SECONDS
    assert notices.should_post(1, -1)  # prunes every entry past its interval
    assert not notices.should_post(1, -1)
    assert len(notices._last) == 1
