"""Tests for kernels/: Triton and torch LoRA shrink/expand against a float64 reference.

Shapes and dtypes are drawn at random from a seed printed in the session
summary and in every assertion message; rerun a failure with
LORABUS_TEST_SEED=<seed>. Triton runs on CPU through its interpreter, so
every shape here is small. The summary also prints the largest relative
error seen per (op, dtype, backend).
"""

import os

# Triton reads this when kernels.triton_ops defines its kernels (imported
# below); setting it before any triton import is the safe rule.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys

import pytest
import torch

from lorabus import kernels
from lorabus.kernels import LoRAMapping, lora_expand, lora_shrink, make_lora_mapping, triton_ops
from seeded import SEED, ErrorTable, generator_for, ri

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("triton", "torch", "gather")
# Max |out - ref| over max |ref|. bf16 allows a full ulp (2**-7): Triton's
# interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ERRORS = ErrorTable("kernels", per_dtype=True)

# If the environment forced TRITON_INTERPRET off, only the Triton cases skip.
AVAILABLE = BACKENDS if triton_ops.INTERPRETED else ("torch", "gather")
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.skipif(b not in AVAILABLE, reason="needs TRITON_INTERPRET=1"))
                  for b in BACKENDS]


@pytest.fixture(scope="session", autouse=True)
def _error_summary(request):
    ERRORS.register(request.config)


@pytest.fixture
def gen(request):
    return generator_for(request)


# ---------------------------------------------------------------- data & reference

def make_idx(g, T, L, pattern, p_none=0.2):
    """decode: every token an independent slot (or -1); prefill: long runs of one slot; single: one slot for all."""
    if pattern == "single":
        return torch.full((T,), ri(g, 0, L - 1), dtype=torch.long)
    if pattern == "decode":
        idx = torch.randint(0, L, (T,), generator=g)
        idx[torch.rand(T, generator=g) < p_none] = -1
        return idx
    idx = torch.empty(T, dtype=torch.long)
    pos = 0
    while pos < T:
        n = min(T - pos, ri(g, 16, 90))
        idx[pos:pos + n] = ri(g, -1, L - 1)
        pos += n
    return idx


def make_ranked(g, shape_lead, R, H, ranks, dtype, rank_dim):
    """Random weights zero-padded beyond each slot's real rank (dim rank_dim of the slot matrix)."""
    w = torch.randn(*shape_lead, len(ranks), *((R, H) if rank_dim == 0 else (H, R)), generator=g)
    for slot, r in enumerate(ranks):
        if rank_dim == 0:
            w[..., slot, r:, :] = 0
        else:
            w[..., slot, :, r:] = 0
    return w.to(dtype)


def ref_shrink(x, a4, idx):
    """float64 t[s, i] = x[i] @ a[s, idx[i]].T (zero rows for idx -1)."""
    S, L, R, H = a4.shape
    t = torch.zeros(S, x.shape[0], R, dtype=torch.float64)
    for i, slot in enumerate(idx.tolist()):
        if slot >= 0:
            t[:, i] = torch.einsum("h,srh->sr", x[i].double(), a4[:, slot].double())
    return t


def ref_expand(y, t3, bs, scale2, offsets, idx):
    out = y.double().clone()
    for i, slot in enumerate(idx.tolist()):
        if slot < 0:
            continue
        for s, (b, off) in enumerate(zip(bs, offsets)):
            out[i, off:off + b.shape[1]] += scale2[s, slot].double() * (b[slot].double() @ t3[s, i].double())
    return out


def check(op, out, ref, dtype, backend, ctx):
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out.double() - ref).abs().max().item() / max(scale, 1e-30) if ref.numel() else 0.0
    ERRORS.record(op, dtype, backend, err)
    assert err <= TOL[dtype], f"{op} {backend} {dtype}: rel err {err:.3e} > {TOL[dtype]:.0e} [seed={SEED} {ctx}]"


