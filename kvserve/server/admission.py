"""Admission at arrival: a generation request reserves a seat before its body is read.

    arrival ──reserve(1)──> 429 + Retry-After if more than max_queue_len would wait
       │                    (waiting = seats taken beyond the engine's max_num_seqs)
    route parses the body ──reservation.grow(n * num_prompts)──> 429 if that no longer fits
       │
    any exit (reply, error, hang-up, end of stream) ──release──> seats free again

The gate counts seats (sequences), not requests, and is the only counter: the engine never
holds more requests than the gate has seats out, so `--max-queue-len` holds during a burst
(requests are counted before the seconds spent reading and tokenizing them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from kvserve.server.errors import Rejected, send_error

RETRY_AFTER_S = "1"


@dataclass
class Reservation:
    """The seats one request holds; `grow` it once the body says how many sequences."""

    gate: AdmissionGate
    num_seats: int = 1
    released: bool = False

    def grow(self, num_seqs: int, param: str = "n") -> None:
        """Hold `num_seqs` seats instead (n x the number of prompts).

        Raises:
            ValueError: `num_seqs` could never fit (names `param`; a 400).
            Rejected: 429 (with Retry-After) if they do not fit now; the seats held are kept.
        """
        self.gate.grow(self, num_seqs, param)


class AdmissionGate:
    """Seats for sequences: `max_num_seqs` run, up to `max_queue_len` more may wait.

    With `max_queue_len` None every request is admitted (the seats are still counted).
    Only the event loop calls it, so plain ints need no lock.
    """

    def __init__(self, max_num_seqs: int, max_queue_len: int | None) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_queue_len = max_queue_len
        self.num_taken = 0

    @property
    def capacity(self) -> int | None:
        """Seats in all, or None without a limit."""
        if self.max_queue_len is None:
            return None
        return self.max_num_seqs + self.max_queue_len

    @property
    def num_waiting(self) -> int:
        """Seats taken beyond those that can run now."""
        return max(0, self.num_taken - self.max_num_seqs)

    def reserve(self) -> Reservation:
        """One seat for a request that just arrived.

        Raises:
            Rejected: 429 with Retry-After when it would make more than max_queue_len wait.
        """
        self._check_fits(1)
        self.num_taken += 1
        return Reservation(self)

    def grow(self, reservation: Reservation, num_seqs: int, param: str = "n") -> None:
        """See `Reservation.grow`."""
        if reservation.released:
            raise RuntimeError("grow after release")
        capacity = self.capacity
        if capacity is not None and num_seqs > capacity:
            raise ValueError(
                f"{param}: this request needs {num_seqs} sequences; the server admits at most "
                f"{capacity} at once (max_num_seqs {self.max_num_seqs} + max_queue_len "
                f"{self.max_queue_len})"
            )
        self._check_fits(num_seqs - reservation.num_seats)
        self.num_taken += num_seqs - reservation.num_seats
        reservation.num_seats = num_seqs

    def release(self, reservation: Reservation) -> None:
        """Give the seats back (once; later calls do nothing)."""
        if not reservation.released:
            reservation.released = True
            self.num_taken -= reservation.num_seats

    def _check_fits(self, num_more: int) -> None:
        capacity = self.capacity
        if capacity is None or num_more <= 0 or self.num_taken + num_more <= capacity:
            return
        message = (
            f"the server is full: {self.num_waiting} sequences already wait "
            f"(max_queue_len {self.max_queue_len}); retry later"
        )
        raise Rejected(429, message, "overloaded", headers={"Retry-After": RETRY_AFTER_S})


def reservation_of(request: Any) -> Reservation | None:
    """The seats of a generation request (a FastAPI `Request`), None on other routes."""
    return getattr(request.state, "admission", None)


class AdmitAtArrival:
    """ASGI middleware: POSTs to `paths` take a seat before their body is read and give it
    back when the app returns (Starlette returns after the last byte of a stream, or once
    the client hung up), or answer 429."""

    def __init__(self, app: ASGIApp, gate: AdmissionGate, paths: frozenset[str]) -> None:
        self.app, self.gate, self.paths = app, gate, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            reservation = self.gate.reserve()
        except Rejected as error:
            await send_error(send, error.status, str(error), error.kind, headers=error.headers)
            return
        scope.setdefault("state", {})["admission"] = reservation
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.release(reservation)
