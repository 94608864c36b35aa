"""LoRA ops for vLLM's CPU engine, grouped by adapter: one matrix product per adapter segment.

vLLM 0.32's CPU ops (`vllm/lora/ops/torch_ops/lora_ops.py`) gather a copy of the stacked weights for every
token (`lora_b_weights[lora_indices_tensor]`, a tokens x out x rank tensor) and run an einsum over it; a token
whose index is -1 ("no LoRA") gathers the *last* slot, so base-model rows in a mixed batch get an adapter's
delta. The ops here do what the GPU kernels and S-LoRA/Punica's SGMV do instead:

    indices (one adapter slot per row, -1 = none)  ->  groups: [(slot, rows), ...]   once per engine step
    for each group:  y[rows] += (x[rows] @ A[slot].T * scale) @ B[slot].T            plain GEMMs, no gather

Rows with index -1 are in no group, so they cost nothing and get no delta. `rows` is a slice when a slot's
rows are contiguous (the usual case: one request's prompt, or a batch of one adapter), else an index tensor.

Two refinements for where dispatch, not arithmetic, is the cost. Where the CPU has no native bfloat16/float16
matrix product (no AVX512-BF16/FP16, no AMX: an AVX2 machine), `torch.mm` in those dtypes runs a slow generic
path (10-20x slower than float32 at a 256-token prefill on an AVX2 EPYC), so the layout keeps the weights in
float32 and each delta is rounded to the output's dtype once; so do small layers where those products are
native only through oneDNN (AVX512-BF16 without AMX), whose set-up per call outweighs a decode step's
product (`layout_dtype`). And when a decode batch holds several adapters with
a few rows each (three or more; a thousand adapters under uniform traffic: one each), one batched product
over each row's own weights (`torch.bmm` on copies made with `index_select`, `gather_plan`) replaces two to
four small products per adapter, where those copies are small (the tiny model's layers; not an 8B's): on the
tiny model's four layers, 32 rows over 32 adapters went from 4.8 to 0.57 ms (before and after this change),
and against the per-adapter products in one process 3 adapters with a row each cost 0.8x (AVX512-BF16 EPYC,
2026-12-04).

Weight layouts are vLLM's: `lora_a` stacked as (max_loras, 1, rank, in), `lora_b` as
(max_loras, 1, out, rank). `lora_linear` (the projections: almost all of the work) keeps the rank
intermediate in the weights' dtype and uses vLLM's packed kernel where it can (`sgl_supported`); the other ops
keep it in float32, as vLLM's ops do, and expand in the output's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

Rows = slice | torch.Tensor
Groups = list[tuple[int, Rows]]
#: One batched product over each row's own weights: the rows with an adapter (None: all of them), their slots.
Gather = tuple[torch.Tensor | None, torch.Tensor]

#: A batch takes the gathered product when it has at least this many adapter groups ...
GATHER_MIN_GROUPS = 3
#: ... of at most this many rows each on average (decode), ...
GATHER_ROWS_PER_GROUP = 8
#: ... and a row's copy of its weights (A and every slice's B, in the layout's dtype) is at most this.
GATHER_BYTES = 256 * 2**10


def group_rows(indices: torch.Tensor) -> Groups:
    """Group the rows of a batch by adapter slot; rows of slot -1 are left out.

    A slot whose rows form one run gets a slice; a slot seen in several runs gets the index tensor of its
    rows.
    """
    n = int(indices.numel())
    if n == 0:
        return []
    values, counts = torch.unique_consecutive(indices, return_counts=True)
    slots, lengths = values.tolist(), counts.tolist()
    if len(slots) == 1:
        return [] if slots[0] < 0 else [(slots[0], slice(0, n))]
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for slot, length in zip(slots, lengths, strict=True):
        if slot >= 0:
            runs.setdefault(slot, []).append((start, start + length))
        start += length
    groups: Groups = []
    for slot, spans in runs.items():
        if len(spans) == 1:
            groups.append((slot, slice(*spans[0])))
        else:
            rows = torch.cat([torch.arange(s, e, device=indices.device) for s, e in spans])
            groups.append((slot, rows))
    return groups


def gather_plan(indices: torch.Tensor, groups: Groups) -> Gather | None:
    """The gathered product's rows and slots for a batch of many small adapter groups, else None."""
    n = int(indices.numel())
    if len(groups) < GATHER_MIN_GROUPS or n > GATHER_ROWS_PER_GROUP * len(groups):
        return None
    covered = indices >= 0
    if bool(covered.all()):
        return None, indices.long()
    rows = covered.nonzero().squeeze(1)
    return rows, indices[rows].long()


