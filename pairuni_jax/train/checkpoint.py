"""Orbax checkpointing for the training loops: asynchronous saves, keep-N, resume, save on SIGTERM.

A checkpoint holds two items: `state`, any pytree of arrays (params, LoRA params, optimizer
state, step, rng key data), and `meta`, a small JSON dict (data-iterator position, stage
bookkeeping). Saves are asynchronous: the loop goes on while the arrays are written; `close()`
waits for them.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from pairuni_jax import files


class Checkpointer:
    """Keeps the last `keep` checkpoints of one training stage under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
        self.directory = files.absolute(directory)  # a local path, or a bucket URL
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = True) -> None:
        """Start saving `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
            ),
            force=force,
        )

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore checkpoint `step` (default: latest) into the structure, shapes, dtypes and
        shardings of `target` (arrays or jax.ShapeDtypeStruct). Returns (state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"] or {})

    def meta(self, step: int | None = None) -> dict:
        """The JSON meta of checkpoint `step` (default: latest), without reading its state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """Turns SIGTERM (a TPU VM preemption notice, or a scheduler's stop) into a flag the loop polls,
    so it can save a checkpoint at a step boundary and exit cleanly instead of dying mid-write."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._signals = signals
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame) -> None:
        self._event.set()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
