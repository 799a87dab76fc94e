"""``torch.func.vmap`` over flat tuples of tensors, without its per-call pytree work.

Each call of ``torch.func.vmap(f, in_dims)(*args)`` flattens its arguments and ``in_dims`` as
pytrees, checks them, wraps each batched tensor, runs ``f``, then flattens, checks and
unflattens the outputs: about 150 us of Python per call with ten tensors on a 2-core CPU (torch
2.13), as much as a task-batched MLP step itself. A MAML meta-step over task batches makes two
such calls. The interpreter's calls are always flat: a tuple of tensors in, each batched along
dimension 0 or not at all, a tuple of tensors out, batched along dimension 0. For those,
:func:`flat_vmap` does only what ``vmap`` does per tensor: enter a vmap level, wrap the batched
inputs at it, run the function, unwrap every output at it (expanding the ones that do not
depend on the batch), leave the level.

It uses the primitives ``torch.func.vmap`` itself is built on (``torch._C._functorch``). They
are checked once, against ``torch.func.vmap`` on a small function; if a future torch lacks them
or they disagree, every call goes through ``torch.func.vmap``. Set ``MLODSL_PUBLIC_VMAP=1`` or
call :func:`use_primitives` to always go through ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mlodsl.fastpath import FastPath

try:
    from torch._C._functorch import (
        _add_batch_dim,
        _remove_batch_dim,
        _vmap_decrement_nesting,
        _vmap_increment_nesting,
    )
    from torch._functorch.vmap import lazy_load_decompositions
except ImportError:  # a torch without them: torch.func.vmap it is
    _add_batch_dim = None

_PLAIN = (torch.Tensor, torch.nn.Parameter)

TensorFn = Callable[..., tuple[torch.Tensor, ...]]


def use_primitives(enabled: bool) -> bool:
    """Turn the direct use of vmap's primitives on or off; returns the previous setting."""
    return _PATH.use(enabled)


def primitives_in_use() -> bool:
    """Whether :func:`flat_vmap` uses vmap's primitives (checking them once)."""
    return _PATH.in_use()


def _primitives_agree() -> bool:
    def f(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x @ w + b).tanh(), w.sum() * 0 + 1.0, (x * x).sum()

    gen = torch.Generator().manual_seed(0)
    w, x, b = (torch.randn(3, 2, generator=gen), torch.randn(4, 5, 3, generator=gen),
               torch.randn(2, generator=gen))
    try:
        ours = _batched(f, (None, 0, None), (w, x, b), 4)
        public = torch.func.vmap(f, in_dims=(None, 0, None))(w, x, b)
        return len(ours) == len(public) and all(
            a.shape == p.shape and torch.equal(a, p) for a, p in zip(ours, public))
    except Exception:  # noqa: BLE001 - whatever fails, torch.func.vmap is the way
        return False


def _batched(fn: TensorFn, in_dims: Sequence[int | None], args: Sequence[torch.Tensor],
             size: int) -> tuple[torch.Tensor, ...]:
    lazy_load_decompositions()  # what vmap registers before its first call; cached
    level = _vmap_increment_nesting(size, "error")
    try:
        outputs = fn(*[a if d is None else _add_batch_dim(a, d, level)
                       for a, d in zip(args, in_dims)])
        return tuple(_remove_batch_dim(out, level, size, 0) for out in outputs)
    finally:
        _vmap_decrement_nesting()


_PATH = FastPath(_add_batch_dim is not None, "MLODSL_PUBLIC_VMAP", _primitives_agree)


def flat_vmap(fn: TensorFn, in_dims: Sequence[int | None], args: Sequence[torch.Tensor]
              ) -> tuple[torch.Tensor, ...]:
    """``torch.func.vmap(fn, in_dims=tuple(in_dims))(*args)`` for a ``fn`` that takes and
    returns flat tuples of tensors (outputs batched along dimension 0).

    Args:
        fn: Takes one tensor per entry of ``args`` (per-example slices where batched), returns
            a tuple of tensors.
        in_dims: Per argument, ``0`` (batched along its first dimension) or ``None`` (shared).
        args: The tensors.
    """
    if _PATH.in_use() and len(args) == len(in_dims):
        sizes = {a.shape[0] if d == 0 and a.dim() > 0 else -1
                 for a, d in zip(args, in_dims) if d is not None}
        if (len(sizes) == 1 and -1 not in sizes
                and all(type(a) in _PLAIN for a in args)):
            return _batched(fn, in_dims, args, sizes.pop())
    # Anything else (no batched argument, sizes that disagree, ...) gets vmap's own checks
    # and errors.
    return tuple(torch.func.vmap(fn, in_dims=tuple(in_dims))(*args))
