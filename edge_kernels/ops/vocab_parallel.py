"""Vocabulary-parallel (sharded LM head) versions of the log-prob/entropy ops: one collective each way.

Owns the sharded path of :func:`edge_kernels.linear_logprob_entropy` and :func:`edge_kernels.logprob_entropy`
(``vocab_parallel=`` over more than one rank). It is handed the backend the front-end chose (the
``(forward, backward)`` pair of :mod:`edge_kernels.backends`), runs it on each rank's vocabulary slice and
merges their per-row results; it adds no kernel.

Contract: rank ``r`` of a group of ``W`` ranks holds the ``r``-th contiguous slice ``[start_r, start_r + V_r)``
of the vocabulary (``weight [V_r, D]``, ``bias [V_r]``, ``logits [..., V_r]``), slices in rank order, sizes may
differ. ``hidden``, ``targets`` (global ids), ``temperature`` and ``ignore_index`` are the same on every rank,
and so are the upstream gradients of the replicated outputs (every rank computes the same loss). Every rank
returns the full-vocabulary ``logp`` and ``entropy``.

Forward, one collective. A slice's ``(lse_r, H_r)`` are its softmax statistics re-based on ``lse_r``:
``(m, s, b) = (lse_r, 1, -H_r)`` in :mod:`edge_kernels.core.stats`'s notation (``s = sum exp(z - lse_r) = 1``,
``b = sum p_r (z - lse_r) = -H_r``), so merging slices is the split-vocabulary merge
(``combine_stats_stacked``) the Triton kernels already use. Each rank all-gathers ``[lse_r, H_r, zt_r]``
(``zt_r`` the target logit if the target is in its slice, else 0) plus a few integers (``V_r``, ``D``,
``start_r``) in ONE ``all_gather_single`` (``all_gather_into_tensor``) of ``3N + 6`` floats; the integers
check the hidden sizes and the slice offsets and give the global vocabulary for the target range check.

Slice offsets: a rank must know its own ``start_r`` before its forward (to find the targets it owns). With
``vocab_start=`` given, no extra collective (the gathered sizes still verify it); otherwise one small
all-gather of the ``W`` slice sizes comes first. So the forward makes 1 collective with ``vocab_start=`` and 2
without.

Backward: each rank forms its slice's logits gradient with the GLOBAL ``lse`` and entropy (the unsharded
backward launchers, given a local target that is ``-1`` outside the slice), so ``d_weight``/``d_bias`` are the
exact slices of the unsharded gradients; its ``d_hidden`` is the partial sum over its slice, all-reduced (SUM,
in fp32) once when ``reduce_hidden_grad=True``, returned as is when False (callers whose own collective sums
it: Megatron sequence parallelism's reduce-scatter, verl).

Callers must keep the shapes (``N``) equal across ranks: an all-gather of different sizes is a malformed
collective (gloo raises; NCCL may hang). Different ``D`` is detected and raised on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import backends
from ..core.params import LaunchParams
from ..core.stats import combine_stats_stacked, finalize_stats
from .backend_choice import resolve_impl
from .validation import check_softcap, check_targets, check_temperature, validate_linear_inputs

Tensor = torch.Tensor

# integers ride in the fp32 gather as base-2**20 digit pairs (fp32 holds integers < 2**24 exactly): exact up to
# 2**40; three of them, (V_r, D, start_r or -1), make the 6 floats after the 3N statistics
_DIGIT = 1 << 20

# the bound the public functions' validation checks targets against before the forward (negatives and dtype
# only): the global vocabulary is known after the gather, which checks the upper bound
UNCHECKED_VOCAB = 1 << 62


@dataclass(frozen=True)
class VocabParallel:
    """The vocabulary-parallel settings of one call (``vocab_parallel=`` of :func:`edge_kernels.linear_logprob_entropy`,
    :func:`edge_kernels.logprob_entropy` and :func:`edge_kernels.fused_linear_policy_loss`), checked on
    construction.

    Attributes:
        process_group: the ``torch.distributed`` group over which the LM head (or the logits) is sharded by
            vocabulary, rank r holding the r-th contiguous slice; a one-rank group runs the unsharded op.
        vocab_start: this rank's first vocabulary id, or None (one extra all-gather finds it).
        reduce_hidden_grad: hidden states in only: True sums ``d_hidden`` over the group (one all-reduce);
            False returns this rank's partial ``d_hidden`` (for callers whose own collective sums it).
    """

    process_group: Any
    vocab_start: Optional[int] = None
    reduce_hidden_grad: bool = True

    def __post_init__(self):
        if self.process_group is None:
            raise ValueError("VocabParallel.process_group is required (for an unsharded head pass "
                             "vocab_parallel=None)")
        vs = self.vocab_start
        if vs is not None and (isinstance(vs, bool) or not isinstance(vs, int) or vs < 0):
            raise ValueError(f"VocabParallel.vocab_start must be a non-negative int or None, got {vs!r}")
        if not isinstance(self.reduce_hidden_grad, bool):
            raise TypeError(f"VocabParallel.reduce_hidden_grad must be a bool, got {self.reduce_hidden_grad!r}")


def check_options(options: Optional[VocabParallel], hidden_states_in: bool) -> bool:
    """True when the call is sharded (a group of > 1 ranks). Raises, naming the option, where one cannot apply:
    a non-``VocabParallel`` value, ``reduce_hidden_grad=False`` on the logits-in op (it has no ``d_hidden``), or
    ``vocab_start`` other than 0 on a one-rank group (an unsharded vocabulary starts at 0)."""
    if options is None:
        return False
    if not isinstance(options, VocabParallel):
        raise TypeError(f"vocab_parallel must be an edge_kernels.VocabParallel or None, got "
                        f"{type(options).__name__}")
    if not hidden_states_in and not options.reduce_hidden_grad:
        raise ValueError("VocabParallel.reduce_hidden_grad=False applies to hidden-states-in ops only: "
                         "logprob_entropy takes logits and returns no hidden-state gradient")
    sharded = group_size(options.process_group) > 1
    if not sharded and options.vocab_start not in (None, 0):
        raise ValueError(f"VocabParallel.vocab_start={options.vocab_start!r} needs a process_group of more than "
                         f"one rank (an unsharded vocabulary starts at 0)")
    return sharded


def group_size(process_group) -> int:
    """Ranks in ``process_group``; 1 for ``None`` (the unsharded op)."""
    if process_group is None:
        return 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("a process group was given but torch.distributed is not initialized")
    return dist.get_world_size(process_group)


def _sentinel(ignore_index: int) -> int:
    # a local target that matches no column of the slice and is not ignore_index (rows must still be computed)
    return -1 if ignore_index != -1 else -2


def _encode(*ints: int) -> list:
    out = []
    for x in ints:
        x = int(x) + 1  # -1 (no vocab_start) encodes as 0
        out += [float(x // _DIGIT), float(x % _DIGIT)]
    return out


def _decode(meta: Tensor) -> Tensor:
    """``[W, 2k]`` digit pairs -> int64 ``[W, k]``."""
    m = meta.double().round().to(torch.int64)
    return m[:, 0::2] * _DIGIT + m[:, 1::2] - 1


def slice_start(local_vocab: int, process_group, vocab_start: Optional[int]) -> int:
    """This rank's first vocabulary id: ``vocab_start`` if given (no collective), else the sum of the lower
    ranks' slice sizes from one all-gather of the sizes."""
    if vocab_start is not None:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start must be a non-negative int or None, got {vocab_start!r}")
        return vocab_start
    world = dist.get_world_size(process_group)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=_comm_device(process_group))
    sizes = torch.empty(world, dtype=torch.int64, device=mine.device)
    _all_gather_flat(sizes, mine, process_group)
    return int(sizes[: dist.get_rank(process_group)].sum())


