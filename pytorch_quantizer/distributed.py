"""Running under ``torchrun``: the process group, each rank's shard of the images, and failures that end every rank.

``torchrun --nproc_per_node N inference_sim.py ...`` starts N copies of the driver with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``) in their environment; ``setup`` joins them into one
``torch.distributed`` process group (NCCL on GPUs, each rank on ``cuda:LOCAL_RANK`` or on the LOCAL_RANK-th
``--device_ids`` entry; gloo on CPUs) and returns a ``DistContext`` that the run receives explicitly.
A plain ``python inference_sim.py`` gets ``DistContext()`` (one process, no group): every method is then the
identity, and errors propagate unchanged.

Why the results are those of one process, bit for bit:

- **Shards are contiguous runs of whole batches** (``DistContext.shard``): rank r evaluates batches
  ``[r B / W, (r+1) B / W)`` of the B batches one process would form (``-b``), so every image goes through the
  network in exactly the batch, with exactly the batch-mates, it has in one process.  No per-sample result can
  then depend on how the data were split, even where a backend's convolution picks its algorithm by batch size.
  No image is padded or repeated (``DistributedSampler`` would pad to a multiple of W); only the last rank can
  hold the short last batch.
- **Counts are integers**: top-1 / top-5 / image counts are summed with ``all_reduce`` over int64, exact in any
  order.
- **Statistics are per-sample rows**: each rank's observers keep one row per sample (and channel); rank 0
  gathers every rank's ``StatisticsCollector.state()`` and concatenates them in rank order, which is sample order
  because the shards are contiguous, and only then computes the summaries and writes the folder (once, atomically).
  The moments kernels reduce each row on its own (kernels/stats_math.h: CPU, a fixed order for any thread count;
  CUDA, lanes and groups fixed by the row length alone), so a row does not depend on the other rows of its
  launch either.

Failures: every step that could fail on some ranks only (setting up, each pass, saving) runs inside
``DistContext.together()``, which ends with an exchange of every rank's status over a gloo group (a rank that
fails first marks the group's store, and the others leave their pass at the next batch); if any rank
failed, every rank raises ``RankFailure`` naming the lowest failed rank and its message, rank 0 prints it as the
run's one error line, and every process exits with 2.  A rank therefore never waits for a rank that has already
given up, and rank 0 never writes statistics when some rank failed.  Anything else (an interrupted process, a lost
node) ends the processes through torchrun, which stops every worker when one dies, or the group's ``timeout``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

log = logging.getLogger("pytorch_quantizer")

LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
DEFAULT_TIMEOUT_MINUTES = 30.0  # torch's own default: a rank waits this long for a lost peer at a collective


class DistributedError(ValueError):
    """A torchrun launch that cannot work as asked (bad environment, GPUs, world size)."""


FAILED_KEY = "aciq/failed"  # set in the group's store by the first rank that fails, read by the others per batch


class StoppedForPeer(Exception):
    """This rank stopped its pass early because another rank failed (not a failure of its own)."""


class RankFailure(ValueError):
    """Some rank failed; raised on every rank after the status exchange, so all of them stop together."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether torchrun (or ``torch.distributed.run``) started this process: its launch variables are set."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in LAUNCH_VARIABLES)


