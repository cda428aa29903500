"""Bytes on the wire: what one worker sends and receives per training step.

Every strategy counts its collectives here, from the tensors it hands to torch.distributed
(``numel * element_size``), so runs of sync SGD, GTC, BMUF and GTC-BMUF are compared in one unit.

Conventions (N = workers in the collective's group, b = bytes of the tensor one worker hands in)

    ==============  ===================  ===================  ===============  ======================
    collective      sent (wire)          received (wire)      payload          algorithm assumed
    ==============  ===================  ===================  ===============  ======================
    all_reduce      2 (N-1)/N b          2 (N-1)/N b          b                ring (reduce-scatter
                                                                               + all-gather)
    all_gather      (N-1) b              (N-1) b              b                ring, or direct to
                                                                               each peer: the same
    broadcast       b, 0 on the last     0 on the source,     b on the         pipelined ring from
                    rank of the ring     b elsewhere          source, else 0   the source
    ==============  ===================  ===================  ===============  ======================

* **sent / received** are the bytes a bandwidth-optimal implementation of the collective moves
  over this worker's link. They are what a network cost model charges, and they grow with N
  for all_gather (GTC's exchange) but not for all_reduce.
* **payload** is the worker's own contribution: the bytes of the tensor it hands to the
  collective, counted once. For GTC it is the padded message; for a dense all-reduce the
  gradient itself.
* **dense equivalent**: what the same step would cost with sync SGD, i.e. a ring all-reduce of
  the gradient (the strategy reports the gradient's bytes with :meth:`CommStats.record_dense`).
  ``dense_bytes`` uses the wire convention and ``dense_payload_bytes`` the payload convention,
  so ``compression_ratio = dense_bytes / bytes_sent`` (wire) and
  ``payload_compression_ratio = dense_payload_bytes / payload_bytes`` (the codec alone; for GTC
  about 1 / density). For N = 2 the two ratios coincide.

Step means are over the steps closed with :meth:`CommStats.step`. Nothing here talks to a process
group; it is plain bookkeeping, and a simulated cluster can feed it the same way.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

KINDS = ("all_reduce", "all_gather", "broadcast")
_COUNTERS = ("bytes_sent", "bytes_received", "payload_bytes", "dense_bytes", "dense_payload_bytes",
             "elements_sent", "elements_total", "collectives")


def _nbytes(tensor_or_nbytes: torch.Tensor | int) -> int:
    if isinstance(tensor_or_nbytes, torch.Tensor):
        return tensor_or_nbytes.numel() * tensor_or_nbytes.element_size()
    return int(tensor_or_nbytes)


def all_reduce_bytes(nbytes: int, world_size: int) -> tuple[float, float, float]:
    """(sent, received, payload) of one worker in a ring all-reduce of `nbytes` per worker."""
    wire = 2.0 * (world_size - 1) / world_size * nbytes
    return wire, wire, float(nbytes)


def all_gather_bytes(nbytes: int, world_size: int) -> tuple[float, float, float]:
    """(sent, received, payload) of one worker in an all-gather of `nbytes` from each worker."""
    wire = float((world_size - 1) * nbytes)
    return wire, wire, float(nbytes)


def broadcast_bytes(nbytes: int, world_size: int, rank: int, src: int) -> tuple[float, float, float]:
    """(sent, received, payload) of group rank `rank` in a pipelined ring broadcast from `src`."""
    if world_size == 1:
        return 0.0, 0.0, float(nbytes)
    position = (rank - src) % world_size  # 0 is the source, world_size - 1 the end of the ring
    sent = float(nbytes) if position < world_size - 1 else 0.0
    received = float(nbytes) if position > 0 else 0.0
    return sent, received, float(nbytes) if position == 0 else 0.0


class CommStats:
    """Per-step byte and element counts of one worker, with means over the closed steps.

    ``record*`` adds to the open step; :meth:`step` closes it (adds it to the running sums and
    keeps it as the last step). ``world_size`` is the default N for the ``record_*`` helpers;
    pass another one for a collective over a subgroup.
    """

    __slots__ = ["world_size", "rank", "steps", "_open", "_last", "_sums", "_by_kind"]

    def __init__(self, world_size: int, rank: int = 0) -> None:
        if world_size < 1:
            raise ValueError(f"Arg `world_size` must be a positive value, got {world_size}")
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.steps = 0
        self._open = dict.fromkeys(_COUNTERS, 0.0)
        self._last = dict.fromkeys(_COUNTERS, 0.0)
        self._sums = dict.fromkeys(_COUNTERS, 0.0)
        self._by_kind = {k: 0.0 for k in KINDS}  # wire bytes sent per kind, summed over steps

    # -- recording ------------------------------------------------------------------------
    def record(self, kind: str, sent: float, received: float, payload: float | None = None) -> None:
        """Add one collective's bytes (wire convention) to the open step; payload defaults to sent."""
        if kind not in KINDS:
            raise ValueError(f"Arg `kind` must be one of {KINDS}, got {kind!r}")
        self._open["bytes_sent"] += sent
        self._open["bytes_received"] += received
        self._open["payload_bytes"] += sent if payload is None else payload
        self._open["collectives"] += 1
        self._by_kind[kind] += sent

    def record_all_reduce(self, tensor_or_nbytes: torch.Tensor | int, world_size: int | None = None) -> None:
        self.record("all_reduce", *all_reduce_bytes(_nbytes(tensor_or_nbytes), world_size or self.world_size))

    def record_all_gather(self, tensor_or_nbytes: torch.Tensor | int, world_size: int | None = None) -> None:
        """`tensor_or_nbytes` is this worker's contribution, not the gathered output."""
        self.record("all_gather", *all_gather_bytes(_nbytes(tensor_or_nbytes), world_size or self.world_size))

    def record_broadcast(self, tensor_or_nbytes: torch.Tensor | int, src: int = 0, rank: int | None = None,
                         world_size: int | None = None) -> None:
        n = world_size or self.world_size
        self.record("broadcast", *broadcast_bytes(_nbytes(tensor_or_nbytes), n,
                                                  self.rank if rank is None else rank, src))

    def record_dense(self, nbytes: int, world_size: int | None = None) -> None:
        """The dense equivalent of this step's traffic: a ring all-reduce of `nbytes` of gradient."""
        wire, _, payload = all_reduce_bytes(int(nbytes), world_size or self.world_size)
        self._open["dense_bytes"] += wire
        self._open["dense_payload_bytes"] += payload

    def record_elements(self, sent: int, total: int) -> None:
        """Gradient elements this worker sent this step, out of `total` (density = sent / total)."""
        self._open["elements_sent"] += sent
        self._open["elements_total"] += total

    def step(self) -> None:
        """Close the open step."""
        for k, v in self._open.items():
            self._sums[k] += v
        self._last = self._open
        self._open = dict.fromkeys(_COUNTERS, 0.0)
        self.steps += 1

    # -- reading --------------------------------------------------------------------------
    @staticmethod
    def _summary(c: Mapping[str, float], steps: int) -> dict[str, float]:
        d = max(steps, 1)
        out = {
            "bytes_sent_per_worker_per_step": c["bytes_sent"] / d,
            "bytes_received_per_worker_per_step": c["bytes_received"] / d,
            "payload_bytes_per_worker_per_step": c["payload_bytes"] / d,
            "dense_bytes_per_worker_per_step": c["dense_bytes"] / d,
            "dense_payload_bytes_per_worker_per_step": c["dense_payload_bytes"] / d,
            "compression_ratio": c["dense_bytes"] / c["bytes_sent"] if c["bytes_sent"] else float("inf"),
            "payload_compression_ratio": (c["dense_payload_bytes"] / c["payload_bytes"]
                                          if c["payload_bytes"] else float("inf")),
            "elements_sent_per_step": c["elements_sent"] / d,
            "elements_total_per_step": c["elements_total"] / d,
            "density": c["elements_sent"] / c["elements_total"] if c["elements_total"] else 0.0,
            "collectives_per_step": c["collectives"] / d,
        }
        if not c["dense_bytes"] and not c["bytes_sent"]:
            out["compression_ratio"] = out["payload_compression_ratio"] = 1.0
        return out

    def last_step(self) -> dict[str, float]:
        """The last closed step (one step, not a mean): for per-step logging."""
        return self._summary(self._last, 1)

    def per_step(self) -> dict[str, float]:
        """Means over all closed steps (for results.json), plus `steps`."""
        out = self._summary(self._sums, self.steps)
        out["steps"] = float(self.steps)
        for kind, sent in self._by_kind.items():
            out[f"{kind}_bytes_sent_per_worker_per_step"] = sent / max(self.steps, 1)
        return out

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain floats and ints (loads with ``torch.load(weights_only=True)``)."""
        return {"world_size": self.world_size, "rank": self.rank, "steps": self.steps,
                "sums": dict(self._sums), "last": dict(self._last), "by_kind": dict(self._by_kind)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._sums = {k: float(state["sums"].get(k, 0.0)) for k in _COUNTERS}
        self._last = {k: float(state["last"].get(k, 0.0)) for k in _COUNTERS}
        self._by_kind = {k: float(state["by_kind"].get(k, 0.0)) for k in KINDS}
        self._open = dict.fromkeys(_COUNTERS, 0.0)

    def __repr__(self) -> str:
        s = self.per_step()
        return (f"CommStats(world_size={self.world_size}, steps={self.steps}, "
                f"sent/step={s['bytes_sent_per_worker_per_step']:.0f} B, "
                f"compression_ratio={s['compression_ratio']:.2f})")