@functools.cache
def fast_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (float32 always; bfloat16 with AVX512-BF16 or
    AMX; float16 with AVX512-FP16 or AMX). Without it, the ops compute in float32."""
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    if dtype == torch.bfloat16:
        return _amx_tiles() or bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(flags & {"avx512_fp16", "amx_fp16"})


def uncovered_rows(groups: Groups, n: int, device: torch.device) -> torch.Tensor | None:
    """The rows in no group (index -1), or None when every row has an adapter."""
    mask = torch.ones(n, dtype=torch.bool, device=device)
    for _, rows in groups:
        mask[rows] = False
    if not bool(mask.any()):
        return None
    return mask.nonzero().squeeze(1)


def _add_rows(y: torch.Tensor, rows: Rows, delta: torch.Tensor) -> None:
    if isinstance(rows, slice):
        y[rows].add_(delta)
    else:
        y.index_add_(0, rows, delta)


def _set_rows(y: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        y[rows].copy_(value)
    else:
        y.index_copy_(0, rows, value)


def shrink(
    x: torch.Tensor, lora_a: torch.Tensor, slot: int, rows: Rows, scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """(x[rows] @ A[slot].T) * scale, as `out_dtype` (vLLM's buffers are float32)."""
    a = lora_a[slot, 0] if lora_a.dim() == 4 else lora_a[slot]
    h = torch.matmul(x[rows].to(out_dtype), a.to(out_dtype).t())
    if scale != 1.0:
        h.mul_(scale)
    return h


def expand_delta(h: torch.Tensor, lora_b: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """h @ B[slot].T in the output's dtype."""
    b = lora_b[slot, 0] if lora_b.dim() == 4 else lora_b[slot]
    return torch.matmul(h.to(dtype), b.to(dtype).t())


class LinearWeights:
    """One LoRA linear layer's stacks laid out for plain GEMMs, for every slot at once.

    `a_cat[slot]` is (in, n_slices * rank): the slices' A matrices side by side, so one product shrinks all
    slices (x is shared). `b_t[i][slot]` is slice i's B transposed, (rank, out_i): a view, no copy. When
    it is small (`BLOCK_BYTES` for all slots), `b_cat[slot]` holds every slice's B on a block diagonal,
    (n_slices * rank, sum of out_i), so one product expands every slice too: for a fused qkv that is 2 calls
    instead of 4, which is what a small model's step time is made of.

    vLLM loads an adapter into a slot by copying into the stacks in place, which bumps their version
    counters; `refresh` brings the layout back in line. Given which adapter each slot holds (vLLM's
    `lora_index_to_id`, passed to the punica wrapper every step), it lays out again only the slots whose
    adapter changed, or whose first weights did (an adapter reloaded in place under the same id): with many
    adapters and many slots, one or two slots change per step, and laying out all of them each time cost a
    quarter of the engine's time (docs/benchmarks.md, "A thousand adapters"). Without ids, every slot.
    """

    __slots__ = (
        "a", "b", "versions", "a_cat", "b_t", "b_cat", "rank", "packed", "ids", "probes", "copied_b", "b_rows"
    )  # fmt: skip

    def __init__(
        self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], ids: Sequence[object] = ()
    ) -> None:
        self.a, self.b = tuple(lora_a), tuple(lora_b)
        self.versions = self._versions()
        self.rank = self.a[0].shape[-2]
        dtype = layout_dtype(self.a, self.b)
        mats = [a[:, 0] if a.dim() == 4 else a for a in self.a]  # (L, rank, in) each
        self.a_cat = torch.cat(mats, dim=1).transpose(1, 2).to(dtype).contiguous()  # (L, in, S * rank)
        self.b_t = [(b[:, 0] if b.dim() == 4 else b).transpose(1, 2) for b in self.b]  # (L, rank, out_i)
        self.copied_b = self.b_t[0].dtype != dtype  # then b_t are float32 copies, not views of the stacks
        if self.copied_b:
            self.b_t = [bt.to(dtype) for bt in self.b_t]
        self.b_cat: torch.Tensor | None = None
        if len(self.b_t) == 1:
            self.b_cat = self.b_t[0]
        else:
            slots, r = self.a_cat.shape[0], self.rank
            outs = [bt.shape[2] for bt in self.b_t]
            if slots * len(outs) * r * sum(outs) * self.b_t[0].element_size() <= BLOCK_BYTES:
                self.b_cat = self.b_t[0].new_zeros(slots, len(outs) * r, sum(outs))
                self._block(slice(None))
        self.packed = packed_weights(self.a_cat, self.b_cat)
        self.b_rows: torch.Tensor | None = None  # laid out on the first gathered product (`rows_b`)
        self.ids = tuple(ids)
        self.probes = self._probes()

    def _block(self, slot: int | slice) -> None:
        assert self.b_cat is not None
        r, col = self.rank, 0
        for i, bt in enumerate(self.b_t):
            out = bt.shape[2]
            self.b_cat[slot, i * r : (i + 1) * r, col : col + out] = bt[slot]
            col += out

    def rows_b(self) -> torch.Tensor:
        """Every slot's B for the gathered product: (L, rank, sum of out_i), the slices' B transposed side by
        side (no block diagonal: a row's copy is 1 / n_slices of one), contiguous, in the layout's dtype."""
        if self.b_rows is None:
            self.b_rows = torch.cat(self.b_t, dim=2).to(self.a_cat.dtype).contiguous()
        return self.b_rows

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.a) + tuple(t._version for t in self.b)

    def _probes(self) -> list[torch.Tensor]:
        """The first weights of every slot, per stack: (L, PROBE) each, copies."""
        n = self.a[0].shape[0]
        return [t.reshape(n, -1)[:, :PROBE].clone() for t in (*self.a, *self.b)]

    def same_tensors(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> bool:
        return (
            len(lora_a) == len(self.a)
            and all(x is y for x, y in zip(lora_a, self.a, strict=False))
            and all(x is y for x, y in zip(lora_b, self.b, strict=False))
        )

    def current(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> bool:
        return self.same_tensors(lora_a, lora_b) and self._versions() == self.versions

    def refresh(self, ids: Sequence[object]) -> None:
        """The stacks were written since the layout (same tensors, new versions): lay out again the slots
        whose adapter id or first weights changed."""
        ids = tuple(ids)
        probes = self._probes()
        changed = torch.zeros(probes[0].shape[0], dtype=torch.bool)
        for old, new in zip(self.probes, probes, strict=True):
            changed |= (old != new).any(dim=1)
        slots = {int(k) for k in changed.nonzero().flatten().tolist()}
        slots |= {k for k, (x, y) in enumerate(zip(self.ids, ids, strict=True)) if x != y}
        for k in sorted(slots):
            self.a_cat[k] = torch.cat([a[k, 0] if a.dim() == 4 else a[k] for a in self.a], dim=0).t()
            if self.copied_b:
                for bt, b in zip(self.b_t, self.b, strict=True):
                    bt[k] = (b[k, 0] if b.dim() == 4 else b[k]).t()
            if self.b_cat is not None and len(self.b_t) > 1:
                self._block(k)
            if self.packed is not None:
                self.packed[k] = _pack_slot(self.a_cat, self.b_cat, k)  # type: ignore[arg-type]
            if self.b_rows is not None:
                self.b_rows[k] = torch.cat([bt[k] for bt in self.b_t], dim=1)
        self.ids, self.probes, self.versions = ids, probes, self._versions()


#: Weights per slot and stack compared when the stacks change (catches an adapter reloaded in place).
PROBE = 16


def sgl_supported(dtype: torch.dtype) -> bool:
    """vLLM's CPU GEMM kernel for small weights (`torch.ops._C.weight_packed_linear`, which its own linear
    layers use for them) needs AMX and bf16/fp16. It computes each row the same way whatever the batch, as
    vLLM's own LoRA ops did (their gathered einsum): an answer does not change with what it is batched
    with. Elsewhere the ops fall back to `torch.mm`, whose rounding depends on the batch."""
    try:
        return (
            dtype in (torch.bfloat16, torch.float16)
            and _amx_tiles()
            and hasattr(torch.ops._C, "weight_packed_linear")
        )
    except (AttributeError, RuntimeError):
        return False


def _amx_tiles() -> bool:
    """Whether torch sees AMX tiles on this CPU."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t.contiguous()
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


Packed = tuple[torch.Tensor, int, torch.Tensor, int]  # A, its out features, B, its out features


def packed_weights(a_cat: torch.Tensor, b_cat: torch.Tensor | None) -> list[Packed] | None:
    """Per slot: A and the block-diagonal B packed for `weight_packed_linear` (out features a multiple of
    16, in features of 32; zero padding), or None where that kernel cannot run."""
    if b_cat is None or not sgl_supported(a_cat.dtype):
        return None
    width = b_cat.shape[2]
    if width % 16 or a_cat.shape[1] % 32:
        return None
    return [_pack_slot(a_cat, b_cat, slot) for slot in range(a_cat.shape[0])]


def _pack_slot(a_cat: torch.Tensor, b_cat: torch.Tensor, slot: int) -> Packed:
    width = b_cat.shape[2]
    n_a = -(-a_cat.shape[2] // 32) * 32  # S * rank, padded: it is B's in features too
    a = _pad(a_cat[slot].t(), n_a, a_cat.shape[1])  # (n_a, in)
    b = _pad(b_cat[slot].t(), width, n_a)  # (sum of out_i, n_a)
    return torch.ops._C.convert_weight_packed(a), n_a, torch.ops._C.convert_weight_packed(b), width


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty((x.shape[0], n), dtype=x.dtype)
    torch.ops._C.weight_packed_linear(out, x, weight, None, True)
    return out


WeightCache = dict[int, LinearWeights]
#: Largest block-diagonal B (all slots of one layer) worth its wasted products; larger expand per slice.
BLOCK_BYTES = 4 * 2**20
#: Where half-precision products are native but vLLM's packed kernel cannot run (AVX512-BF16 without AMX),
#: a layer whose float32 layout is at most this big (all slots) is still computed in float32: the tiny
#: model's layers, not an 8B's.
FLOAT32_LAYER_BYTES = 8 * 2**20


def layout_dtype(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a layer's products run in: the weights', except float32 where the CPU has no native
    half-precision product (`fast_half_matmul`), or where it has one but only through oneDNN (no AMX for
    `sgl_supported`) and the layer is small (`FLOAT32_LAYER_BYTES`): oneDNN's per-call set-up makes a
    one-row bfloat16 product about 3x a float32 one there (the tiny qkv: 38 vs 11 us, AVX512-BF16 EPYC),
    and a decode step is nothing but such products. One dtype for every batch size, so that a row's delta
    does not change with the size of the batch it is in."""
    half = lora_a[0].dtype
    if half == torch.float32 or not fast_half_matmul(half):
        return torch.float32
    if sgl_supported(half):
        return half
    slots, rank = lora_a[0].shape[0], lora_a[0].shape[-2]
    ins = sum(a.shape[-1] for a in lora_a)
    outs = sum(b.shape[-2] for b in lora_b)
    return torch.float32 if slots * rank * (ins + len(lora_b) * outs) * 4 <= FLOAT32_LAYER_BYTES else half


def linear_weights(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    cache: WeightCache | None,
    ids: Sequence[object] | None = None,
) -> LinearWeights:
    """The layer's `LinearWeights`, laid out again only where vLLM has written into its stacks since:
    the slots that changed when `ids` (the adapter in each slot) is given, else all of them."""
    if ids is not None and len(ids) != lora_a[0].shape[0]:
        ids = None  # not one id per slot: lay out every slot
    if cache is None:
        return LinearWeights(lora_a, lora_b)
    key = id(lora_a[0])
    w = cache.get(key)
    if w is None or not w.same_tensors(lora_a, lora_b) or (ids is None and not w.current(lora_a, lora_b)):
        w = cache[key] = LinearWeights(lora_a, lora_b, ids or ())
    elif ids is not None and (w._versions() != w.versions or tuple(ids) != w.ids):
        if len(w.ids) == len(ids):
            w.refresh(ids)
        else:  # laid out without ids before
            w = cache[key] = LinearWeights(lora_a, lora_b, ids)
    return w


def lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scale: float,
    output_slices: Sequence[int],
    groups: Groups,
    offset_start: int = 0,
    cache: WeightCache | None = None,
    ids: Sequence[object] | None = None,
    gather: Gather | None = None,
) -> None:
    """y[:, slice i] += (x @ A_i.T * scale) @ B_i.T for every row's own adapter (vLLM's `add_lora_linear`).

    Per adapter: one product shrinks every slice; one more expands them all when the layer has a
    block-diagonal B (vLLM's packed kernel in bf16/fp16 with AMX, else `torch.mm`), else one per slice. With
    `gather` (many small groups, `gather_plan`) and small enough weights: one batched product for all rows.
    """
    if not groups:
        return
    w = linear_weights(lora_a, lora_b, cache, ids)
    r = w.rank
    dtype = w.a_cat.dtype  # the layout's: the weights', or float32 where that is faster (fast_half_matmul)
    if w.packed is not None and scale == 1.0 and x.dtype == dtype == y.dtype:
        width = w.packed[0][3]
        if width == sum(output_slices):
            cols = y[:, offset_start : offset_start + width]
            for slot, rows in groups:
                a, n_a, b, n_b = w.packed[slot]
                delta = _packed_linear(_packed_linear(x[rows].contiguous(), a, n_a), b, n_b)
                _add_rows(cols, rows, delta)
            return
    if (
        gather is not None
        and [bt.shape[2] for bt in w.b_t] == list(output_slices)
        and _gather_bytes(w) <= GATHER_BYTES
    ):
        _gathered_linear(y, x, w, scale, output_slices, offset_start, gather)
        return
    bc = w.b_cat
    if bc is not None and bc.shape[2] != sum(output_slices):
        bc = None
    direct = dtype == y.dtype
    for slot, rows in groups:
        xs = x[rows]
        h = torch.mm(xs if xs.dtype == dtype else xs.to(dtype), w.a_cat[slot])
        if scale != 1.0:
            h.mul_(scale)
        if bc is not None:
            cols = y[:, offset_start : offset_start + bc.shape[2]]
            if direct and isinstance(rows, slice):
                cols[rows].addmm_(h, bc[slot])
            else:
                _add_rows(cols, rows, torch.mm(h, bc[slot]).to(y.dtype))
            continue
        offset = offset_start
        for i, size in enumerate(output_slices):
            hi = h[:, i * r : (i + 1) * r]
            bt = w.b_t[i][slot]
            if bt.shape[1] != size:
                bt = bt[:, :size]
            cols = y[:, offset : offset + size]
            if direct and isinstance(rows, slice):
                cols[rows].addmm_(hi, bt)
            else:
                _add_rows(cols, rows, torch.mm(hi, bt).to(y.dtype))
            offset += size


def _gather_bytes(w: LinearWeights) -> int:
    """What one row's copy of its weights (A and every slice's B) costs the gathered product."""
    return (w.a_cat[0].numel() + w.rank * sum(bt.shape[2] for bt in w.b_t)) * w.a_cat.element_size()


def _gathered_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    w: LinearWeights,
    scale: float,
    output_slices: Sequence[int],
    offset_start: int,
    gather: Gather,
) -> None:
    """One batched product over each row's own weights, copied per row with `index_select` (a memcpy per row;
    indexing the stacks with a tensor, `a_cat[slots]`, runs torch's generic per-element gather, 10x slower
    here). Each slice's rank block is multiplied by every slice's B (`rows_b`, no block diagonal): n_slices
    times the products of the expand, which are tiny, for a third of the bytes copied; the diagonal blocks
    are the deltas."""
    rows, slots = gather
    r, n_slices = w.rank, len(output_slices)
    xs = x if rows is None else x.index_select(0, rows)
    dtype = w.a_cat.dtype
    h = torch.bmm(xs.to(dtype).unsqueeze(1), w.a_cat.index_select(0, slots))  # (n, 1, S * r)
    if scale != 1.0:
        h.mul_(scale)
    d = torch.bmm(h.view(-1, n_slices, r), w.rows_b().index_select(0, slots))  # (n, S, sum of out_i)
    if n_slices == 1:
        delta = d.squeeze(1)
    else:
        blocks, col = [], 0
        for i, size in enumerate(output_slices):
            blocks.append(d[:, i, col : col + size])
            col += size
        delta = torch.cat(blocks, dim=1)
    cols = y[:, offset_start : offset_start + delta.shape[1]]
    if rows is None:
        cols.add_(delta.to(y.dtype))
    else:
        cols.index_add_(0, rows, delta.to(y.dtype))


