"""The engine loop on its own thread, streaming outputs to asyncio consumers.

    event loop (FastAPI)                         engine thread (owns the Engine)
    generate(): tokenize + validate (a worker)   loop:
        commands += AddRequest  -------------->      apply AddRequest, AbortRequest
        await queue  <---------call_soon-------      outputs = engine.step()
    consumer gone: commands += AbortRequest          each output -> its request's queue

Only the engine thread calls the engine, so requests join and leave only between steps and a
model step never runs on (or blocks) the event loop. Invalid input raises ValueError in
`generate` before anything is queued. A request whose consumer goes away (client disconnect,
cancellation) is aborted before the next step and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from kvserve.engine.continuation import ContinuedSample
from kvserve.engine.engine import Engine
from kvserve.engine.prompts import PromptInput, TokenizedPrompt
from kvserve.engine.slo import SLO, EngineLoad, StepRates
from kvserve.kv.kv_events import KVEvent
from kvserve.outputs import EngineMetrics, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.engine_commands import (
    AbortRequest,
    AddRequest,
    Command,
    LoadReport,
)
from kvserve.server.inspector.publisher import KVInspector
from kvserve.server.slo_gate import SLOGate

logger = logging.getLogger("kvserve")


class EngineDeadError(RuntimeError):
    """A model step failed; the request cannot finish (the server answers 500)."""


# What a request's queue receives: its outputs, or the error that ends it.
Delivery = RequestOutput | Exception


class AsyncEngine:
    """Runs `engine.step()` on a background thread; `generate` is an async stream.

    `AsyncEngine(engine)` steps an engine built elsewhere; `AsyncEngine.build(make_engine)`
    builds it on the loop's thread, as `kvserve serve` does. That matters for speed: libgomp
    spins its idle workers between parallel regions only while it manages no more threads than
    there are CPUs, and each thread that runs torch's parallel ops keeps a team of its own. An
    engine loaded on the main thread and stepped on another leaves two teams, and the steps
    ran 20-30% slower (docs/benchmarks.md, "Serving at engine speed").
    """

    def __init__(self, engine: Engine, slo: SLO | None = None) -> None:
        self._start(lambda: engine, slo)

    @classmethod
    def build(cls, make_engine: Callable[[], Engine], slo: SLO | None = None) -> AsyncEngine:
        """Call `make_engine()` on a new engine thread and step what it returns there; raises
        what `make_engine` raised. With `slo`, requests predicted to miss it are refused
        (`generate` raises SLOMiss; server/slo_gate.py)."""
        self = cls.__new__(cls)
        self._start(make_engine, slo)
        return self

    def _start(self, make_engine: Callable[[], Engine], slo: SLO | None) -> None:
        """Start the engine thread: it calls `make_engine()`, then runs the loop."""
        self.slo_gate = (
            SLOGate(slo) if slo is not None and any(v is not None for v in slo) else None
        )
        self._applied_seq = 0  # the last SLO-gated request queued in the engine
        self.load_report = LoadReport(0, EngineLoad(0, 0), StepRates())
        self._commands: deque[Command] = deque()
        self._kv_events: deque[KVEvent] = deque()  # the engine's, until take_kv_events
        # Called on the engine thread when a step adds KV events (kvserve cluster's replica
        # wakes its long poll with it).
        self.on_kv_events: Callable[[], None] | None = None
        self._wake = threading.Event()
        # the KV inspector's copies and series (server/inspector/), taken on the engine thread
        self.inspector = KVInspector()
        self.inspector.wake = self._wake.set
        self._num_steps = 0
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delivery]]] = {}
        self._stopping = False
        built: queue.Queue[BaseException | None] = queue.Queue(maxsize=1)

        def build_and_run() -> None:
            try:
                self.engine = make_engine()
            except BaseException as error:
                built.put(error)
                return
            built.put(None)
            self._run()

        self._thread = threading.Thread(target=build_and_run, name="kvserve-engine", daemon=True)
        self._thread.start()
        error = built.get()
        if error is not None:
            raise error

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        """Most requests the engine runs at once (admission sizes its seats by it)."""
        return self.engine.config.max_num_seqs

    @property
    def num_unfinished(self) -> int:
        """Requests queued or running (read without the engine thread: may lag a step)."""
        return len(self._queues)

    def new_request_id(self, prefix: str) -> str:
        """`prefix-` + a random uuid4 hex: unique across restarts and replicas."""
        return f"{prefix}-{uuid.uuid4().hex}"

    def get_metrics(self) -> EngineMetrics:
        """A snapshot of the engine's counters (read while a step may run: ints, no locks)."""
        return self.engine.get_metrics()

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def collectors(self) -> list[Any]:
        return []

    def take_kv_events(self) -> list[KVEvent]:
        """The prefix-cache events the engine recorded since the last call, oldest first
        (none unless the engine was built with `enable_kv_events`)."""
        events = []
        while self._kv_events:  # the engine thread appends at the other end
            events.append(self._kv_events.popleft())
        return events

    async def generate(
        self,
        request_id: str,
        prompt: PromptInput | TokenizedPrompt,
        params: SamplingParams,
        seq: int = 0,
        continue_from: list[ContinuedSample] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request and yield its cumulative output after every step that advanced it.

        `seq` is the request's number in an SLO gate outside (`kvserve cluster`'s, which reads
        `load_report` to know which of its admissions the engine has queued); this engine's
        own gate, when it has one, numbers the request itself. `continue_from`: the samples'
        output so far, made by another engine (`Engine.add_request`).

        Raises:
            ValueError: the prompt or parameters are invalid (nothing was queued).
            SLOMiss: predicted to miss the server's latency objective (nothing was queued).
            EngineDeadError: a model step failed.
        """
        tokenized = await asyncio.to_thread(self._tokenize_and_validate, prompt, params)
        if self.slo_gate is not None:  # raises SLOMiss before anything is queued
            seq = self.slo_gate.admit(len(tokenized.prompt_token_ids), params.n)
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._submit(AddRequest(request_id, tokenized, params, seq, continue_from))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, Exception):
                    raise EngineDeadError(str(item)) from item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._submit(AbortRequest(request_id))

    def shutdown(self) -> None:
        """Stop the loop thread after the current step, then close the engine (its KV
        saves finish); a loop still stepping after 60 s leaves the engine open."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=60)
        if not self._thread.is_alive():
            self.engine.close()

    def _tokenize_and_validate(
        self, prompt: PromptInput | TokenizedPrompt, params: SamplingParams
    ) -> TokenizedPrompt:
        """The prompt tokenized once (its cache salt kept), checked against the engine."""
        tokenized = self.engine.tokenize(prompt)
        self.engine.validate(tokenized.prompt_token_ids, params)
        return tokenized

    def _submit(self, command: Command) -> None:
        self._commands.append(command)
        self._wake.set()

    def _run(self) -> None:
        self._publish_load()  # the rates the engine has (none, or a test's) before any step
        while not self._stopping:
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                self.inspector.update(self.engine, self._num_steps, changed=False)
                continue
            self._step()

    def _apply_commands(self) -> None:
        if not self._commands:
            return
        while self._commands:
            match self._commands.popleft():
                case AddRequest(request_id, prompt, params, seq, continue_from):
                    self._applied_seq = max(self._applied_seq, seq)
                    try:
                        self.engine.add_request(
                            request_id, prompt, params, continue_from=continue_from
                        )
                    except ValueError as error:  # e.g. a request id already in use
                        self._deliver(request_id, error)
                case AbortRequest(request_id):
                    self.engine.abort_request(request_id)
        self._publish_load()

    def _publish_load(self) -> None:
        """Publish the engine's load and rates as they stand now (`load_report`, the SLO
        gate), and the events of the prefix cache to `take_kv_events`."""
        events = self.engine.take_kv_events()
        if events:
            self._kv_events.extend(events)
            if self.on_kv_events is not None:
                self.on_kv_events()
        report = LoadReport(
            self._applied_seq, self.engine.get_load(), copy.copy(self.engine.step_rates)
        )
        self.load_report = report  # replaced whole: readers on other threads see one report
        if self.slo_gate is not None:
            self.slo_gate.publish(*report)
        self.inspector.update(self.engine, self._num_steps, changed=True)

    def _step(self) -> None:
        try:
            self._num_steps += 1
            outputs = self.engine.step()
        except Exception as error:  # a bug or out of memory: fail those requests, keep serving
            logger.exception("engine step failed; failing the requests in flight")
            for request_id in list(self._queues):
                self.engine.abort_request(request_id)
                self._deliver(request_id, error)
            return
        for output in outputs:
            self._deliver(output.request_id, output)
        self._publish_load()

    def _deliver(self, request_id: str, item: Delivery) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)
