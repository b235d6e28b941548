"""Tests for kernels/paged_attention: Triton and torch paged attention against a float64 reference.

Every case is drawn at random (GQA ratio 1/3/4, head dim 64/128, block size
16/32, ragged contexts including 1 and non-multiples of the block size,
cache blocks in random order, padded block tables, fp32/fp16/bf16) from a
seed printed in the session summary and in every assertion message; rerun
a failure with LORABUS_TEST_SEED=<seed>. The reference is float64 math on
each sequence's dense K/V, built before they are scattered into the cache,
so it shares nothing with the code under test. Cache blocks no sequence
owns are filled with NaN: a kernel that reads padding or another block
fails loudly. Triton runs on CPU through its interpreter: shapes are small.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest
import torch

from lorabus.kernels.paged_attention import (paged_attention_decode, paged_attention_decode_ref,
                                             paged_attention_prefill, paged_attention_prefill_ref)
from lorabus.kernels import paged_attention_triton
from seeded import SEED, ErrorTable, generator_for, ri

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Max |out - ref| over max |V| of the case (the output is a convex combination of V rows).
# fp16/bf16: probabilities are rounded to the dtype before the P.V product, and the output is rounded.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ERRORS = ErrorTable("paged attention")
BACKENDS = ("triton", "torch")
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.skipif(
    b == "triton" and not paged_attention_triton.INTERPRETED, reason="needs TRITON_INTERPRET=1")) for b in BACKENDS]


@pytest.fixture(scope="session", autouse=True)
def _error_summary(request):
    ERRORS.register(request.config)


@pytest.fixture
def gen(request):
    return generator_for(request)


def pick(g, seq):
    return seq[ri(g, 0, len(seq) - 1)]


# ---------------------------------------------------------------- data & reference

class Case:
    """Random sequences scattered into a paged cache laid out like scheduler/kv_cache.py."""

    def __init__(self, g, dtype, *, B=None, G=None, D=None, bs=None, ctxs=None, q_lens=None, Hkv=None,
                 layers=2, spare_blocks=3):
        self.dtype = dtype
        self.B = B or ri(g, 1, 4)
        self.G = G or pick(g, (1, 3, 4))
        self.Hkv = Hkv or ri(g, 1, 2)
        self.D = D or pick(g, (64, 128))
        self.bs = bs or pick(g, (16, 32))
        if ctxs is None:
            # Ragged: always one context of 1 and one non-multiple of the block size.
            ctxs = [1, self.bs + ri(g, 1, self.bs - 1)] + [ri(g, 1, 3 * self.bs) for _ in range(self.B)]
            ctxs = [ctxs[i] for i in torch.randperm(len(ctxs), generator=g)[: self.B].tolist()]
        self.ctxs = ctxs
        self.B = len(ctxs)
        self.q_lens = q_lens or [1] * self.B
        self.Hq = self.G * self.Hkv
        self.scale = self.D ** -0.5
        need = [-(-c // self.bs) for c in ctxs]
        max_blocks = max(need) + ri(g, 0, 2)  # padded tables, sometimes wider than any sequence needs
        self.num_blocks = sum(need) + spare_blocks
        self.null_slot = self.num_blocks * self.bs
        shape = (layers, self.null_slot + 1, self.Hkv, self.D)
        # Blocks no sequence owns (and the tails of partial blocks) are NaN; the null row is zero.
        self.k_all = torch.full(shape, float("nan"), dtype=dtype)
        self.v_all = torch.full(shape, float("nan"), dtype=dtype)
        self.k_all[:, self.null_slot] = 0
        self.v_all[:, self.null_slot] = 0
        self.layer = ri(g, 0, layers - 1)
        perm = torch.randperm(self.num_blocks, generator=g)
        # Pad with the block id whose first row is the null slot (what the engine's padding reads).
        self.block_tables = torch.full((self.B, max_blocks), self.num_blocks, dtype=torch.int32)
        # Per-sequence K/V in a V scale that varies per case; q sometimes sharp (peaked softmax).
        vmag = pick(g, (0.5, 1.0, 4.0))
        qmag = pick(g, (0.5, 1.0, 3.0))
        self.k, self.v, used = [], [], 0
        for b, ctx in enumerate(ctxs):
            ids = perm[used: used + need[b]]
            used += need[b]
            self.block_tables[b, : need[b]] = ids.int()
            k = torch.randn(ctx, self.Hkv, self.D, generator=g).to(dtype)
            v = (vmag * torch.randn(ctx, self.Hkv, self.D, generator=g)).to(dtype)
            slots = (ids[:, None] * self.bs + torch.arange(self.bs)).flatten()[:ctx]
            self.k_all[self.layer, slots] = k
            self.v_all[self.layer, slots] = v
            self.k.append(k)
            self.v.append(v)
        self.cu = torch.tensor([0] + torch.tensor(self.q_lens).cumsum(0).tolist(), dtype=torch.int32)
        self.q = (qmag * torch.randn(int(self.cu[-1]), self.Hq, self.D, generator=g)).to(dtype)
        self.context_lens = torch.tensor(ctxs, dtype=torch.int32)
        self.vmax = max([v.abs().max().item() for v in self.v if v.numel()] + [1e-30])

    @property
    def k_cache(self):
        return self.k_all[self.layer]

    @property
    def v_cache(self):
        return self.v_all[self.layer]

    def reference(self) -> torch.Tensor:
        """float64: query i of chunk b at position ctx - q_len + i attends to positions <= its own."""
        out = torch.zeros(self.q.shape, dtype=torch.float64)
        for b, (ctx, n) in enumerate(zip(self.ctxs, self.q_lens)):
            s = int(self.cu[b])
            if ctx == 0 or n == 0:
                continue
            q = self.q[s: s + n].double()                                    # [n, Hq, D]
            k = self.k[b].double().repeat_interleave(self.G, dim=1)           # [ctx, Hq, D]
            v = self.v[b].double().repeat_interleave(self.G, dim=1)
            scores = torch.einsum("nhd,chd->hnc", q, k) * self.scale
            pos = torch.arange(ctx - n, ctx)[:, None]
            scores = scores.masked_fill(torch.arange(ctx)[None, :] > pos, float("-inf"))
            out[s: s + n] = torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)
        return out

    def describe(self) -> str:
        return (f"B={self.B} G={self.G} Hkv={self.Hkv} D={self.D} bs={self.bs} ctxs={self.ctxs} "
                f"q_lens={self.q_lens} {self.dtype}")


def check(op, out, case: Case, backend):
    assert out.dtype == case.dtype and out.shape == case.q.shape
    ref = case.reference()
    assert torch.isfinite(out).all(), f"{op} {backend}: non-finite output (read padding?) [seed={SEED} {case.describe()}]"
    err = ((out.double() - ref).abs().max() / case.vmax).item() if out.numel() else 0.0
    ERRORS.record(op, case.dtype, backend, err)
    tol = TOL[case.dtype]
    assert err <= tol, f"{op} {backend}: rel err {err:.3e} > {tol:.0e} [seed={SEED} {case.describe()}]"


def decode(case: Case, backend, **kw):
    return paged_attention_decode(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                  case.scale, block_size=case.bs, backend=backend, **kw)


def prefill(case: Case, backend, **kw):
    return paged_attention_prefill(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                   case.cu, case.scale, block_size=case.bs, backend=backend, **kw)


# ---------------------------------------------------------------- decode

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_random(gen, dtype, backend):
    for _ in range(3):
        case = Case(gen, dtype)
        check("decode", decode(case, backend), case, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("G", (1, 3, 4))
@pytest.mark.parametrize("D", (64, 128))
def test_decode_each_gqa_ratio_and_head_dim(gen, G, D, backend):
    dtype = pick(gen, DTYPES)
    case = Case(gen, dtype, G=G, D=D)
    check("decode", decode(case, backend), case, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("bs", (16, 32))
def test_decode_contexts_across_many_blocks(gen, bs, backend):
    """Contexts spanning several tiles (online-softmax rescaling) next to a context of 1."""
    case = Case(gen, torch.float16, bs=bs, ctxs=[1, 5 * bs + ri(gen, 1, bs - 1), 2 * bs, ri(gen, 2, bs - 1)])
    check("decode", decode(case, backend), case, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_decode_4d_cache_and_out_and_strided_q(gen, backend):
    """[num_blocks, bs, Hkv, D] cache views, a preallocated out, q as a column slice of a fused qkv tensor."""
    case = Case(gen, torch.float32, B=ri(gen, 2, 4))
    nb = case.num_blocks
    k4 = case.k_cache[: nb * case.bs].view(nb, case.bs, case.Hkv, case.D)
    v4 = case.v_cache[: nb * case.bs].view(nb, case.bs, case.Hkv, case.D)
    fused = torch.randn(case.B, case.Hq + 2 * case.Hkv, case.D)
    fused[:, : case.Hq] = case.q
    q = fused[:, : case.Hq]
    assert not q.is_contiguous()
    out = torch.full_like(case.q, float("nan"))
    got = paged_attention_decode(q, k4, v4, case.block_tables, case.context_lens, case.scale, out, backend=backend)
    assert got is out
    check("decode", out, case, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_decode_zero_context_gives_zeros(gen, backend):
    case = Case(gen, torch.float32, ctxs=[0, 7, 0])
    out = decode(case, backend)
    assert not out[0].any() and not out[2].any()
    check("decode", out, case, backend)


def test_ref_wrapper_matches_torch_backend(gen):
    case = Case(gen, torch.float32)
    a = paged_attention_decode_ref(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                   case.scale, block_size=case.bs)
    check("decode", a, case, "torch")


def test_decode_empty_batch():
    k = torch.zeros(33, 2, 64)
    q = torch.zeros(0, 4, 64)
    bt = torch.zeros(0, 2, dtype=torch.int32)
    ctx = torch.zeros(0, dtype=torch.int32)
    for backend in ("torch",) + (("triton",) if paged_attention_triton.INTERPRETED else ()):
        assert paged_attention_decode(q, k, k, bt, ctx, 0.125, block_size=16, backend=backend).shape == (0, 4, 64)


# ---------------------------------------------------------------- prefill over cached prefixes

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_random(gen, dtype, backend):
    """Chunks of 1..20 tokens after cached prefixes of 0..2 blocks (+ ragged), many sequences in one call."""
    B = ri(gen, 1, 3)
    bs = pick(gen, (16, 32))
    q_lens = [ri(gen, 1, 20) for _ in range(B)]
    prefix = [pick(gen, (0, ri(gen, 1, bs - 1), bs, ri(gen, bs + 1, 2 * bs))) for _ in range(B)]
    case = Case(gen, dtype, bs=bs, ctxs=[p + n for p, n in zip(prefix, q_lens)], q_lens=q_lens)
    check("prefill", prefill(case, backend), case, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_prefill_with_decode_rows_and_empty_chunk(gen, backend):
    """A mixed batch: a decode row (q_len 1), an empty chunk, a fresh prompt (no prefix)."""
    case = Case(gen, torch.float16, ctxs=[ri(gen, 2, 40), ri(gen, 1, 30), 17], q_lens=[1, 0, 17])
    check("prefill", prefill(case, backend, max_q_len=17), case, backend)


def test_prefill_ref_wrapper(gen):
    case = Case(gen, torch.float32, ctxs=[9, 30], q_lens=[3, 30])
    out = paged_attention_prefill_ref(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                      case.cu, case.scale, block_size=case.bs)
    check("prefill", out, case, "torch")


# ---------------------------------------------------------------- arguments

def test_argument_errors():
    k = torch.zeros(33, 2, 64)
    q = torch.zeros(2, 4, 64)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    ctx = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size"):
        paged_attention_decode(q, k, k, bt, ctx, 0.1)
    with pytest.raises(ValueError, match="heads"):
        paged_attention_decode(torch.zeros(2, 3, 64), k, k, bt, ctx, 0.1, block_size=16)
    with pytest.raises(ValueError, match="dtypes"):
        paged_attention_decode(q.half(), k, k, bt, ctx, 0.1, block_size=16)
    with pytest.raises(ValueError, match="context_lens"):
        paged_attention_decode(q, k, k, bt, ctx[:1], 0.1, block_size=16)
    with pytest.raises(ValueError, match="backend"):
        paged_attention_decode(q, k, k, bt, ctx, 0.1, block_size=16, backend="cuda")
    with pytest.raises(ValueError, match="out"):
        paged_attention_decode(q, k, k, bt, ctx, 0.1, torch.zeros(2, 4, 32), block_size=16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_attention_prefill(q, k, k, bt, ctx, torch.tensor([0, 2], dtype=torch.int32), 0.1, block_size=16)


def test_importing_kernels_does_not_import_triton():
    import subprocess
    import sys
    code = "import sys, lorabus.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_reads_the_engines_paged_kv_cache_in_place(gen, backend):
    """scheduler.kv_cache.PagedKVCache as the engine fills it: position p of a sequence at flat row
    block[p // bs] * bs + p % bs, tables padded with the null block."""
    from lorabus.scheduler.kv_cache import BlockAllocator, PagedKVCache
    bs, Hkv, G, D = 16, 2, 3, 64
    kv = PagedKVCache(2, 12, bs, Hkv, D, torch.float16, torch.device("cpu"))
    alloc = BlockAllocator(12, bs)
    alloc.allocate(ri(gen, 1, 20))  # someone else's blocks first: tables do not start at block 0
    ctxs = [1, ri(gen, 17, 31), ri(gen, 33, 60)]
    blocks = [alloc.allocate(c) for c in ctxs]
    tables = torch.full((3, max(map(len, blocks)) + 1), kv.null_block, dtype=torch.int32)
    case = Case(gen, torch.float16, G=G, Hkv=Hkv, D=D, bs=bs, ctxs=ctxs)  # the dense data and reference
    for b, (blk, ctx) in enumerate(zip(blocks, ctxs)):
        tables[b, : len(blk)] = torch.tensor(blk, dtype=torch.int32)
        rows = (torch.tensor(blk)[:, None] * bs + torch.arange(bs)).flatten()
        kv.write(1, rows[:ctx], case.k[b], case.v[b])
    out = paged_attention_decode(case.q, kv.k[1], kv.v[1], tables, case.context_lens, case.scale,
                                 block_size=bs, backend=backend)
    check("decode", out, case, backend)
