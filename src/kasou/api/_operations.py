"""Long pieces of work (a snapshot today; backups and migrations later) run in a thread and
tracked as ``kasou.spec.Operation`` records a client polls at ``/v1/operations/{id}``.

The table lives in kasoud's memory: operations are forgotten when kasoud restarts (the work
itself is the VM process's, which carries on). Finished ones are kept until the table holds
``KEEP`` of them, oldest dropped first.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kasou.api._problems import problem_body, problem_for
from kasou.errors import KasouError, NotFoundError
from kasou.spec import Operation, OperationState, Problem, ProblemType

__all__ = ["Operations"]

log = logging.getLogger("kasou.api")

KEEP = 256


class Operations:
    """Thread-safe table of operations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: OrderedDict[str, Operation] = OrderedDict()

    def start(self, kind: str, vm: str, work: Callable[[], dict[str, Any]]) -> Operation:
        """Run ``work`` in a thread; its result (or error) ends the operation."""
        operation = Operation(
            id=uuid.uuid4().hex,
            kind=kind,
            vm=vm,
            state=OperationState.RUNNING,
            started_at=time.time(),
        )
        with self._lock:
            self._table[operation.id] = operation
            self._trim()
        threading.Thread(
            target=self._run, args=(operation.id, work), name=f"op-{kind}-{vm}", daemon=True
        ).start()
        return operation.model_copy()

    def start_tracked(
        self, kind: str, vm: str, work: Callable[[Callable[[float], None]], dict[str, Any]]
    ) -> Operation:
        """``start`` for work that reports how far it got: ``work(report)`` calls
        ``report(share)`` (0 to 1) as it goes."""
        reported: list[str] = []
        ready = threading.Event()

        def report(share: float) -> None:
            ready.wait()
            self._progress(reported[0], share)

        operation = self.start(kind, vm, lambda: work(report))
        reported.append(operation.id)
        ready.set()
        return operation

    def _progress(self, id: str, share: float) -> None:
        with self._lock:
            current = self._table.get(id)
            if current is not None and current.state is OperationState.RUNNING:
                share = min(1.0, max(0.0, share))
                self._table[id] = current.model_copy(update={"progress": share})

    def _run(self, id: str, work: Callable[[], dict[str, Any]]) -> None:
        changes: dict[str, Any]
        try:
            result = work()
            changes = {"state": OperationState.DONE, "progress": 1.0, "result": result}
        except KasouError as error:
            kind, status = problem_for(error)
            changes = {"state": OperationState.FAILED, "error": self._problem(kind, status, error)}
        except Exception as error:  # a bug: recorded on the operation and logged
            log.error("operation %s failed", id, exc_info=error)
            changes = {
                "state": OperationState.FAILED,
                "error": self._problem(ProblemType.INTERNAL, 500, error),
            }
        with self._lock:
            current = self._table.get(id)
            if current is not None:
                self._table[id] = current.model_copy(update={**changes, "ended_at": time.time()})

    @staticmethod
    def _problem(kind: ProblemType, status: int, error: Exception) -> Problem:
        return Problem(**problem_body(kind, status, str(error)))

    def _trim(self) -> None:
        finished = [k for k, op in self._table.items() if op.state is not OperationState.RUNNING]
        for key in finished[: max(0, len(self._table) - KEEP)]:
            del self._table[key]

    def get(self, id: str) -> Operation:
        with self._lock:
            operation = self._table.get(id)
        if operation is None:
            raise NotFoundError(f"no operation {id!r}: it never existed or kasoud restarted since")
        return operation.model_copy()
