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
