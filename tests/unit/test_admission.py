"""The engine's flow control and mailbox, driven in-process without sockets or workers."""

from __future__ import annotations

import threading

import pytest
import zmq

from stoker.server.engine.admission import Admission, Verdict
from stoker.server.engine.mailbox import Mailbox
from stoker.server.engine.records import PendingSend
from stoker.server.workers.slots import SlotPool

CLIENT = b"\x00client-a"


def key(k: int) -> tuple[str, int, int, int]:
    return ("job", 0, 0, k)


def finished_send(slot, k: int) -> PendingSend:
    # A tracker with no pending messages is done, as one whose bytes the kernel took.
    return PendingSend(zmq.MessageTracker(), slot, CLIENT, key(k), 100, 2, 0.0, 0.0)


def test_a_window_admits_then_parks_then_refuses_and_ignores_re_asks() -> None:
    admission = Admission(window=2)
    peer = admission.touch(CLIENT, now=1.0)
    verdicts = [admission.decide(peer, key(k)) for k in range(5)]
    assert verdicts == [Verdict.ADMIT, Verdict.ADMIT, Verdict.DEFER, Verdict.DEFER, Verdict.BUSY]
    assert admission.decide(peer, key(0)) is Verdict.DUPLICATE  # in flight
    assert admission.decide(peer, key(3)) is Verdict.DUPLICATE  # parked
    assert admission.inflight == 2


def test_the_window_bounds_the_granted_prefetch_and_follows_a_live_change() -> None:
    admission = Admission(window=4)
    assert [admission.granted(asked) for asked in (None, 0, 2, 4, 99)] == [4, 4, 2, 4, 4]
    admission.window = 1
    peer = admission.touch(CLIENT, now=1.0)
    assert [admission.decide(peer, key(k)) for k in range(3)] == [Verdict.ADMIT, Verdict.DEFER, Verdict.BUSY]
    assert admission.granted(3) == 1


def test_a_completed_send_frees_its_place_for_the_oldest_parked_request() -> None:
    admission = Admission(window=2)
    peer = admission.touch(CLIENT, now=1.0)
    for k in range(4):
        admission.decide(peer, key(k))
    with SlotPool(2**20) as slots:
        slot = slots.acquire(100)
        assert slot is not None
        promoted = admission.delivered(finished_send(slot, 0), now=2.0)
    assert promoted == [key(2)]
    assert peer.inflight == {key(1), key(2)} and list(peer.deferred) == [key(3)]
    assert (peer.stats.batches, peer.stats.images, peer.stats.bytes) == (1, 2, 100)


def test_silent_clients_are_found_and_forgotten() -> None:
    admission = Admission(window=2)
    admission.touch(CLIENT, now=1.0)
    admission.touch(b"other", now=9.0)
    assert admission.silent(now=10.0, timeout_s=5.0) == [CLIENT]
    assert admission.forget(CLIENT) is not None and admission.get(CLIENT) is None
    assert admission.forget(CLIENT) is None
    admission.release(CLIENT, key(0))  # releasing for a gone client is harmless


def test_the_mailbox_runs_commands_on_the_draining_thread_and_fails_them_after_close() -> None:
    mailbox = Mailbox()
    ran_on: list[str] = []
    future = mailbox.submit(lambda x: ran_on.append(threading.current_thread().name) or x * 2, (21,))
    failing = mailbox.submit(lambda: 1 / 0, ())
    worker = threading.Thread(target=mailbox.run_pending, name="engine-stand-in")
    worker.start()
    worker.join(10)
    assert future.result(timeout=10) == 42 and ran_on == ["engine-stand-in"]
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    pending = mailbox.submit(lambda: 1, ())
    mailbox.close()
    with pytest.raises(RuntimeError, match="engine stopped"):
        pending.result(timeout=10)
    with pytest.raises(RuntimeError, match="engine is stopped"):
        mailbox.submit(lambda: 1, ()).result(timeout=10)