def run_case(g, *, T, H_in, widths, R, L, dtype, backend, pattern, offsets=None, y_width=None,
             ranks=None, sliced=None, use_mapping=True, p_none=0.2):
    """Shrink then expand one random case; checks both against float64, plus the untouched regions."""
    S = len(widths)
    sliced = S > 1 if sliced is None else sliced
    ranks = ranks or [R] * L
    ctx = (f"T={T} H_in={H_in} widths={widths} R={R} L={L} pattern={pattern} offsets={offsets} "
           f"ranks={ranks} sliced={sliced}")
    idx = make_idx(g, T, L, pattern, p_none)
    mapping = make_lora_mapping(idx, L) if use_mapping else idx

    x = torch.randn(T, H_in, generator=g).to(dtype)
    a4 = (make_ranked(g, (S,), R, H_in, ranks, torch.float32, 0) / H_in ** 0.5).to(dtype)
    t = lora_shrink(x, a4 if sliced else a4[0], mapping, backend=backend)
    t3 = t if sliced else t.unsqueeze(0)
    assert t.dtype == torch.float32 and t3.shape == (S, T, R), ctx
    check("shrink", t3, ref_shrink(x, a4, idx), dtype, backend, ctx)
    assert not t3[:, idx < 0].any(), f"rows with idx -1 not zero [seed={SEED} {ctx}]"

    bs = [(make_ranked(g, (), R, h, ranks, torch.float32, 1) / R ** 0.5).to(dtype) for h in widths]
    scale2 = torch.rand(S, L, generator=g) + 0.5
    if offsets is None:
        offsets_used = [sum(widths[:i]) for i in range(S)]
        y_width = sum(widths)
    else:
        offsets_used = offsets
    y0 = torch.randn(T, y_width, generator=g).to(dtype)
    # Expand gets its own fp32 t with values in padded rank columns too, so a
    # kernel ignoring padding or mixing slices shows.
    t_in = torch.randn(S, T, R, generator=g)
    y = y0.clone()
    out = lora_expand(y, t_in if sliced else t_in[0], bs if sliced else bs[0], mapping,
                      scale2 if sliced else scale2[0], offsets=offsets, backend=backend)
    assert out is y, "lora_expand must return y (updated in place)"
    ref = ref_expand(y0, t_in, bs, scale2, offsets_used, idx)
    touched = torch.zeros(T, y_width, dtype=torch.bool)
    for off, h in zip(offsets_used, widths):
        touched[idx >= 0, off:off + h] = True
    check("expand", y[touched], ref[touched], dtype, backend, ctx)
    # Everything else keeps its exact original bits (no stray writes, even of y + 0).
    assert torch.equal(y[~touched], y0[~touched]), f"expand wrote outside its rows/columns [seed={SEED} {ctx}]"
    return idx


