"""SIGKILL of a notification dispatcher in the middle of its batch, against the real outbox and the
local SMTP server: nothing is ever sent twice; the message in flight at the kill is ``uncertain``
(not resent), the ones not yet handed over are sent by the next dispatcher, and the claim does not
outlive its lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from almanac.notify import outbox
from almanac.notify.fakes import FakeSmtpServer
from almanac.notify.outbox import NewNotification

pytestmark = [pytest.mark.faults]

MESSAGES = 6
LEASE_S = 2

DISPATCHER = textwrap.dedent(
    """
    import sys
    from almanac.db.connect import connect
    from almanac.notify.channels import EmailSender, SmtpConfig
    from almanac.notify.dispatch import dispatch_channel
    from almanac.settings import Settings

    port, lease = int(sys.argv[1]), int(sys.argv[2])
    settings = Settings(notify_parallel_sends=1, notify_claim_batch=50, notify_lease_s=lease,
                        notify_run_budget_s=60)
    config = SmtpConfig("127.0.0.1", port, from_addr="almanac@example.com", timeout_s=10)
    with connect() as conn:
        print(dispatch_channel(conn, "email", lambda: EmailSender(config), owner=sys.argv[3],
                               settings=settings), flush=True)
    """
)


def start_dispatcher(port: int, owner: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DISPATCHER, str(port), str(LEASE_S), owner],
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def statuses(db) -> dict[str, str]:
    db.commit()
    return dict(db.execute("SELECT idempotency_key, status FROM notifications ORDER BY id").fetchall())


def test_dispatcher_killed_mid_batch_never_sends_twice(db):
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for i in range(MESSAGES):  # slow+: the server waits before answering DATA, so a send is in flight
        outbox.enqueue(
            db,
            NewNotification(
                tenant_id=1,
                channel="email",
                kind="fault",
                idempotency_key=f"fault-{i}",
                body=f"message {i}",
                recipient=f"slow+{i}@example.com",
            ),
        )
    db.commit()
    with FakeSmtpServer(slow_seconds=1.0) as smtp:
        first = start_dispatcher(smtp.port, "first")
        smtp.wait_received(3, timeout=30)  # two answered, the third read and not yet answered
        time.sleep(0.3)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = statuses(db)
        assert list(before.values()).count("sent") == 2, before
        assert list(before.values()).count("sending") == MESSAGES - 2  # claimed by the dead one
        time.sleep(LEASE_S + 0.5)  # the lease runs out

        second = start_dispatcher(smtp.port, "second")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        after = statuses(db)
        assert after["fault-2"] == "uncertain"  # handed over, answer lost with the process
        assert [after[f"fault-{i}"] for i in (0, 1, 3, 4, 5)] == ["sent"] * 5
        assert "'sent': 3" in out
        received = [m.message_id for m in smtp.received]
    # fault-2 reached the server once (it may or may not count as delivered); nothing came twice
    assert len(received) == len(set(received)) == MESSAGES
    assert db.execute("SELECT count(*) FROM notifications WHERE claimed_by IS NOT NULL").fetchone() == (0,)
    [row] = outbox.needing_attention(db)
    assert row["idempotency_key"] == "fault-2" and "may have been sent" in row["last_error"]