def environment_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as torchrun set it (0 outside torchrun or when unreadable): decides who prints
    before the process group exists."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    environ = os.environ if environ is None else environ
    return int(environ["WORLD_SIZE"]) if launched_by_torchrun(environ) else 1


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.  ``backend`` None: one plain process, no group (every method a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device | None = None  # the rank's device (None: one process, the run's --device)
    control: Any = None  # gloo group for statuses and objects (None: the default group, when it is gloo)

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, shows progress and writes files."""
        return self.rank == 0

    # -- sharding ------------------------------------------------------------------------------------------
    def shard(self, items: int, batch_size: int) -> range:
        """This rank's positions in a list of ``items`` evaluated in batches of ``batch_size``: a contiguous run of
        whole batches (see the module docstring for why whole batches); ranks beyond the batch count get none."""
        if not self.active:
            return range(items)
        batches = -(-items // batch_size)
        first, last = self.rank * batches // self.world_size, (self.rank + 1) * batches // self.world_size
        return range(min(first * batch_size, items), min(last * batch_size, items))

    def check_items(self, items: int, batch_size: int, what: str) -> None:
        """Refuse more processes than images; warn (rank 0) when some ranks get no batch."""
        if not self.active:
            return
        if items < self.world_size:
            raise DistributedError(f"torchrun started {self.world_size} processes for {items} {what} images: "
                                   f"use at most {items} processes (--nproc_per_node x --nnodes)")
        batches = -(-items // batch_size)
        if batches < self.world_size and self.is_main:
            log.warning("%d %s images make %d batches of -b %d for %d processes: %d of them stay idle; use a "
                        "smaller -b", items, what, batches, batch_size, self.world_size, self.world_size - batches)

    # -- collectives ---------------------------------------------------------------------------------------
    @contextmanager
    def together(self) -> Iterator[None]:
        """Run a step that may fail on some ranks only; every rank leaves through the status exchange, and if any
        rank failed, every rank raises ``RankFailure`` (chained to its own error, if it had one)."""
        if not self.active:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except StoppedForPeer:
            pass  # the failed rank reports its own error in the exchange
        except Exception as err:  # noqa: BLE001 - reported to every rank below, then raised again
            error = err
            _store().set(FAILED_KEY, "1")  # the others stop at their next batch instead of finishing the pass
        self.raise_failures(error)

    def stop_if_peer_failed(self) -> None:
        """Called between batches: leave the pass (``StoppedForPeer``) when another rank has failed, so that the
        failed rank does not wait a whole pass (or the timeout) for the exchange."""
        if self.active and _store().check([FAILED_KEY]):
            raise StoppedForPeer

    def raise_failures(self, error: Exception | None) -> None:
        """Exchange statuses; raise on every rank when any rank failed."""
        message = None if error is None else (" ".join(str(error).split()) or type(error).__name__)
        statuses: list[str | None] = [None] * self.world_size
        dist.all_gather_object(statuses, message, group=self.control)
        failed = [(rank, text) for rank, text in enumerate(statuses) if text is not None]
        if not failed:
            return
        rank, text = failed[0]
        if len(failed) == self.world_size and len({t for _, t in failed}) == 1:
            summary = text  # the same failure everywhere: nothing rank-specific to name
        else:
            more = [r for r, _ in failed[1:]]
            summary = f"rank {rank} of {self.world_size}: {text}" + (
                f" (ranks {', '.join(map(str, more))} failed too)" if more else "")
        raise RankFailure(summary, rank) from error

    def sum_counts(self, counts: Sequence[int]) -> list[int]:
        """Integer counts summed over the ranks (int64 all_reduce: exact in any order)."""
        if not self.active:
            return list(counts)
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        total = torch.tensor(list(counts), dtype=torch.int64, device=device)
        dist.all_reduce(total)
        return [int(v) for v in total.tolist()]

    def sum_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors by name summed over the ranks, in rank order, on the CPU: the same values on every rank (float
        sums then differ from one process's in the last bits: another order of additions)."""
        if not self.active:
            return dict(tensors)
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, {k: v.cpu() for k, v in tensors.items()}, group=self.control)
        total: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, value in part.items():
                total[name] = value if name not in total else total[name] + value
        return total

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable, on the CPU), in rank order, on rank 0; None on the others."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def end_together(self, failure: RankFailure) -> None:
        """After a failure every rank agreed on: rank 0 records it in torchrun's error file (so that torchrun's
        own failure summary shows the message), then all ranks meet once more, so that none exits (and makes
        torchrun stop the others) before rank 0 has printed the run's error line."""
        if not self.active:
            return
        if self.is_main:
            ErrorHandler().record_exception(failure)
        dist.barrier(group=self.control)

    def claim_device(self) -> None:
        """Make the rank's GPU current, or fail (naming it) when this process cannot see it.  Called inside the
        run's first ``together`` step, so that a rank without its GPU ends every rank with one line."""
        if self.device is None or self.device.type != "cuda":
            return
        visible = torch.cuda.device_count()
        if self.device.index >= visible:
            raise DistributedError(
                f"{self.device} is not visible to this process ({visible} GPU(s) visible, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        torch.cuda.set_device(self.device)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _store() -> dist.Store:
    """The key-value store of the default process group (torchrun's rendezvous store): one round trip per call."""
    return dist.distributed_c10d._get_default_store()


def setup(device: str, device_ids: Sequence[int] = (), timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
          environ: Mapping[str, str] | None = None) -> DistContext:
    """Join torchrun's process group when this process was launched by it, else ``DistContext()``.

    ``device`` is the run's ``--device`` ("cpu", "cuda" or "cuda:i"): CUDA → NCCL with the rank on
    ``cuda:LOCAL_RANK`` (or ``cuda:device_ids[LOCAL_RANK]``), CPU → gloo.  ``--device_ids`` under torchrun lists
    one GPU per process of this node, so its length must be torchrun's ``--nproc_per_node``.  Whether the rank
    sees its GPU is checked later, by ``claim_device`` inside the run's first step (NCCL touches no GPU before the
    first collective).
    """
    environ = os.environ if environ is None else environ
    if not launched_by_torchrun(environ):
        return DistContext()
    try:
        world, rank, local = (int(environ[name]) for name in LAUNCH_VARIABLES)
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as err:
        raise DistributedError(f"torchrun's launch variables are not integers ({err})") from None
    cuda = device.startswith("cuda")
    if device_ids and len(device_ids) != local_world:
        raise DistributedError(
            f"--device_ids {' '.join(map(str, device_ids))} lists {len(device_ids)} GPUs, but torchrun started "
            f"{local_world} processes on this node: give one id per process (--nproc_per_node {len(device_ids)}), "
            "or leave --device_ids out to use cuda:LOCAL_RANK")
    backend = "nccl" if cuda else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise DistributedError(f"this torch build has no {backend} backend for torchrun on {device}")
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    control = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes)) if cuda else None
    index = device_ids[local] if device_ids else local
    ctx = DistContext(rank, world, local, local_world, backend,
                      torch.device("cuda", index) if cuda else torch.device("cpu"), control)
    log.info("torchrun: rank %d of %d (local %d of %d) on %s, %s", rank, world, local, local_world, ctx.device,
             backend)
    return ctx