# ---------------------------------------------------------------- cases

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(gen, dtype, backend):
    for _ in range(2):
        run_case(gen, T=ri(gen, 1, 24), H_in=ri(gen, 17, 150), widths=[ri(gen, 17, 150)], R=ri(gen, 2, 24),
                 L=ri(gen, 2, 12), dtype=dtype, backend=backend, pattern="decode")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_batch_on_one_adapter(gen, dtype, backend):
    # The torch path's no-gather shortcut; sliced, so each slice's offset matters too.
    run_case(gen, T=ri(gen, 1, 40), H_in=ri(gen, 17, 120), widths=[ri(gen, 17, 90), ri(gen, 5, 40)], R=ri(gen, 2, 16),
             L=ri(gen, 1, 6), dtype=dtype, backend=backend, pattern="single")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill(gen, dtype, backend):
    # Runs of 16..90 tokens: several 64-row tiles per segment, the last one partial.
    run_case(gen, T=ri(gen, 100, 180), H_in=ri(gen, 65, 140), widths=[ri(gen, 65, 140)], R=ri(gen, 4, 16),
             L=ri(gen, 2, 4), dtype=dtype, backend=backend, pattern="prefill", p_none=0.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliced_unequal_widths_custom_offsets(gen, dtype, backend):
    # GQA-like q/k/v widths, placed out of order with gaps in a wider y.
    q, kv = ri(gen, 70, 130), ri(gen, 17, 40)
    widths = [q, kv, kv]
    offsets = [2 * kv + 9, 3, kv + 6]
    run_case(gen, T=ri(gen, 5, 30), H_in=ri(gen, 40, 100), widths=widths, R=ri(gen, 3, 20), L=ri(gen, 2, 5),
             dtype=dtype, backend=backend, pattern="decode", offsets=offsets, y_width=2 * kv + 9 + q + 5)
    # Default offsets: slices tile y back to back (gate/up style, equal widths).
    h = ri(gen, 30, 90)
    run_case(gen, T=ri(gen, 5, 30), H_in=ri(gen, 40, 100), widths=[h, h], R=ri(gen, 3, 20), L=ri(gen, 2, 5),
             dtype=dtype, backend=backend, pattern="prefill")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_mixed_ranks_zero_padded(gen, backend):
    L, R = 5, 16
    ranks = [1, 16, 4, 9, 13]
    for dtype in DTYPES:
        run_case(gen, T=ri(gen, 10, 40), H_in=ri(gen, 30, 90), widths=[ri(gen, 30, 90), ri(gen, 10, 40)],
                 R=R, L=L, ranks=ranks, dtype=dtype, backend=backend, pattern="decode")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("R", [1, 128])
def test_rank_extremes(gen, backend, R):
    for dtype in DTYPES:
        run_case(gen, T=ri(gen, 3, 12), H_in=ri(gen, 20, 72), widths=[ri(gen, 20, 72)], R=R, L=3,
                 dtype=dtype, backend=backend, pattern="decode")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_hidden_not_multiple_of_block(gen, backend):
    # 64-wide K/N blocks: 129 = 2 blocks + 1, 67 = 1 block + 3; one token -> split-K shrink.
    for T in (1, 33):
        run_case(gen, T=T, H_in=129, widths=[67], R=8, L=3, dtype=torch.float16, backend=backend,
                 pattern="decode")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("sliced", [False, True])
def test_empty_batch(backend, sliced):
    S, L, R = (2 if sliced else 1), 3, 8
    x = torch.randn(0, 32)
    a = torch.randn(S, L, R, 32)
    t = lora_shrink(x, a if sliced else a[0], torch.empty(0, dtype=torch.long), backend=backend)
    assert t.shape == ((S, 0, R) if sliced else (0, R))
    y = torch.randn(0, 40 * S)
    bs = [torch.randn(L, 40, R) for _ in range(S)]
    out = lora_expand(y, t, bs if sliced else bs[0], make_lora_mapping(torch.empty(0, dtype=torch.int32), L),
                      torch.ones(S, L) if sliced else torch.ones(L), backend=backend)
    assert out is y and y.shape == (0, 40 * S)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_all_minus_one_skips_work(monkeypatch, backend):
    from lorabus.kernels import ops, torch_ops, triton_ops

    def boom(*args, **kwargs):
        raise AssertionError("kernel launched for a batch without adapters")

    for mod, names in ((triton_ops, ("shrink", "expand")),
                       (torch_ops, ("shrink_segmented", "expand_segmented", "shrink_gather", "expand_gather"))):
        for name in names:
            monkeypatch.setattr(mod, name, boom)
    assert ops.torch_ops is torch_ops
    T, L, R = 9, 4, 8
    m = make_lora_mapping(torch.full((T,), -1), L)
    assert not m.has_lora and m.num_tiles == 0
    t = lora_shrink(torch.randn(T, 30), torch.randn(L, R, 30), m, backend=backend)
    assert torch.equal(t, torch.zeros(T, R))
    y = torch.randn(T, 20)
    y0 = y.clone()
    lora_expand(y, torch.randn(T, R), torch.randn(L, 20, R), m, torch.ones(L), backend=backend)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_noncontiguous_inputs(gen, backend):
    T, H, R, L, S = 13, 50, 8, 3, 2
    dtype = torch.float16
    idx = make_idx(gen, T, L, "decode")
    m = make_lora_mapping(idx, L)
    x = torch.randn(H + 7, T, generator=gen).to(dtype).t()[:, 3:3 + H]      # column-major slice
    a = torch.randn(L, S, R, H * 2, generator=gen).to(dtype).transpose(0, 1)[..., ::2]  # strided stack
    assert not x.is_contiguous() and not a.is_contiguous()
    t = lora_shrink(x, a, m, backend=backend)
    check("shrink", t, ref_shrink(x, a, idx), dtype, backend, "noncontiguous")

    big = torch.randn(T, 200, generator=gen).to(dtype)
    big0 = big.clone()
    y = big[:, 10:150]                                                      # a view: updated in place
    y0 = y.clone()
    widths = [60, 40]
    bs = [torch.randn(L, R, w + 5, generator=gen).to(dtype).transpose(1, 2)[:, :w] for w in widths]
    t_in = torch.randn(T, S, R, generator=gen).transpose(0, 1)
    scale = torch.rand(S, L, generator=gen) + 0.5
    lora_expand(y, t_in, bs, m, scale, offsets=[70, 5], backend=backend)
    ref = ref_expand(y0, t_in, bs, scale, [70, 5], idx)
    check("expand", y, ref, dtype, backend, "noncontiguous")
    # Only y[:, 5:45] and y[:, 70:130] (active rows) may change inside big.
    keep = torch.ones(T, 200, dtype=torch.bool)
    keep[idx >= 0, 15:55] = False
    keep[idx >= 0, 80:140] = False
    assert torch.equal(big[keep], big0[keep]), f"stray writes [seed={SEED}]"


def test_end_to_end_matches_dense_lora(gen):
    """shrink -> expand with one shared mapping equals y + scale * x A^T B^T in float64."""
    T, H_in, H_out, R, L = 40, 96, 80, 12, 4
    idx = make_idx(gen, T, L, "prefill")
    m = make_lora_mapping(idx, L)
    x = torch.randn(T, H_in, generator=gen).half()
    a = (torch.randn(L, R, H_in, generator=gen) / H_in ** 0.5).half()
    b = (torch.randn(L, H_out, R, generator=gen) / R ** 0.5).half()
    scale = torch.rand(L, generator=gen) + 0.5
    y0 = torch.randn(T, H_out, generator=gen).half()
    ref = y0.double().clone()
    for i, s in enumerate(idx.tolist()):
        if s >= 0:
            ref[i] += scale[s].double() * (b[s].double() @ (a[s].double() @ x[i].double()))
    for backend in AVAILABLE:
        y = y0.clone()
        lora_expand(y, lora_shrink(x, a, m, backend=backend), b, m, scale, backend=backend)
        check("e2e", y, ref, torch.float16, backend, f"idx={idx.tolist()}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("pattern", ["decode", "prefill"])
def test_nan_in_one_slot_stays_in_its_rows(gen, backend, pattern):
    """A slot whose A, B and scale are NaN changes only its own tokens' rows: padded segments (the torch
    path's single bmm), masked tile rows and split-K partial sums never carry it into another token."""
    T, H_in, widths, R, L = (24, 48, [40, 24], 8, 4) if pattern == "decode" else (150, 72, [40, 24], 8, 3)
    idx = make_idx(gen, T, L, pattern, p_none=0.2)
    if not (idx >= 0).any():  # a draw where no token has an adapter: give the first run one
        idx[: max(1, T // 8)] = 0
    bad = int(idx[idx >= 0][0])
    m = make_lora_mapping(idx, L)
    x = torch.randn(T, H_in, generator=gen)
    a = torch.randn(len(widths), L, R, H_in, generator=gen) / H_in ** 0.5
    bs = [torch.randn(L, h, R, generator=gen) / R ** 0.5 for h in widths]
    scale = torch.rand(len(widths), L, generator=gen) + 0.5
    y0 = torch.randn(T, sum(widths), generator=gen)
    clean = lora_expand(y0.clone(), lora_shrink(x, a, m, backend=backend), bs, m, scale, backend=backend)
    a[:, bad] = torch.nan
    for b in bs:
        b[bad] = torch.nan
    scale[:, bad] = torch.nan
    y = lora_expand(y0.clone(), lora_shrink(x, a, m, backend=backend), bs, m, scale, backend=backend)
    others = idx != bad
    assert torch.isnan(y[~others]).all(), "the poisoned slot's own rows should be NaN (else the test shows nothing)"
    assert torch.equal(y[others], clean[others]), f"NaN reached another slot's rows [seed={SEED} idx={idx.tolist()}]"


def test_property_random_shapes(gen):
    """Many small random cases: every backend must agree with float64."""
    for case in range(40):
        dtype = DTYPES[ri(gen, 0, 2)]
        S = ri(gen, 1, 3)
        pattern = ("decode", "prefill")[ri(gen, 0, 1)]
        T = ri(gen, 0, 24) if pattern == "decode" else ri(gen, 16, 120)
        L = ri(gen, 1, 6)
        R = ri(gen, 1, 64)
        ranks = [ri(gen, 1, R) for _ in range(L)]
        widths = [ri(gen, 1, 160) for _ in range(S)]
        backend = AVAILABLE[case % len(AVAILABLE)]
        run_case(gen, T=T, H_in=ri(gen, 1, 160), widths=widths, R=R, L=L, ranks=ranks, dtype=dtype,
                 backend=backend, pattern=pattern, sliced=S > 1 or ri(gen, 0, 1) == 1,
                 use_mapping=ri(gen, 0, 3) > 0, p_none=(0.0, 0.3, 1.0)[ri(gen, 0, 2)])


# ---------------------------------------------------------------- mapping & API errors

def test_mapping_groups_tokens_once():
    idx = torch.tensor([2, -1, 0, 2, 2, 0, -1])
    m = make_lora_mapping(idx, 4)
    assert isinstance(m, LoRAMapping)
    assert m.sorted_tokens.tolist() == [2, 5, 0, 3, 4]
    assert m.active_slots == (0, 2) and m.seg_starts == (0, 2) and m.seg_lens == (2, 3)
    assert m.max_seg_len == 3 and m.block_m == 16 and m.num_tiles == 2 and m.has_lora
    assert m.tiles.tolist() == [[0, 2], [2, 3], [0, 2]]
    long = make_lora_mapping(torch.tensor([1] * 150 + [0] * 10), 2)
    assert long.block_m == 64
    assert long.tiles.tolist() == [[0, 10, 74, 138], [10, 64, 64, 22], [0, 1, 1, 1]]


@pytest.mark.parametrize("bad", [[3], [-2], [0, 5]])
def test_mapping_rejects_bad_ids(bad):
    with pytest.raises(ValueError):
        make_lora_mapping(torch.tensor(bad), 3)


def test_argument_errors():
    L, R = 3, 4
    x, a = torch.randn(5, 8), torch.randn(L, R, 8)
    idx = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="backend"):
        lora_shrink(x, a, idx, backend="cuda")
    with pytest.raises(ValueError, match="share"):
        lora_shrink(x.half(), a, idx)
    with pytest.raises(ValueError, match="tokens"):
        lora_shrink(x, a, make_lora_mapping(torch.zeros(4, dtype=torch.long), L))
    with pytest.raises(ValueError, match="slot"):
        lora_shrink(x, a[:1], make_lora_mapping(torch.full((5,), 2), L))
    y, t = torch.randn(5, 12), torch.randn(2, 5, R)
    bs = [torch.randn(L, 6, R), torch.randn(L, 6, R)]
    with pytest.raises(ValueError, match="overlap"):
        lora_expand(y, t, bs, idx, torch.ones(2, L), offsets=[0, 5])
    with pytest.raises(ValueError, match="offsets"):
        lora_expand(torch.randn(5, 13), t, bs, idx, torch.ones(2, L))
    with pytest.raises(ValueError, match="scale"):
        lora_expand(y, t, bs, idx, torch.ones(L))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch\n"
            "from lorabus import kernels\n"
            "try:\n"
            "    kernels.lora_shrink(torch.randn(2, 8), torch.randn(1, 4, 8), torch.zeros(2, dtype=torch.long),"
            " backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_auto_backend_choice():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "triton"


# ---------------------------------------------------------------- the adapter pool's slot-major layout

POOL_PATTERNS = ("decode", "prefill", "single", "span", "sparse", "none", "mixed")


def _pool_idx(g, T, L, pattern):
    if pattern == "span":  # distinct adjacent slots, one token each: the weights are a view of the pool
        return torch.randperm(L, generator=g)[:T] if T <= L else torch.randint(0, L, (T,), generator=g)
    if pattern == "sparse":  # two far-apart slots: batched through one index_select of the active slots
        return torch.tensor([0, L - 1] * (T // 2) + [L - 1] * (T % 2))
    if pattern == "none":
        return torch.full((T,), -1, dtype=torch.long)
    if pattern == "mixed":  # one long run beside single decode tokens: the short segments batched, the run alone
        run = torch.full((ri(g, 8, 30),), ri(g, 0, L - 1), dtype=torch.long)
        idx = torch.cat([torch.randperm(L, generator=g)[:ri(g, 3, L)], run])
        return idx[torch.randperm(idx.shape[0], generator=g)]
    return make_idx(g, T, L, pattern)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", POOL_PATTERNS)
def test_adapter_pool_apply_matches_reference(gen, dtype, backend, pattern):
    """AdapterPool.apply (slot-major storage; the torch path reads it as views, Triton by strides) equals
    y + scale * B(A x) per token in float64, with mixed true ranks, an untargeted slice, a cleared slot,
    and rows without an adapter left bit-for-bit."""
    from types import SimpleNamespace

    from lorabus.scheduler.lora import AdapterPool

    L, R, H_in = 10, 16, ri(gen, 20, 70)
    outs = {"p_q": H_in, "p_k": ri(gen, 8, 40), "p_v": ri(gen, 8, 40), "p_o": ri(gen, 8, 40)}
    projections = {p: (H_in, o) for p, o in outs.items()}
    groups = {"qkv": ("p_q", "p_k", "p_v"), "o": ("p_o",)}
    pool = AdapterPool(projections, 2, L, R, dtype, torch.device("cpu"), backend=backend, groups=groups)
    ranks = [ri(gen, 1, R) for _ in range(L)]
    weights = {}
    for slot in range(L):
        mods = {}
        for layer in range(2):
            for p, (d_in, d_out) in projections.items():
                if p == "p_k" and slot % 3 == 1:
                    continue  # this adapter does not target k
                a = (torch.randn(ranks[slot], d_in, generator=gen) / d_in ** 0.5).to(dtype)
                b = (torch.randn(d_out, ranks[slot], generator=gen) / ranks[slot] ** 0.5).to(dtype)
                mods[(layer, p)] = (a, b, float(torch.rand(1, generator=gen)) + 0.5)
        pool.write(slot, SimpleNamespace(modules=mods))
        weights[slot] = mods
    pool.clear(4)
    weights[4] = {}
    T = ri(gen, 1, 40) if pattern != "span" else ri(gen, 2, L)
    idx = _pool_idx(gen, T, L, pattern)
    T = idx.shape[0]
    m = make_lora_mapping(idx, L)
    ctx = f"pattern={pattern} idx={idx.tolist()} ranks={ranks} H_in={H_in} outs={outs}"
    for layer in range(2):
        for group, projs in groups.items():
            x = torch.randn(T, H_in, generator=gen).to(dtype)
            y0 = torch.randn(T, sum(outs[p] for p in projs), generator=gen).to(dtype)
            y = y0.clone()
            pool.apply(layer, group, x, y, m)
            ref = y0.double().clone()
            for i, slot in enumerate(idx.tolist()):
                off = 0
                for p in projs:
                    if slot >= 0 and (layer, p) in weights[slot]:
                        a, b, sc = weights[slot][(layer, p)]
                        ref[i, off:off + outs[p]] += sc * (b.double() @ (a.double() @ x[i].double()))
                    off += outs[p]
            rows = idx >= 0
            check("pool", y[rows], ref[rows], dtype, backend, ctx)
            assert torch.equal(y[~rows], y0[~rows]), f"pool wrote rows without an adapter [seed={SEED} {ctx}]"


def test_adapter_pool_slot_major_views_share_storage():
    """The kernels' [S, L, R, H] view and the torch path's [L, R, S, H] storage are one tensor (no copy),
    and a slot's first r ranks are one contiguous [r*S, H] matrix."""
    from types import SimpleNamespace

    from lorabus.scheduler.lora import AdapterPool

    projections = {"p_q": (8, 8), "p_k": (8, 4)}
    pool = AdapterPool(projections, 1, 3, 4, torch.float32, torch.device("cpu"), backend="torch",
                       groups={"qk": ("p_q", "p_k")})
    a = torch.arange(2 * 8, dtype=torch.float32).view(2, 8)
    pool.write(1, SimpleNamespace(modules={(0, "p_q"): (a, torch.ones(8, 2), 1.0),
                                           (0, "p_k"): (-a, torch.ones(4, 2), 2.0)}))
    view, storage = pool.a[0]["qk"], pool._a_slot_major[0]["qk"]
    assert view.shape == (2, 3, 4, 8) and view.data_ptr() == storage.data_ptr()
    assert torch.equal(view[0, 1, :2], a) and torch.equal(view[1, 1, :2], -a)
    assert storage[1, :2].is_contiguous() and torch.equal(storage[1, :2].reshape(4, 8)[::2], a)
    assert pool._rank["qk"] == [0, 2, 0]
    pool.clear(1)
    assert pool._rank["qk"] == [0, 0, 0] and not storage.any()


def _check_slot_major(gen, idx, L, R, S, H, mapping=None, plan=None):
    """apply_slot_major on random slot-major weights (L slots, rank R, S slices of width H) equals
    y + scale * B(A x) per token in float64; rows without an adapter keep their bits."""
    from lorabus.kernels import torch_ops

    a = torch.randn(L, R, S, H, generator=gen) / H ** 0.5
    bs = [torch.randn(L, H, R, generator=gen) / R ** 0.5 for _ in range(S)]
    scale = torch.rand(L, S, generator=gen) + 0.5
    x = torch.randn(len(idx), H, generator=gen)
    y0 = torch.randn(len(idx), S * H, generator=gen)
    y = y0.clone()
    torch_ops.apply_slot_major(x, y, a, bs, scale, [s * H for s in range(S)], mapping or make_lora_mapping(idx, L), R,
                               plan=plan)
    ref = y0.double().clone()
    for i, slot in enumerate(idx.tolist()):
        for s in range(S):
            if slot >= 0:
                delta = bs[s][slot].double() @ (a[slot, :, s].double() @ x[i].double())
                ref[i, s * H:(s + 1) * H] += scale[slot, s].double() * delta
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))
    assert torch.equal(y[idx < 0], y0[idx < 0])


def test_slot_major_batches_short_segments_beside_a_long_one(gen):
    """A prefill run beside single decode tokens has no padded grid as a whole; apply_slot_major's split plans
    batch the short segments in one grid and run the long one alone, with the float64 result."""
    from lorabus.kernels import torch_ops

    idx = torch.tensor([3, 7, 7, 1, 9] + [5] * 20 + [10, -1, 2])
    m = make_lora_mapping(idx, 12)
    plans = torch_ops.candidate_plans(m)
    assert plans[0].startswith("split+") and "segment" in plans  # no grid within 2 cells per token: split first
    short, long = torch_ops.length_split(m)
    assert (short.active_slots, long.active_slots) == ((1, 2, 3, 7, 9, 10), (5,))
    for plan in plans:
        _check_slot_major(gen, idx, L=12, R=8, S=2, H=20, mapping=m, plan=plan)
    # Segments of one length throughout have a grid already and nothing to split.
    assert torch_ops.length_split(make_lora_mapping(torch.tensor([0, 0, 1, 1, 2, 2]), 12)) is None


def test_slot_major_decode_step_with_a_hot_adapter(gen):
    """A decode step where a hot adapter holds several tokens has no grid: every token gathering its own weights
    ("token") and one GEMM per segment on views ("segment") are its candidates, and both give the float64
    result at small and large adapter rows."""
    from lorabus.kernels import torch_ops

    idx = torch.tensor([6, 2, 6, 9, 6, 0, 6, 4, 6, 11, 6, 2])  # a hot slot (6 tokens) beside singles
    m = make_lora_mapping(idx, 12)
    assert {"token", "segment"} <= set(torch_ops.candidate_plans(m))
    for plan in ("token", "segment"):
        _check_slot_major(gen, idx, L=12, R=8, S=2, H=16, mapping=m, plan=plan)
        _check_slot_major(gen, idx, L=12, R=16, S=2, H=2048, mapping=m, plan=plan)


def test_adapter_pool_groups_slots_by_rank_bucket(gen, monkeypatch):
    """With a pool of max rank 32, a step mixing ranks 4, 8, 16 and 32 runs the CPU path in one call at rank
    32 or once per rank bucket at that bucket's rank (4 and 8 share the bucket of 8), whichever the pool's
    tuner measured faster; a slot not targeting the group costs nothing; the result is still
    y + scale * B(A x) per token."""
    from types import SimpleNamespace

    from lorabus.kernels import torch_ops
    from lorabus.kernels.plan_tuner import PlanTuner
    from lorabus.scheduler.lora import AdapterPool, rank_bucket

    assert [rank_bucket(r) for r in (1, 4, 8, 9, 16, 17, 32)] == [8, 8, 8, 16, 16, 32, 32]
    H = 24
    pool = AdapterPool({"p": (H, H), "u": (H, H)}, 1, 6, 32, torch.float32, torch.device("cpu"), backend="torch",
                       groups={"g": ("p",), "other": ("u",)})
    pool.tuner = PlanTuner("first-use")
    ranks = {0: 4, 1: 16, 2: 8, 3: 32, 4: 16}
    weights = {}
    for slot, r in ranks.items():
        a, b = torch.randn(r, H, generator=gen), torch.randn(H, r, generator=gen)
        weights[slot] = (a, b, 0.5 + slot)
        pool.write(slot, SimpleNamespace(modules={(0, "p"): weights[slot]}))
    pool.write(5, SimpleNamespace(modules={(0, "u"): (torch.randn(2, H), torch.randn(H, 2), 1.0)}))  # not on "p"
    x = torch.randn(13, H, generator=gen)
    y0 = torch.randn(13, H, generator=gen)
    expected = {"by-rank": [(8, (0, 2)), (16, (1, 4)), (32, (3,))], "one-call": [(32, (0, 1, 2, 3, 4, 5))]}
    for idx in (torch.tensor([0, 2, 0, 2, -1, 1, 4, 0, 2, 3, 5, 0, 2]), torch.tensor([4, 2, 1, 0, 3])):
        pool.apply(0, "g", x[:len(idx)], y0[:len(idx)].clone(), make_lora_mapping(idx, 6))  # measures the plans
        mapping = make_lora_mapping(idx, 6)
        calls = []
        original = torch_ops.apply_slot_major
        monkeypatch.setattr(torch_ops, "apply_slot_major",
                            lambda *args: calls.append((args[7], args[6].active_slots)) or original(*args))
        y = y0[:len(idx)].clone()
        pool.apply(0, "g", x[:len(idx)], y, mapping)
        monkeypatch.undo()
        [chosen] = [row["plan"] for row in pool.plans() if row["shape"].startswith(torch_ops.shape_class(mapping))
                    and ".ranks" in row["shape"]]
        present = set(mapping.active_slots)
        assert sorted(calls) == [(r, tuple(s for s in slots if s in present)) for r, slots in expected[chosen]]
        _check_pool_rows(y, y0[:len(idx)], x[:len(idx)], idx, weights)


def _check_pool_rows(y, y0, x, idx, weights):
    ref = y0.double().clone()
    for i, slot in enumerate(idx.tolist()):
        if slot in weights:
            a, b, sc = weights[slot]
            ref[i] += sc * (b.double() @ (a.double() @ x[i].double()))
    # fp32 sums of ~32 products of unnormalised randn: rounding scales with the largest value (~100s).
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))
