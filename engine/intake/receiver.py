"""From a received frame to its acknowledgement, without sockets.

``Receiver.frame`` reads the MSH, applies the channel's policy, hands the message to the store
writer and answers through a ``Pending`` once the outcome is known:

- AA (CA in enhanced mode) only after the message and its queue entry are committed; on a channel
  with ``ack.after: processed``, only once a worker has also written it to the record (or filtered
  it): AE with the step and reason when processing failed (or the patient's stream is parked), or
  when it did not finish within ``ack.processing_timeout`` (the message stays stored and queued);
- AE (CE) when the store or the broker failed or did not answer within the ACK timeout;
- AR (CR) when the message is refused: no MSH, unusable delimiters, required MSH fields empty,
  unsupported version or processing ID, oversize, LF segments on a strict channel, several
  messages in one frame, sender not allowed. Refused messages are recorded (status ``error``,
  step ``receive``) so operators can see them, but never queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from engine.errors import HL7Error
from engine.hl7.ack import enhanced_wants_ack, processing_error
from engine.hl7.batch import Batch, batch_response, is_batch, split_batch
from engine.hl7.header import Header, read_header, salvage_header
from engine.intake.item import Item, new_uid
from engine.intake.runtime import ChannelRuntime
from engine.intake.watch import Processed
from engine.intake.writer import Job
from engine.observe import ChannelEvents


class Pending:
    """The answer owed for one frame. The connection writes answers in frame order."""

    __slots__ = ("data", "deadline", "done", "notify", "on_timeout", "processing", "t0")

    def __init__(self, t0: float, deadline: float, notify: Callable[[], None]) -> None:
        self.t0 = t0
        self.deadline = deadline
        self.notify = notify
        self.done = False
        self.data: bytes | None = None
        self.on_timeout: Callable[[], None] | None = None
        self.processing = False  # durable, waiting for its processing outcome (ack.after: processed)

    def resolve(self, data: bytes | None) -> bool:
        """Set the answer (None: nothing is sent, e.g. enhanced mode with MSH-15 NE). First wins."""
        if self.done:
            return False
        self.done = True
        self.data = data
        self.on_timeout = None  # drop the reference cycle Pending -> Job -> done -> Pending
        self.notify()
        return True

    def expire(self) -> None:
        """Called when the ACK timeout passed without an outcome (or, for a message waiting for its
        processing, when the engine stops)."""
        if self.done:
            return
        if self.on_timeout is not None:
            self.on_timeout()
        if not self.done:
            self.resolve(None)


class Sink(Protocol):
    """Where jobs go: the store writer (``StoreClient``), or a fake in tests."""

    def submit(self, job: Job) -> None: ...


class Watcher(Protocol):
    """Tells when a stored message has been processed (``ProcessWatcher``, or a fake in tests)."""

    def watch(self, callback: Callable[[Processed], None], *, uid: str | None = None,
              message_id: int | None = None) -> Callable[[], None]: ...


# HL7 table 0357 code for an AE after processing, by the step that failed


def _wall_deadline(pending: Pending) -> float:
    return time.time() + (pending.deadline - time.monotonic())


def _enhanced(rt: ChannelRuntime, h: Header | None) -> bool:
    """Enhanced mode applies when the channel says so and the message asks for it (MSH-15/16)."""
    return rt.enhanced and h is not None and bool(h.accept_ack_type or h.application_ack_type)


class Receiver:
    def __init__(self, rt: ChannelRuntime, writer: Sink, events: ChannelEvents, watcher: Watcher | None = None) -> None:
        self.rt = rt
        self.writer = writer
        self.events = events
        self.watcher = watcher
        self.after_processed = rt.config.ack.after == "processed"
        # enhanced mode without ack.application_acks: say once that a sender asks for what is not sent
        self._unanswered_app_acks = rt.enhanced and rt.config.ack.application_acks is None
        if self.after_processed and watcher is None:
            raise ValueError(f"channel {rt.name}: ack.after processed needs a processing watcher")

    # -- entry points ------------------------------------------------------------------------------

    def frame(self, payload: bytes, peer: str, allowed: bool, pending: Pending) -> None:
        if not allowed:
            host = peer.rsplit(":", 1)[0]
            err = HL7Error("207", "SENDER_NOT_ALLOWED", f"sender address {host} is not allowed on this channel")
            self._refuse(payload, peer, pending, [err], salvage_header(payload, self.rt.codec), record=False)
            return
        if is_batch(payload):
            self._batch(payload, peer, pending)
            return
        try:
            header = read_header(payload, self.rt.codec)
        except HL7Error as err:
            self._refuse(payload, peer, pending, [err], salvage_header(payload, self.rt.codec))
            return
        problems = header.problems or self._policy(header, payload)
        if problems:
            self._refuse(payload, peer, pending, problems, header)
            return
        enhanced = _enhanced(self.rt, header)
        item = self._item(payload, peer, header, "CA" if enhanced else "AA")
        job = Job([item], partial(self._single_done, pending, enhanced), _wall_deadline(pending), key=peer)
        pending.on_timeout = partial(self._single_timeout, job, pending, enhanced)
        self.writer.submit(job)

    def oversize(self, head: bytes, size: int, peer: str, allowed: bool, pending: Pending) -> None:
        limit = self.rt.config.max_message_size
        err = HL7Error("104", "OVERSIZE", f"message of {size} bytes exceeds this channel's limit of {limit} bytes")
        try:
            header: Header | None = read_header(head, self.rt.codec)
        except HL7Error:
            header = salvage_header(head, self.rt.codec)
        self._refuse(head, peer, pending, [err], header, record=allowed, size=size)

    # -- policy ------------------------------------------------------------------------------------

    def _policy(self, h: Header, raw: bytes) -> list[HL7Error]:
        rt = self.rt
        problems: list[HL7Error] = []
        if h.version not in rt.versions:
            problems.append(HL7Error("203", "UNSUPPORTED_VERSION",
                                     f"version {h.version!r} is not accepted on this channel", "MSH^1^12"))
        if h.processing_id not in rt.processing_ids:
            accepted = ", ".join(sorted(rt.processing_ids))
            problems.append(HL7Error("202", "UNSUPPORTED_PROCESSING_ID",
                                     f"processing ID {h.processing_id!r} is not accepted on this channel "
                                     f"(accepted: {accepted})", "MSH^1^11"))
        if rt.strict_segments and b"\n" in raw:
            problems.append(HL7Error("100", "LF_SEGMENTS",
                                     "segments must end with CR; this channel refuses LF and CRLF", "MSH^1"))
        second = raw.find(b"MSH", 4)
        while second > 0 and raw[second - 1] not in (13, 10):
            second = raw.find(b"MSH", second + 3)
        if second > 0:
            problems.append(HL7Error("100", "MULTIPLE_MESSAGES",
                                     "frame holds more than one MSH segment; send one message per frame or "
                                     "wrap several in a batch (FHS/BHS)", "MSH^2"))
        return problems

    # -- single messages ---------------------------------------------------------------------------

    def _item(self, raw: bytes, peer: str, header: Header, code: str, batch_uid: str | None = None) -> Item:
        item = Item(
            uid=new_uid(), channel=self.rt.name, received_at=time.time(), peer=peer, raw=raw,
            header=header, status="queued", ack_code=code, batch_uid=batch_uid,
        )
        item.ack = self.rt.acks.build(header, code)
        if self._unanswered_app_acks and header.application_ack_type in ("AL", "ER", "SU"):
            self._unanswered_app_acks = False
            self.events.log.warning("the sender asks for application ACKs (MSH-16), which this channel does not "
                                    "send: set ack.application_acks to its listener, or it may wait for them",
                                    control_id=header.control_id, msh16=header.application_ack_type)
        return item

    def _refuse(self, raw: bytes, peer: str, pending: Pending, errors: list[HL7Error], header: Header | None,
                *, record: bool = True, size: int = 0) -> None:
        enhanced = _enhanced(self.rt, header)
        code = "CR" if enhanced else "AR"
        ack = self.rt.acks.build(header, code, errors)
        send = not enhanced or enhanced_wants_ack(header.accept_ack_type if header else "", code)
        pending.resolve(ack if send else None)
        reason = "; ".join(e.reason for e in errors)
        control = header.control_id if header else ""
        self.events.answered("refused", code, control_id=control, msg_type=header.type_label if header else "",
                             size=size or len(raw), latency=time.monotonic() - pending.t0, reason=reason)
        if record:
            item = Item(uid=new_uid(), channel=self.rt.name, received_at=time.time(), peer=peer, raw=raw,
                        header=header if header is not None and not header.salvaged else None,
                        status="error", ack_code=code, ack=ack, error_step="receive",
                        error="; ".join(e.text for e in errors), size=size)
            self._record([item])

    def _record(self, items: list[Item]) -> None:
        self.writer.submit(Job(items, _ignore, time.time() + 60, record_only=True, key=items[0].peer))

    def _single_done(self, pending: Pending, enhanced: bool, job: Job) -> None:
        item = job.items[0]
        latency = time.monotonic() - pending.t0
        if item.outcome in ("accepted", "duplicate"):
            if job.expired:  # AE went out at the timeout; the store must say so
                note = ("ACK timeout: the sender was answered AE before the store committed; the message is "
                        "stored and queued, a resend will be answered as a duplicate")
                self._correct(item, item.ack_code, item.ack, note)
                return
            if self.after_processed and not enhanced and self._await_processing(pending, item):
                return
            send = not enhanced or enhanced_wants_ack(item.header.accept_ack_type if item.header else "",
                                                      item.ack_code or "")
            pending.resolve(item.ack if send else None)
            self.events.answered(item.outcome, item.ack_code or "", control_id=item.control_id,
                                 msg_type=item.type_label, size=item.size, latency=latency)
            return
        self._failed(pending, enhanced, item, item.failure, item.failure_service)

    # -- ack.after: processed ----------------------------------------------------------------------

    def _watch(self, item: Item, callback: Callable[[Processed], None]) -> Callable[[], None] | None:
        """Follow ``item`` (a resend: its original) until processed; None if there is nothing to follow."""
        assert self.watcher is not None
        if item.outcome == "duplicate":
            if item.duplicate_of is None:
                return None
            return self.watcher.watch(callback, message_id=item.duplicate_of)
        return self.watcher.watch(callback, uid=item.uid)

    def _await_processing(self, pending: Pending, item: Item) -> bool:
        """The message is durable: answer once it is processed, or at the processing timeout."""
        cancel = self._watch(item, partial(self._processed, pending, item))
        if cancel is None:
            return False
        pending.deadline = pending.t0 + self.rt.config.ack.processing_timeout
        pending.on_timeout = partial(self._processing_timeout, pending, item, cancel)
        pending.processing = True
        return True

    def _processed(self, pending: Pending, item: Item, result: Processed | None) -> None:
        """Answer a message waiting for its processing: ``result`` None when there is none in time."""
        if pending.done:
            return
        ae, outcome, reason = self._after_processing(pending, item, result)
        if ae is not None:
            self._correct(item, "AE", ae)
        pending.resolve(item.ack)
        self.events.answered(outcome, item.ack_code or "", control_id=item.control_id, msg_type=item.type_label,
                             size=item.size, latency=time.monotonic() - pending.t0, reason=reason)

    def _after_processing(self, pending: Pending, item: Item,
                          result: Processed | None) -> tuple[bytes | None, str, str]:
        """The AE owed after processing (None: the AA prepared at receipt stands), and the outcome and
        reason to report."""
        if result is None:
            return self._unprocessed_ack(pending, item), "unprocessed", "PROCESSING_TIMEOUT"
        if result.ok:
            return None, result.status, ""
        return self._processing_ack(item, result), result.status, f"PROCESSING_{result.step.upper() or 'ERROR'}"

    def _processing_ack(self, item: Item, result: Processed) -> bytes:
        err = processing_error(result.step or result.status, result.reason or result.status)
        return self.rt.acks.build(item.header, "AE", [err])

    def _unprocessed_ack(self, pending: Pending, item: Item) -> bytes:
        if time.monotonic() < pending.deadline - 0.05:  # expired early: the engine is stopping
            waited = "before the engine stopped"
        else:
            waited = f"within {self.rt.config.ack.processing_timeout:g}s"
        return self.rt.acks.build(item.header, "AE", [HL7Error(
            "207", "PROCESSING_TIMEOUT", f"message stored and queued; no processing outcome {waited} (it will be "
            "processed, and a resend is answered with its outcome)")])

    def _processing_timeout(self, pending: Pending, item: Item, cancel: Callable[[], None]) -> None:
        cancel()
        self._processed(pending, item, None)

    def _correct(self, item: Item, code: str | None, ack: bytes | None, note: str | None = None) -> None:
        """The stored ACK is the one prepared at receipt: record the one that was sent instead (and,
        with ``note``, why; without one the stored error stays)."""
        item.ack_code, item.ack = code, ack
        self.writer.submit(Job([], _ignore, time.time() + 60, record_only=True, key=item.peer,
                               ack_corrections=[(item.uid, code, ack, note)]))

    def _single_timeout(self, job: Job, pending: Pending, enhanced: bool) -> None:
        job.expired = True
        item = job.items[0]
        timeout = self.rt.config.ack.timeout
        ack = self._error_ack(item.header, enhanced,
                              f"message not stored within the ACK timeout ({timeout:g}s); send it again")
        item.ack_code, item.ack = ("CE" if enhanced else "AE"), ack
        send = not enhanced or enhanced_wants_ack(item.header.accept_ack_type if item.header else "", "CE")
        pending.resolve(ack if send else None)
        self.events.answered("failed", item.ack_code, control_id=item.control_id, msg_type=item.type_label,
                             size=item.size, latency=time.monotonic() - pending.t0, reason="ACK_TIMEOUT")

    def _failed(self, pending: Pending, enhanced: bool, item: Item, reason: str, service: str) -> None:
        code = "CE" if enhanced else "AE"
        ack = self._error_ack(item.header, enhanced, f"message not stored ({service}: {reason}); send it again")
        if not pending.done:
            send = not enhanced or enhanced_wants_ack(item.header.accept_ack_type if item.header else "", code)
            pending.resolve(ack if send else None)
            self.events.answered("failed", code, control_id=item.control_id, msg_type=item.type_label,
                                 size=item.size, latency=time.monotonic() - pending.t0,
                                 reason=f"{service.upper()}_UNAVAILABLE")
        item.status, item.ack_code, item.ack = "error", code, ack
        item.error_step, item.error = ("enqueue" if service == "broker" else "store"), f"{service}: {reason}"
        item.outcome = item.failure = ""
        item.duplicate_of = None
        self._record([item])

    def _error_ack(self, header: Header | None, enhanced: bool, text: str) -> bytes:
        code = "CE" if enhanced else "AE"
        return self.rt.acks.build(header, code, [HL7Error("207", "NOT_STORED", text)])

    # -- batches -----------------------------------------------------------------------------------

    def _batch(self, payload: bytes, peer: str, pending: Pending) -> None:
        rt = self.rt
        codec = rt.codec
        try:
            first = payload.find(b"MSH")
            if first >= 0:
                codec = read_header(payload[first:], rt.codec).codec
        except HL7Error:
            pass
        try:
            batch = split_batch(payload, codec)
        except HL7Error as err:
            self._refuse(payload, peer, pending, [err], None)
            return
        problem = None
        if rt.config.batches == "reject":
            problem = HL7Error("207", "BATCH_REFUSED", "this channel does not accept batches; send one message "
                                                       "per frame", "BHS^1")
        elif not batch.messages and batch.declared_count:
            problem = HL7Error("100", "BATCH_EMPTY", f"BTS-1 says {batch.declared_count} messages but the batch "
                                                     "holds none", "BTS^1^1")
        if problem is not None:
            self._refuse_batch(payload, peer, pending, batch, problem, codec)
            return
        notes = []
        if batch.declared_count is not None and batch.declared_count != len(batch.messages):
            notes.append(f"BTS-1 says {batch.declared_count} messages, the batch holds {len(batch.messages)}")
        if batch.stray_segments:
            notes.append(f"{batch.stray_segments} segment(s) outside any message were ignored")
        if notes:
            self.events.log.warning("batch envelope mismatch", control_id=batch.control_id, notes="; ".join(notes))
        batch_uid = new_uid()
        items: list[Item] = []
        for raw in batch.messages:
            try:
                header = read_header(raw, codec)
                problems = header.problems or self._policy(header, raw)
            except HL7Error as err:
                header, problems = salvage_header(raw, codec), [err]  # type: ignore[assignment]
            if problems:
                ack = rt.acks.build(header, "AR", problems)
                items.append(Item(uid=new_uid(), channel=rt.name, received_at=time.time(), peer=peer,
                                  raw=raw, header=header if header is not None and not header.salvaged else None,
                                  status="error", ack_code="AR", ack=ack, error_step="receive",
                                  error="; ".join(p.text for p in problems), batch_uid=batch_uid))
            else:
                assert header is not None
                items.append(self._item(raw, peer, header, "AA", batch_uid))
        note = "; ".join(notes)
        if not items:
            self._batch_answer(pending, batch, [], codec, note=note)
            return
        job = Job(items, partial(self._batch_done, pending, batch, codec, note), _wall_deadline(pending), key=peer)
        pending.on_timeout = partial(self._batch_timeout, job, pending, batch, codec)
        self.writer.submit(job)

    def _batch_done(self, pending: Pending, batch: Batch, codec: str, note: str, job: Job) -> None:
        if job.expired:
            return
        if (self.after_processed and all(it.outcome != "failed" for it in job.items)
                and self._batch_await(pending, batch, codec, note, job)):
            return
        acks: list[str] = []
        failed: list[Item] = []
        for item in job.items:
            if item.outcome == "failed":
                failed.append(item)
                ack = self._error_ack(item.header, False, f"message not stored ({item.failure_service}: "
                                                          f"{item.failure}); send the batch again")
                item.ack_code, item.ack = "AE", ack
                acks.append(ack.decode(codec, "replace"))
            elif item.status == "error" and item.ack:
                acks.append(item.ack.decode(codec, "replace"))
            outcome = {"recorded": "refused"}.get(item.outcome, item.outcome)
            self.events.answered(outcome, item.ack_code or "", control_id=item.control_id, msg_type=item.type_label,
                                 size=item.size, latency=time.monotonic() - pending.t0, reason=item.error or "")
        self._batch_answer(pending, batch, acks, codec, total=len(job.items), note=note)
        if failed:
            for item in job.items:
                item.status = "error"
                item.error_step = item.error_step or "store"
                item.error = item.error or f"{item.failure_service}: {item.failure}"
                item.outcome, item.duplicate_of = "", None
            self._record(job.items)

    def _batch_await(self, pending: Pending, batch: Batch, codec: str, note: str, job: Job) -> bool:
        """ack.after processed: answer the batch once each stored message is processed (or at the
        processing timeout), listing those that failed or did not finish."""
        results: dict[int, Processed] = {}
        cancels: list[Callable[[], None]] = []
        followed: set[int] = set()

        def finish() -> None:
            for cancel in cancels:
                cancel()
            if pending.done:
                return
            acks: list[str] = []
            latency = time.monotonic() - pending.t0
            for i, item in enumerate(job.items):
                outcome, reason = {"recorded": "refused"}.get(item.outcome, item.outcome), item.error or ""
                if i in followed:
                    ae, outcome, reason = self._after_processing(pending, item, results.get(i))
                    if ae is not None:
                        self._correct(item, "AE", ae)
                        acks.append(ae.decode(codec, "replace"))
                elif item.status == "error" and item.ack:
                    acks.append(item.ack.decode(codec, "replace"))
                self.events.answered(outcome, item.ack_code or "", control_id=item.control_id,
                                     msg_type=item.type_label, size=item.size, latency=latency, reason=reason)
            self._batch_answer(pending, batch, acks, codec, total=len(job.items), note=note)

        def one(i: int, result: Processed) -> None:
            results[i] = result
            if len(results) == len(followed):
                finish()

        for i, item in enumerate(job.items):
            if item.outcome in ("accepted", "duplicate"):
                cancel = self._watch(item, partial(one, i))
                if cancel is not None:
                    followed.add(i)
                    cancels.append(cancel)
        if not followed:
            return False
        pending.deadline = pending.t0 + self.rt.config.ack.processing_timeout
        pending.on_timeout = finish
        pending.processing = True
        return True

    def _batch_timeout(self, job: Job, pending: Pending, batch: Batch, codec: str) -> None:
        job.expired = True
        timeout = self.rt.config.ack.timeout
        acks = [self._error_ack(it.header, False, f"batch not stored within the ACK timeout ({timeout:g}s); "
                                                  "send it again").decode(codec, "replace")
                for it in job.items]
        self._batch_answer(pending, batch, acks, codec, total=len(job.items))

    def _batch_answer(self, pending: Pending, batch: Batch, acks: list[str], codec: str, total: int = 0,
                      note: str = "") -> None:
        rt = self.rt
        comment = f"{total - len(acks)} of {total} messages accepted" + (f"; {note}" if note else "")
        text = batch_response(batch, acks, comment=comment, clock=rt.clock, control_ids=rt.control_ids,
                              application=rt.config.ack.application, facility=rt.config.ack.facility)
        pending.resolve(text.encode(codec, "replace"))

    def _refuse_batch(self, payload: bytes, peer: str, pending: Pending, batch: Batch, problem: HL7Error,
                      codec: str) -> None:
        env = batch.batch_header or batch.file_header
        header = None
        if env is not None:  # answer as if the envelope were an MSH: MSA-2 names the batch control ID
            d = env.delimiters
            header = Header(d, ["MSH", d.field, d.encoding, *[env.get(n) for n in range(3, 8)], "", "",
                                env.get(11), "P", "2.5"], codec)
        ack = self.rt.acks.build(header, "AR", [problem]).decode(codec, "replace")
        self._batch_answer(pending, batch, [ack], codec, total=max(len(batch.messages), 1))
        self.events.answered("refused", "AR", control_id=batch.control_id, msg_type="BATCH", size=len(payload),
                             latency=time.monotonic() - pending.t0, reason=problem.reason)
        self._record([Item(uid=new_uid(), channel=self.rt.name, received_at=time.time(), peer=peer,
                           raw=payload, header=None, status="error", ack_code="AR", ack=ack.encode(codec, "replace"),
                           error_step="receive", error=problem.text)])


def _ignore(_job: Job) -> None:
    return None
