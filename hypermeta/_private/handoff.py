"""Driving an estimator's window from the user's own loop, one training step per call.

An estimator trains a whole window in one call, pulling each step's batch with
``run.train_batches.next()`` and the validation batch with ``run.valid_batches.next()``. A
user's loop instead hands over one step at a time, as functions of the model. The window runs
in a worker thread whose pulls wait for the caller's next step; the caller waits until the
step is done, so exactly one of the two threads runs at any time and the step happens during
the call, with the user's current batch.

The "batches" are the user's loss functions; :class:`LossModule` makes ``loss_fn(model(batch),
None)`` evaluate one on the (possibly patched) model.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from hypermeta._private.denormals import flushing


class LossModule(torch.nn.Module):
    """``module(loss_of)`` is ``loss_of(model)``: the user's model, or ``higher``'s patched copy of it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        loss = loss_of(self.model)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if torch.is_tensor(loss) else type(loss).__name__
            raise ValueError(f"a loss function given to HyperOptimizer.step returned {got}, not a scalar tensor")
        return loss.reshape(())


def picked(loss: torch.Tensor, _: None) -> torch.Tensor:
    """The ``loss_fn`` of a run whose model output already is the loss."""
    return loss


class Handoff:
    """One window at a time in a worker thread, fed a step per :meth:`feed`."""

    def __init__(self) -> None:
        self._to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._to_caller: queue.SimpleQueue = queue.SimpleQueue()
        self.train_batches = _Pull(self, "train")
        self.valid_batches = _Pull(self, "valid")
        self.running = False
        self.broken = False

    def start(self, window: Callable[[], object]) -> None:
        self.running = True
        threading.Thread(target=self._work, args=(window, flushing()), daemon=True).start()
        self._reply()  # the worker asks for its first step (or fails before)

    def feed(self, train_batch, valid_batch):
        """One step of the running window; its result if the window ended with this step, else ``None``.

        Anything raised meanwhile (by the user's loss in the worker, or an interrupt in the caller)
        leaves the window unfinished: it is stopped, and the handoff is ``broken`` from then on.
        """
        try:
            self._to_worker.put(train_batch)
            kind, value = self._reply()
            if kind == "valid":
                self._to_worker.put(valid_batch)
                kind, value = self._reply()
        except BaseException:
            self.broken = True
            self.close()
            raise
        return value if kind == "done" else None

    def close(self) -> None:
        """Stop a window left unfinished: its worker thread ends at its next pull, nothing is committed."""
        if not self.running:
            return
        self.running = False
        self._to_worker.put(_CANCEL)
        while self._to_caller.get()[0] not in ("done", "error"):  # a pull the worker made before the cancel
            pass

    def _reply(self):
        kind, value = self._to_caller.get()
        if kind in ("done", "error"):
            self.running = False
        if kind == "error":
            raise value
        return kind, value

    def _work(self, window, flush_denormals: bool) -> None:
        torch.set_flush_denormal(flush_denormals)  # as the caller's thread: not every platform passes it on
        try:
            self._to_caller.put(("done", window()))
        except BaseException as error:  # noqa: BLE001 -- handed to the caller's thread, raised there
            self._to_caller.put(("error", error))

    def pull(self, kind: str):
        self._to_caller.put((kind, None))
        batch = self._to_worker.get()
        if batch is _CANCEL:
            raise _Cancelled
        return batch


_CANCEL = object()


class _Cancelled(BaseException):
    """Ends a cancelled window in its worker thread (a BaseException, so that no estimator catches it)."""


class _Pull:
    def __init__(self, handoff: Handoff, kind: str) -> None:
        self._handoff, self._kind = handoff, kind

    def next(self):
        return self._handoff.pull(self._kind), None