def lora_shrink(
    y: Sequence[torch.Tensor], x: torch.Tensor, lora_a: Sequence[torch.Tensor], scale: float, groups: Groups
) -> None:
    """y[i][rows] = x[rows] @ A_i.T * scale per adapter; rows without one get 0 (vLLM's `add_shrink`)."""
    n = x.shape[0]
    missing = uncovered_rows(groups, n, x.device)
    for out, a in zip(y, lora_a, strict=True):
        out2 = out.view(-1, out.shape[-1])
        rank = a.shape[-2]
        for slot, rows in groups:
            _set_rows(out2[:, :rank], rows, shrink(x, a, slot, rows, scale, out2.dtype))
        if missing is not None:
            out2[missing, :rank] = 0


def lora_expand(
    y: torch.Tensor,
    x: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    output_slices: Sequence[int],
    groups: Groups,
    offset_start: int = 0,
    add_inputs: bool = True,
) -> None:
    """y[:, slice i] (+)= x[i] @ B_i.T per adapter (vLLM's `add_expand`); without `add_inputs`, rows without
    an adapter get 0 in those columns."""
    y2 = y.view(-1, y.shape[-1])
    missing = None if add_inputs else uncovered_rows(groups, y2.shape[0], y2.device)
    offset = offset_start
    for h, b, size in zip(x, lora_b, output_slices, strict=True):
        cols = y2[:, offset : offset + size]
        for slot, rows in groups:
            delta = expand_delta(h[rows], b, slot, y2.dtype)[:, :size]
            (_add_rows if add_inputs else _set_rows)(cols, rows, delta)
        if missing is not None:
            cols[missing] = 0
        offset += size


