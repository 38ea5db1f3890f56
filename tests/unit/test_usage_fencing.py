"""The usage publisher is gated on the membership lease, as the stitcher's outputs are."""

from __future__ import annotations

from processor.usage._plugin import may_publish
from processor.worker._faust import MembershipLease


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rollups_and_checkpoints_wait_for_a_valid_lease() -> None:
    clock = Clock()
    lease = MembershipLease(session_timeout_s=10, fraction=0.4, clock=clock)
    assert not may_publish(lease)  # never confirmed by the coordinator yet
    lease.renew(sent_at=clock.now)
    assert may_publish(lease)
    clock.now += 4.0  # paused past the lease (4 s of a 10 s session): may be a zombie
    assert not may_publish(lease)
    assert not may_publish(lease, revoking=True)
    lease.revoke()  # the revocation it learns of after resuming: no last checkpoint
    assert not may_publish(lease, revoking=True)
    lease.renew(sent_at=clock.now)
    assert may_publish(lease)


def test_a_revocation_under_a_valid_lease_still_writes_the_last_checkpoint() -> None:
    clock = Clock()
    lease = MembershipLease(session_timeout_s=10, fraction=0.4, clock=clock)
    lease.renew(sent_at=clock.now)
    lease.revoke()  # a rebalance began while this member still owned its partitions
    assert not may_publish(lease)  # the periodic publisher waits for the new assignment
    assert may_publish(lease, revoking=True)  # the revoked partitions' last checkpoint


def test_an_app_without_a_lease_publishes() -> None:
    assert may_publish(None)


async def test_the_publisher_waits_for_a_renewal_instead_of_skipping_its_turn() -> None:
    """A lease that lapses just before each tick and is renewed just after (heartbeats and
    the publisher's timer at the same period) must not starve the rollups."""
    import asyncio

    from processor.usage._plugin import lease_renewed

    lease = MembershipLease(session_timeout_s=10, fraction=0.4)
    assert not lease.valid()

    async def heartbeat_answered_later() -> None:
        await asyncio.sleep(0.05)
        lease.renew(sent_at=lease.clock())

    renewal = asyncio.ensure_future(heartbeat_answered_later())
    assert await lease_renewed(lease, within_s=1.0)
    await renewal
    lease.revoke()
    assert not await lease_renewed(lease, within_s=0.05)  # never renewed: the turn waits
    assert await lease_renewed(None, within_s=0)  # a bare app has no lease


def test_heartbeats_are_derived_from_the_lease_and_a_too_slow_one_is_refused() -> None:
    import pytest
    from pydantic import ValidationError

    from processor.settings import Settings

    assert Settings(session_timeout_s=3).heartbeat_interval_s == 0.4  # 1.2 s lease / 3
    assert Settings(session_timeout_s=30).heartbeat_interval_s == 1.0  # at most 1 s
    assert Settings(session_timeout_s=3, heartbeat_interval_s=0.5).heartbeat_interval_s == 0.5
    with pytest.raises(ValidationError, match="at most half the membership lease"):
        Settings(session_timeout_s=3, heartbeat_interval_s=1.0)
