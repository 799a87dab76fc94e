"""Distributed data parallel on ``torch.distributed`` (launched with ``torchrun``).

Every rank runs the same program on its shard of every level's global batch. Because the
global loss is the mean of the ranks' losses (equal shard sizes), every gradient and every
Hessian-vector or mixed-derivative product of the global loss is the mean of the ranks'
products: mlodsl all-reduces each of them once, where it is computed (one flat vector per call),
so every solver (cg, neumann, ...) takes identical steps on every rank and parameters never
drift. See ``docs/distributed.md`` for what is reduced where.

The reductions are found through :func:`mean_`, which kernels call unconditionally: it is the
identity unless a :class:`Context` is active (only while a distributed program runs).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlodsl import consistency
from mlodsl.errors import DistributedError, NonFiniteError, TraceError

_OPTION = (
    "distributed must be 'ddp' (or True), ml.distributed.ddp(...), False (never) or None "
    "(automatic: data parallel when launched by torchrun with WORLD_SIZE > 1); got {value!r}."
)
@dataclass(frozen=True)
class DDP:
    """Options of distributed data parallel runs (see :func:`ddp`)."""

    backend: str | None = None
    timeout_s: float = 300.0
    check_every: int | None = None
    name: str = "ddp"


def ddp(*, backend: str | None = None, timeout_s: float = 300.0,
        check_every: int | None = None) -> DDP:
    """Distributed data parallel, for ``ml.program(..., distributed=ml.distributed.ddp(...))``.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``"nccl"`` when the program's device is CUDA,
            else ``"gloo"``. Ignored when the process group is already initialized.
        timeout_s: How long a rank waits for the others in one collective before failing
            with an error that names the missing rank(s).
        check_every: Compare a checksum of every level's parameters across ranks every this
            many program steps (one all-gather of two integers per level); they are also
            compared after every ``run`` call and every checkpoint. ``None``: only then.

    Example:
        >>> prog = ml.program(classifier, hpo, distributed=ml.distributed.ddp(timeout_s=60))
    """
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"ddp backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"ddp timeout_s must be positive, got {timeout_s!r}")
    if check_every is not None and (isinstance(check_every, bool)
                                    or not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"ddp check_every must be a positive integer or None, got "
                         f"{check_every!r}")
    return DDP(backend=backend, timeout_s=float(timeout_s), check_every=check_every)


def resolve(option: Any) -> DDP | None:
    """The ``distributed=`` program option as a :class:`DDP`, or ``None`` (one process).

    Raises:
        TraceError: a value that is none of the accepted ones.
    """
    if option is None:
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        initialized = (torch.distributed.is_available() and torch.distributed.is_initialized()
                       and torch.distributed.get_world_size() > 1)
        return DDP() if launched or initialized else None
    if option is False:
        return None
    if option is True or option == "ddp":
        return DDP()
    if isinstance(option, DDP):
        return option
    raise TraceError(_OPTION.format(value=option))


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this is rank 0, the rank that logs, validates and writes checkpoints."""
    return rank() == 0


_ACTIVE: Context | None = None
_CREATED: dict[str, Any] = {}  # the process group mlodsl formed (its timeout and store), if any
_SERIAL = itertools.count()  # contexts are created in the same order on every rank