#: Per stack (by id): the stack, its version, and the slots holding any nonzero weight.
NonzeroCache = dict[int, tuple[torch.Tensor, int, frozenset[int]]]


def nonzero_slots(stack: torch.Tensor, cache: NonzeroCache) -> frozenset[int]:
    """The slots of `stack` with a nonzero weight, scanned again only when vLLM has written into it (its
    version). vLLM gives every adapter a slot in the embedding and lm_head stacks whether or not the adapter
    trains those modules (most train only the projections), and zeroes it then."""
    entry = cache.get(id(stack))
    if entry is None or entry[0] is not stack or entry[1] != stack._version:
        found = stack.reshape(stack.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        entry = cache[id(stack)] = (stack, stack._version, frozenset(int(k) for k in found))
    return entry[2]


def _nonzero_groups(groups: Groups, stack: torch.Tensor, cache: NonzeroCache | None) -> Groups:
    if cache is None or not groups:
        return groups
    live = nonzero_slots(stack, cache)
    return [(slot, rows) for slot, rows in groups if slot in live]


def lora_embedding(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_b: torch.Tensor,
    groups: Groups,
    nonzero: NonzeroCache | None = None,
) -> None:
    """y[rows] += x[rows] @ B.T per adapter (vLLM's `add_lora_embedding`: x holds the lora_a embeddings).
    With `nonzero`, slots whose B is all zero (an adapter without embedding weights) are skipped."""
    for slot, rows in _nonzero_groups(groups, lora_b, nonzero):
        delta = expand_delta(x[rows], lora_b, slot, y.dtype)
        width = min(delta.shape[1], y.shape[1])
        _add_rows(y[:, :width], rows, delta[:, :width])


def lora_logits(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    groups: Groups,
    nonzero: NonzeroCache | None = None,
) -> None:
    """y[rows] += (x[rows] @ A.T * scale) @ B.T per request's adapter (vLLM's `add_lora_logits`). With
    `nonzero`, slots whose B is all zero (an adapter without lm_head weights) are skipped."""
    for slot, rows in _nonzero_groups(groups, lora_b, nonzero):
        h = shrink(x, lora_a, slot, rows, scale, torch.float32)
        delta = expand_delta(h, lora_b, slot, y.dtype)
        width = min(delta.shape[1], y.shape[1])
        _add_rows(y[:, :width], rows, delta[:, :width])