def _all_gather_flat(out: Tensor, mine: Tensor, process_group) -> None:
    """``out [W * k]`` <- every rank's ``mine [k]`` (one collective; ``all_gather_single`` is the name
    ``all_gather_into_tensor`` took in torch 2.13)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=process_group)


def _comm_device(process_group) -> torch.device:
    backend = dist.get_backend(process_group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def local_targets(targets: Tensor, start: int, local_vocab: int, ignore_index: int, backward: bool = False):
    """Targets as columns of this slice; rows whose target lies elsewhere get a sentinel that matches no column
    (forward: never ``ignore_index``, so the row is still computed; backward: ``-1``, as the kernels expect)."""
    local = targets - start
    owned = (targets != ignore_index) & (local >= 0) & (local < local_vocab)
    other = -1 if backward else _sentinel(ignore_index)
    keep = owned | (targets == ignore_index) if not backward else owned
    return torch.where(keep, torch.where(owned, local, targets), torch.full_like(targets, other)), owned


def merge_gathered(stats: Tensor, targets: Tensor, ignore_index: int, name: str = "targets"):
    """Global ``(logp, entropy, lse)`` from the gathered ``[W, 3N + 6]``; checks the ranks' integers."""
    world = stats.shape[0]
    n = targets.shape[0]
    meta = _decode(stats[:, 3 * n:])
    sizes, dims, starts = meta[:, 0], meta[:, 1], meta[:, 2]
    if bool((dims != dims[0]).any()):
        raise ValueError(f"hidden sizes differ across the ranks of process_group: {dims.tolist()} "
                         f"(every rank must pass the same hidden [..., D])")
    offsets = torch.cumsum(sizes, 0) - sizes
    if bool(((starts >= 0) & (starts != offsets)).any()):
        raise ValueError(f"vocab_start disagrees with the ranks' slice sizes {sizes.tolist()} (slices are "
                         f"contiguous in rank order, so rank r starts at {offsets.tolist()}[r]); got "
                         f"{starts.tolist()}")
    vocab = int(sizes.sum())
    check_targets(targets, targets.shape, vocab, ignore_index, name=name)
    s3 = stats[:, : 3 * n].view(world, 3, n)
    lse_r, ent_r, zt = s3[:, 0], s3[:, 1], s3[:, 2].sum(dim=0)
    empty = torch.isneginf(lse_r)  # a slice whose logits are all -inf (masked) contributes nothing
    s = torch.where(empty, torch.zeros_like(lse_r), torch.ones_like(lse_r))
    b = torch.where(empty, torch.zeros_like(lse_r), -ent_r)
    lse, entropy = finalize_stats(*combine_stats_stacked(lse_r, s, b))
    valid = targets != ignore_index
    zero = torch.zeros_like(lse)
    return torch.where(valid, zt - lse, zero), torch.where(valid, entropy, zero), lse


