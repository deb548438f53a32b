"""Sync mode from the client's side: the vote that commits a step, and pulls that read one step only.

A sync-mode push is two-phase (docs/consistency.md): every shard prepares its part (phase 1,
the push itself), then the client votes at the coordinator, shard 0, which answers once the
step is committed everywhere (phase 2). A push whose vote failed is sent again under the same
sequence, so the server counts this replica once.
"""
import time

from . import errors
from .proto import sparseps_pb2 as pb
from .pushes import iterations_after


class StaleGradient(errors.Aborted):
    """Sync mode: the push was for a step that had already been applied, so it was dropped."""

    def __init__(self, message, iterations=None):
        super().__init__(message)
        self.iterations = iterations or {}


class Sync:
    def __init__(self, shards, client_id: str):
        self._shards, self.client_id = shards, client_id
        self.pending: dict[int, int] = {}   # sync step -> sequence of its push whose vote failed
        self._modes: dict[str, str] = {}

    def mode_of(self, optimizer: str) -> str:
        """An optimizer's consistency mode ("async", "sync", "bounded"), asked once."""
        if optimizer not in self._modes:
            if not optimizer:
                return "async"
            info = self._shards.read(0, "GetOptimizer", pb.GetOptimizerRequest(name=optimizer))
            self._modes[optimizer] = {pb.SYNC: "sync", pb.BOUNDED: "bounded"}.get(info.consistency.mode, "async")
        return self._modes[optimizer]

    def repeat_of(self, step):
        """The sequence to push `step` under again, if its earlier push's vote failed (else None)."""
        return self.pending.get(step) if step is not None else None

    def after_push(self, step, seq: int, opt_names: list, responses: dict, vote=None):
        """What push() returns once every shard answered: the iterations after the step (a dict for
        several optimizers); in sync mode after the vote (`vote`, default self.vote). StaleGradient
        if the step was dropped."""
        its = iterations_after(responses.values())
        pending = self.pending
        if any(r.stale for r in responses.values()):
            pending.pop(step, None)
            raise StaleGradient(f"push for step {step} arrived after that step was applied; it was dropped",
                                iterations=its)
        if any(r.prepared for r in responses.values()):   # sync mode: phase 1 done everywhere
            pending[step or 0] = seq
            try:
                it = (vote or self.vote)(opt_names[0], step or 0, seq)
            except StaleGradient:
                pending.pop(step or 0, None)
                raise
            for s in [s for s in pending if s <= (step or 0)]:
                pending.pop(s, None)
            return it
        return next(iter(its.values())) if len(its) == 1 else its

    def vote(self, optimizer: str, step: int, seq: int) -> int:
        """Phase 2: tell the coordinator (shard 0) this push is prepared on every shard; it answers
        once the step is committed everywhere (iterations after it) or stale."""
        timeout = self._shards.timeout
        # the coordinator gives up waiting for votes early enough that its answer (how many replicas
        # voted) reaches us before our own deadline, even on a busy machine
        wait = max(1e-3, timeout - max(0.2 * timeout, 0.5)) if timeout else 0.0
        req = pb.SyncVoteRequest(optimizer=optimizer, step=step, timeout_seconds=wait,
                                 replica=pb.ReplicaRef(client_id=self.client_id, sequence=seq))
        resp = self._shards.each("SyncVote", {0: req})[0]
        if resp.stale:
            raise StaleGradient(f"sync step {step} of {optimizer!r} already had its replicas_to_aggregate gradients "
                                f"(or was applied); this push was dropped: compute step {resp.iterations} next",
                                iterations={optimizer: resp.iterations})
        return resp.iterations

    @staticmethod
    def one_step_read(name: str, read, min_iterations: int, timeout: float, slot: str):
        """Rows that all come from one step s >= min_iterations, never mixed across shards:
        read(min_iterations, seen) again at the newest step any shard answered at, until they agree."""
        deadline = time.monotonic() + (timeout or 60.0)
        while True:
            seen = set()
            out = read(min_iterations, seen)
            if len(seen) <= 1:
                return out
            if time.monotonic() > deadline:
                raise errors.DeadlineExceeded(f"pull of {name!r}: the shards kept answering at different "
                                              f"steps {sorted(seen)}")
            min_iterations = max(seen)
            if slot:   # GetSlot cannot wait server-side: the commit round takes milliseconds
                time.sleep(0.005)