def mean_(vector: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
    """Average ``vector`` over the ranks, in place, when a distributed program is running;
    otherwise return it unchanged."""
    if _ACTIVE is None:
        return vector
    return _ACTIVE.mean_(vector, what)


def mean_all_(tensors: Sequence[torch.Tensor], what: str = "an all-reduce") -> None:
    """Average several tensors over the ranks in place (one all-reduce per dtype) when a
    distributed program is running."""
    if _ACTIVE is not None:
        _ACTIVE.mean_tensors_(tensors, what)


class _MeanAllReduce(torch.autograd.Function):
    """The mean over ranks as an autograd function. Its backward averages the incoming
    gradients too, so each rank's backward pass ends with its own share of the derivative of
    the global loss, and the mean of those shares (one all-reduce at the end) is that
    derivative: nothing is counted twice."""

    @staticmethod
    def forward(ctx: Any, vector: torch.Tensor, context: Context) -> torch.Tensor:
        ctx.context = context
        return context.mean_(vector.detach().clone(), "the all-reduce of an unrolled step's "
                                                      "gradient")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _MeanAllReduce.apply(grad.contiguous(), ctx.context), None


class Context:
    """One program's view of the process group: rank, world size, collectives that fail with
    the culprit named instead of hanging, and what runs on rank 0 only.

    A world of one (``distributed="ddp"`` without ``torchrun``) makes every collective a no-op
    but keeps the data-parallel data order, so its results equal those of ``N`` ranks.
    """

    def __init__(self, config: DDP | None, device: torch.device | None) -> None:
        self.config = config
        self.enabled = config is not None
        self.rank, self.world = 0, 1
        self.store: Any = None
        self.owns_group = False
        self.failed: str | None = None
        self.aborted = False
        self.at = ""
        self.device = device
        self.prefix = f"mlodsl/{next(_SERIAL)}"
        if config is None:
            return
        dist = torch.distributed
        if not dist.is_available():
            raise DistributedError("distributed='ddp' needs a torch build with "
                                   "torch.distributed; this one has none.")
        timeout = datetime.timedelta(seconds=config.timeout_s)
        if dist.is_initialized() and _CREATED.get("timeout_s") not in (None, config.timeout_s):
            _destroy()  # ours, with another timeout: form it again with this program's
        if "LOCAL_RANK" in os.environ and device is not None and device.type == "cuda":
            if device.index is None:  # one GPU per rank
                device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
            self.device = device
        if dist.is_initialized() and _CREATED:  # an earlier program's: this one may end it too
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.store, self.owns_group = dist.PrefixStore(self.prefix, _CREATED["store"]), True
        elif dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            with contextlib.suppress(Exception):  # used only to name a failed rank
                self.store = dist.PrefixStore(self.prefix,
                                              dist.distributed_c10d._get_default_store())
        elif "WORLD_SIZE" in os.environ:
            backend = config.backend or ("nccl" if device is not None
                                         and device.type == "cuda" else "gloo")
            store, self.rank, self.world = next(dist.rendezvous("env://", timeout=timeout))
            # A namespace per context: a program started after another one's group was shut
            # down (a failure) forms a fresh group in the same store.
            self.store = dist.PrefixStore(self.prefix, store)
            dist.init_process_group(backend, store=dist.PrefixStore("group", self.store),
                                    rank=self.rank, world_size=self.world, timeout=timeout)
            self.owns_group = True
            _CREATED.update(timeout_s=config.timeout_s, store=store)
            atexit.register(_destroy)
        uses_gloo = self.world > 1 and dist.get_backend() == "gloo"
        self.comm_device = torch.device("cpu") if uses_gloo or self.device is None else (
            self.device)

    @property
    def is_main(self) -> bool:
        """Rank 0: it validates, logs, shows progress and writes checkpoints."""
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------------

    def mean_(self, vector: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
        """All-reduce ``vector`` in place to the mean over ranks."""
        if self.world == 1:
            return vector
        if vector.device != self.comm_device:
            moved = vector.to(self.comm_device)
            self._call(what, torch.distributed.all_reduce, moved)
            return vector.copy_(moved).div_(self.world)
        self._call(what, torch.distributed.all_reduce, vector)
        return vector.div_(self.world)

    def mean_tensors_(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Average several tensors in place, one all-reduce of a flat vector per dtype."""
        if self.world == 1 or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self.mean_(flat, what)
            start = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[start:start + t.numel()].view_as(t))
                    start += t.numel()

    def average_(self, record: dict[str, Any], params: Sequence[torch.Tensor] = ()) -> None:
        """Average a step's gradients (``.grad`` of ``params``) and the scalar metrics of its
        record (loss included) over the ranks, in one all-reduce: the record then holds the
        global batch's figures on every rank."""
        if self.world == 1:
            return
        keys = [k for k, v in record.items() if isinstance(v, torch.Tensor) and v.numel() == 1
                and v.is_floating_point()]
        values = [record[k].detach().reshape(1).clone() for k in keys]
        grads = [p.grad for p in params if p.grad is not None]
        self.mean_tensors_([*grads, *values], f"the all-reduce of gradients{self._of()}")
        for key, value in zip(keys, values):
            record[key] = value.reshape(())

    def average_inner(self, grads: list[torch.Tensor], differentiable: bool
                      ) -> list[torch.Tensor]:
        """An unrolled step's gradients averaged over the ranks; ``differentiable`` keeps the
        graph (see :class:`_MeanAllReduce`)."""
        if self.world == 1:
            return grads
        if not differentiable:
            self.mean_tensors_(grads, f"the all-reduce of an unrolled step's gradient{self._of()}")
            return grads
        flat = _MeanAllReduce.apply(torch.cat([g.reshape(-1) for g in grads]), self)
        return [piece.view_as(g) for piece, g in
                zip(torch.split(flat, [g.numel() for g in grads]), grads)]

    def _of(self) -> str:
        return f" ({self.at})" if self.at else ""

    def broadcast_(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Overwrite ``tensors`` with rank 0's, one broadcast per dtype."""
        if self.world == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self.comm_device)
            self._call(what, torch.distributed.broadcast, flat, src=0)
            start = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[start:start + t.numel()].view_as(t))
                    start += t.numel()

    def broadcast_object(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        self._call(what, torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def gather_objects(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        self._call(what, torch.distributed.all_gather_object, out, value)
        return out

    def barrier(self, what: str) -> None:
        """Wait for every rank."""
        if self.world > 1:
            self._call(what, torch.distributed.barrier)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            raise DistributedError(self.failed)
        try:
            return fn(*args, **kwargs)
        except RuntimeError as error:  # timeouts and closed connections (DistBackendError)
            timeout = self.config.timeout_s if self.config is not None else 0.0
            self.failed = consistency.diagnose(self.store, self.rank, self.world, what,
                                               self._of(), timeout, error)
            raise DistributedError(self.failed) from error

    # -- failures ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this context the one :func:`mean_` uses, and turn a failure on this rank into a
        fast, named failure on the others instead of a hang."""
        global _ACTIVE
        previous, _ACTIVE = _ACTIVE, (self if self.world > 1 else None)
        try:
            yield
        except NonFiniteError:
            raise  # decided on all-reduced values: every rank raises it, the group is intact
        except BaseException as error:
            self.abort(error)
            raise
        finally:
            _ACTIVE = previous

    def abort(self, error: BaseException) -> None:
        """Record why this rank stops and shut its process group down, so that the others'
        pending collective fails now, naming this rank, instead of at the timeout."""
        if self.world == 1 or self.aborted:
            return
        self.aborted = True
        victim = self.failed is not None  # it only gave up waiting for another rank
        summary = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        notes = [n for n in getattr(error, "__notes__", ()) if n.startswith("mlodsl: ")]
        if notes:
            summary += f" ({notes[0][len('mlodsl: '):]})"
        with contextlib.suppress(Exception):
            key = "gaveup" if victim else "failed"
            self.store.set(f"{key}/{self.rank}", summary)
        if not victim:
            self.failed = (f"this program's process group was shut down after rank "
                           f"{self.rank} failed: {summary}")
        if self.owns_group:
            _destroy()

    # -- consistency ---------------------------------------------------------------------------

    def start(self, graph: Any, data: dict[str, Any]) -> None:
        """At start-up: check that every rank traced the same program, then give every level
        rank 0's parameters and buffers (one broadcast per dtype)."""
        if self.world == 1:
            return
        consistency.check_supported(graph)
        self.check_same(consistency.fingerprint(graph, data))
        tensors = [t for n in graph.levels for t in (*n.params, *_buffers(n.module))]
        self.broadcast_(tensors, "the broadcast of rank 0's parameters at start-up")

    def check_same(self, fingerprint: dict[str, str]) -> None:
        """Raise on every rank when any rank traced a different program than rank 0."""
        if self.world > 1:
            consistency.compare_programs(
                self.gather_objects(fingerprint, "the program comparison at start-up"))

    def check_in_sync(self, named: dict[str, Sequence[torch.Tensor]], when: str) -> None:
        """Compare a bitwise checksum of each level's tensors across ranks; raise on drift."""
        if self.world == 1:
            return
        local = torch.stack([consistency.checksum(tensors) for tensors in named.values()])
        local = local.to(self.comm_device)  # NCCL gathers CUDA tensors only
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        self._call(f"the parameter checksum comparison {when}",
                   torch.distributed.all_gather, gathered, local)
        consistency.compare_checksums(list(named), [g.cpu() for g in gathered], when)


def _buffers(module: Any) -> list[torch.Tensor]:
    return list(module.buffers()) if isinstance(module, torch.nn.Module) else []


def _destroy() -> None:
    _CREATED.clear()
    with contextlib.suppress(Exception):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