def gather_and_merge(logp_r, ent_r, lse_r, owned, targets, ignore_index, local_vocab, hidden_size, start,
                     vocab_start, process_group, name="targets"):
    """The forward's one collective: all-gather ``[lse_r, H_r, zt_r, meta]`` and merge (see the module doc)."""
    zt_r = torch.where(owned, logp_r + lse_r, torch.zeros_like(lse_r))  # the backends return zt - lse
    meta = torch.tensor(_encode(local_vocab, hidden_size, -1 if vocab_start is None else start),
                        dtype=torch.float32, device=lse_r.device)
    mine = torch.cat([lse_r.float(), ent_r.float(), zt_r.float(), meta])
    world = dist.get_world_size(process_group)
    dev = _comm_device(process_group)
    gathered = torch.empty(world * mine.numel(), dtype=torch.float32, device=dev)
    _all_gather_flat(gathered, mine.to(dev), process_group)
    return merge_gathered(gathered.view(world, -1).to(lse_r.device), targets, ignore_index, name)


def reduce_hidden_grad(dh: Tensor, process_group) -> Tensor:
    """SUM the partial ``d_hidden`` over the group in fp32 (one all-reduce); returns the input dtype."""
    dev = _comm_device(process_group)
    acc = dh.to(device=dev, dtype=torch.float32)
    if acc.data_ptr() == dh.data_ptr():
        acc = acc.clone()
    dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=process_group)
    return acc.to(device=dh.device, dtype=dh.dtype)


def _upstream(grad_logp, grad_entropy, targets, ignore_index, lse):
    valid = targets != ignore_index
    zero = torch.zeros_like(lse)
    g_logp = zero if grad_logp is None else torch.where(valid, grad_logp.float(), zero).contiguous()
    g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.float(), zero).contiguous()
    return g_logp, g_ent


class VocabParallelLinearFunction(torch.autograd.Function):
    """Sharded ``linear_logprob_entropy`` over flat, validated inputs (``hidden [N, D]``, ``targets [N]``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params, backend, process_group, vocab_start, reduce_grad):
        fwd, _ = backend
        ignore_index = params.ignore_index
        vocab_r = weight.shape[0]
        start = slice_start(vocab_r, process_group, vocab_start)
        t_local, owned = local_targets(targets, start, vocab_r, ignore_index)
        logp_r, ent_r, lse_r = fwd(hidden, weight, bias, t_local, params)
        logp, entropy, lse = gather_and_merge(logp_r, ent_r, lse_r, owned, targets, ignore_index, vocab_r,
                                              hidden.shape[1], start, vocab_start, process_group)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.meta = (params, backend, process_group, start, reduce_grad)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        params, backend, group, start, reduce_grad = ctx.meta
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        g_logp, g_ent = _upstream(grad_logp, grad_entropy, targets, params.ignore_index, lse)
        t_local, _ = local_targets(targets, start, weight.shape[0], params.ignore_index, backward=True)
        _, bwd = backend
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = bwd(hidden, weight, bias, t_local, lse, entropy, g_logp, g_ent, params, needs)
        if dh is not None and reduce_grad:
            dh = reduce_hidden_grad(dh, group)
        return (dh, dw, db) + (None,) * 6


class VocabParallelLogitsFunction(torch.autograd.Function):
    """Sharded ``logprob_entropy`` over ``logits [B, T, V_r]`` (unit vocab stride) and flat targets."""

    @staticmethod
    def forward(ctx, logits, targets, params, inplace_backward, backend, process_group, vocab_start):
        fwd, _ = backend
        ignore_index = params.ignore_index
        vocab_r = logits.shape[-1]
        start = slice_start(vocab_r, process_group, vocab_start)
        t_local, owned = local_targets(targets, start, vocab_r, ignore_index)
        logp_r, ent_r, lse_r = fwd(logits, t_local, params)
        logp, entropy, lse = gather_and_merge(logp_r, ent_r, lse_r, owned, targets, ignore_index, vocab_r, 0,
                                              start, vocab_start, process_group)
        ctx.set_materialize_grads(False)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.meta = (params, inplace_backward, backend, start)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        params, inplace, backend, start = ctx.meta
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        g_logp, g_ent = _upstream(grad_logp, grad_entropy, targets, params.ignore_index, lse)
        t_local, _ = local_targets(targets, start, logits.shape[-1], params.ignore_index, backward=True)
        inplace = inplace and torch._debug_has_internal_overlap(logits) == 0
        out = logits if inplace else torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        _, bwd = backend
        return (bwd(logits, t_local, lse, entropy, g_logp, g_ent, params, out),) + (None,) * 6


# ----------------------------------------------------------------------------------------------------------
# rows that differ per rank (data parallel) with the head sharded by vocabulary over the same group (FSDP2)


class _GatherRows(torch.autograd.Function):
    """All-gather ``[n, D]`` row blocks into ``[W * n, D]``; backward: the SUM over ranks of the gradient of this
    rank's block (a reduce-scatter; all-reduce + slice on gloo, which lacks it)."""

    @staticmethod
    def forward(ctx, x, process_group):
        world = dist.get_world_size(process_group)
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
        _all_gather_flat(out, x.contiguous(), process_group)
        ctx.meta = (process_group, x.shape[0])
        return out

    @staticmethod
    def backward(ctx, grad):
        group, n = ctx.meta
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "gloo":
            dist.all_reduce(grad, group=group)
            return grad[rank * n:(rank + 1) * n].clone(), None
        out = torch.empty((n,) + tuple(grad.shape[1:]), device=grad.device, dtype=grad.dtype)
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


class _SumUpstream(torch.autograd.Function):
    """Identity on the gathered outputs ``[2, W * n]``; backward: SUM the ranks' upstream gradients (each rank's
    loss reaches only its own rows), so every rank backpropagates every rank's loss, as the vocabulary-parallel
    op requires (one all-reduce)."""

    @staticmethod
    def forward(ctx, stacked, process_group):
        ctx.group = process_group
        return stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def linear_logprob_entropy_data_parallel(hidden: Tensor, weight: Tensor, targets: Tensor, *, process_group,
                                         vocab_start: int, bias: Optional[Tensor] = None,
                                         temperature: float = 1.0, ignore_index: int = -100,
                                         chunk_size: Optional[int] = None, softcap: Optional[float] = None,
                                         impl: str = "auto", weight_grad_scale: float = 1.0):
    """``linear_logprob_entropy`` for data-parallel rows with the head sharded by vocabulary over the same group
    (FSDP2's dim-0 shard of ``lm_head.weight``): each rank passes its OWN ``hidden [N_r, D]``/``targets [N_r]``
    (``N_r`` may differ, 0 included) and its slice ``weight [V_r, D]`` starting at ``vocab_start``, and gets its
    rows' ``(logp, entropy)``; no rank holds the whole head.

    Composition: the rows are all-gathered (padded to the largest ``N_r``; one small all-gather of the ``N_r``
    first, one of the targets), the vocabulary-parallel op runs on them with a partial ``d_hidden``, and the
    backward sums the ranks' upstream gradients (one all-reduce), then reduce-scatters ``d_hidden`` back to the
    rows' owners. Collectives: 4 forward (sizes, rows, targets, statistics), 2 backward. ``d_weight``/``d_bias``
    are the slice of the gradient of the SUM of the ranks' losses, times ``weight_grad_scale`` (``1 / W`` gives
    FSDP2's default average). Bytes: ``W * max N_r * D`` elements each way, against ``V * D`` to gather the head.
    """
    if hidden.dim() == 2 and hidden.shape[0] > 0:  # before any collective, so a bad call fails here, by name
        validate_linear_inputs(hidden, weight, targets, bias, temperature, chunk_size, ignore_index,
                               target_vocab=UNCHECKED_VOCAB)
    elif hidden.dim() != 2:
        raise ValueError(f"hidden must be [N_r, D] (this rank's rows), got shape {tuple(hidden.shape)}")
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    device = hidden.device
    counts = torch.empty(world, dtype=torch.int64, device=_comm_device(process_group))
    _all_gather_flat(counts, torch.tensor([hidden.shape[0]], dtype=torch.int64, device=counts.device),
                     process_group)
    n_max, n = max(counts.tolist()), hidden.shape[0]
    if n_max == 0:  # every rank agrees: no row anywhere
        zero = (hidden.float().sum() + weight.float().sum()) * 0.0
        return zero.expand(0), zero.expand(0)
    h_pad = torch.cat([hidden, hidden.new_zeros((n_max - n, hidden.shape[1]))]) if n < n_max else hidden
    t_pad = torch.cat([targets.to(torch.int64), targets.new_full((n_max - n,), ignore_index, dtype=torch.int64)])
    h_all = _GatherRows.apply(h_pad, process_group)
    t_all = torch.empty(world * n_max, dtype=torch.int64, device=_comm_device(process_group))
    _all_gather_flat(t_all, t_pad.to(t_all.device), process_group)
    t_all = t_all.to(device)
    backend = backends.get("linear_logprob_entropy", resolve_impl(impl, hidden, weight, op="linear_logprob_entropy"))
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()  # the kernels' unit feature stride
    w = _ScaleGrad.apply(weight, weight_grad_scale) if weight_grad_scale != 1.0 else weight
    b = _ScaleGrad.apply(bias, weight_grad_scale) if (bias is not None and weight_grad_scale != 1.0) else bias
    params = LaunchParams(1.0 / check_temperature(temperature), ignore_index, check_softcap(softcap), chunk_size)
    logp, ent = VocabParallelLinearFunction.apply(h_all, w, b, t_all, params, backend, process_group, vocab_start,
                                                  False)
    both = _SumUpstream.apply(torch.stack([logp, ent]), process_group)
    mine = both[:, rank * n_max: rank * n_max + n]
    return mine[0], mine[1]
