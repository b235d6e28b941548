"""Benchmark lora_shrink / lora_expand on 7B-class shapes against the torch references.

    .venv/bin/python -P -m lorabus.kernels.bench [--op all|lora|paged_attention_decode] [--json out.json] [--quick] [--dtype bf16] [--phase all] [--threads 1]
                            [--peak-bw BYTES_PER_S] [--peak-flops FLOP_PER_S] [--verbose]

On CPU use --quick: the full shape set (16k-token prefills through the
gather reference) takes a very long time there.

Model: hidden 4096, 32 query heads and 8 KV heads of 128 (GQA, so k/v are
4096 -> 1024), MLP 11008 (Llama-2-7B sizes with Llama-3-style GQA).
Per layer the LoRA ops are: qkv (sliced, H_out 4096/1024/1024), o
(4096 -> 4096), gate_up (sliced, 2 x 11008), down (11008 -> 4096).
Decode: 1..256 tokens, each slot's tokens scattered; prefill: 4k..16k
tokens in contiguous runs, one per adapter. Every token has an adapter.

Backends: on CUDA "triton" (the kernels), "torch" (per-segment matmuls) and
"gather" (the gather + bmm reference); on CPU only the two torch paths.
Timing: triton.testing.do_bench (median, warmup, L2 flushed) on CUDA; the
best of repeated calls on CPU (see time_host).

Entry `paged_attention_decode` (--op): the Triton paged-attention decode
kernel against the torch reference that copies context (block-level
index_select of every sequence's blocks into a padded batch, then one masked
SDPA call), on 7B-class decode shapes (B 64, 32 query / 8 KV heads of 128,
block 16, contexts 512/1024/2048 and ragged 512..2048); bytes = K and V of
every context once + q + out. On CPU it runs only a tiny correctness smoke
(Triton's interpreter against the reference), so the script works anywhere.

Roofline: bytes are the ideal unique traffic (activations once, each active
adapter's A/B once, t in fp32, y read + written by expand), FLOPs are
2 * tokens * R * H. Ceilings default to an H200 (4.3 TB/s device copy,
790 TFLOP/s bf16 dense) on CUDA; on CPU they are measured roughly here
(a large tensor copy and an fp32 matmul) and labelled as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from importlib.metadata import version

import torch

from . import lora_expand, lora_shrink, make_lora_mapping

# Benchmark shapes, not read from any model (kernels imports nothing of lorabus): a 7B-class layer's
# LoRA groups as the adapter pool lays them out (scheduler/arch.py GROUPS).
HIDDEN, KV, MLP = 4096, 1024, 11008
BENCH_SHAPES = {  # group: (H_in, [H_out per slice])
    "qkv": (HIDDEN, [HIDDEN, KV, KV]),
    "o": (HIDDEN, [HIDDEN]),
    "gate_up": (HIDDEN, [MLP, MLP]),
    "down": (MLP, [HIDDEN]),
}
# (phase, tokens, distinct adapters)
CASES = [("decode", 1, 1), ("decode", 16, 16), ("decode", 64, 8), ("decode", 64, 64),
         ("decode", 256, 32), ("decode", 256, 256),
         ("prefill", 4096, 1), ("prefill", 4096, 8), ("prefill", 16384, 4), ("prefill", 16384, 512)]
RANKS = (8, 16, 64)
QUICK_CASES = [("decode", 1, 1), ("decode", 64, 64), ("decode", 256, 32), ("prefill", 4096, 4)]
QUICK_RANKS = (16,)
H200_BW, H200_FLOPS = 4.3e12, 790e12
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_idx(phase: str, tokens: int, adapters: int, gen: torch.Generator) -> torch.Tensor:
    if phase == "decode":  # every adapter used, tokens in random order
        return (torch.arange(tokens) % adapters)[torch.randperm(tokens, generator=gen)]
    return torch.arange(tokens) * adapters // tokens  # contiguous runs


def time_call(fn, device: torch.device, min_time: float) -> float:
    """Median seconds per call (on CUDA: do_bench, GPU events, L2 flushed, launch overhead included)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    return time_host(fn, min_time)


def time_host(fn, min_time: float) -> float:
    """Best wall seconds per call over >= 3 calls and >= min_time (fewer for calls slower than 1.5 s).

    The minimum, not the median: on a shared CPU the noise is other
    processes taking the cores, which only ever adds time.
    fn must finish its device work before returning.
    """
    fn()
    samples, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (elapsed >= min_time and len(samples) >= 3) or elapsed >= 3.0 or len(samples) >= 200:
            return min(samples)


def cpu_ceilings() -> tuple[float, float]:
    """Rough CPU bandwidth (copy of 256 MiB) and fp32 matmul rate, measured now."""
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / time_call(lambda: dst.copy_(src), src.device, 0.3)
    a = torch.randn(1024, 1024)
    flops = 2 * 1024 ** 3 / time_call(lambda: a @ a, a.device, 0.3)
    return bw, flops


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    esize = torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bw, flops = args.peak_bw or H200_BW, args.peak_flops or H200_FLOPS
        ceilings = "given" if (args.peak_bw or args.peak_flops) else "H200 defaults"
        backends, primary = ("triton", "torch", "gather"), "triton"
    else:
        # One thread by default: with more, a core taken by another process
        # stalls every OpenMP barrier for a scheduler tick (1000x noise here).
        torch.set_num_threads(args.threads)
        name = f"{_cpu_name()} ({args.threads} thread{'s' if args.threads > 1 else ''})"
        mbw, mflops = cpu_ceilings()
        bw, flops = args.peak_bw or mbw, args.peak_flops or mflops
        ceilings = "rough, measured on this CPU (copy bandwidth, fp32 matmul)"
        backends, primary = ("torch", "gather"), "torch"
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__, "triton": version("triton"),
        "dtype": args.dtype, "peak_bytes_per_s": bw, "peak_flop_per_s": flops, "ceilings": ceilings,
        "backends": backends, "primary": primary, "quick": args.quick,
    }
    cases, ranks = (QUICK_CASES, QUICK_RANKS) if args.quick else (CASES, RANKS)
    cases = [c for c in cases if args.phase in ("all", c[0])]
    min_time = 0.1 if args.quick else 0.3
    gen = torch.Generator().manual_seed(0)
    rows, mappings = [], []
    for phase, T, A in cases:
        idx = make_idx(phase, T, A, gen).to(device)
        # Host timer: the mapping's cost is mostly host work plus its one sync.
        mapping_s = time_host(lambda: (make_lora_mapping(idx, A), _sync(device)), min_time)
        m = make_lora_mapping(idx, A)
        mappings.append({"phase": phase, "tokens": T, "adapters": A, "us": mapping_s * 1e6})
        for R in ranks:
            for proj, (H_in, widths) in BENCH_SHAPES.items():
                S, W = len(widths), sum(widths)
                x = torch.randn(T, H_in, device=device, dtype=dtype)
                a = (torch.randn(S, A, R, H_in, device=device) / H_in ** 0.5).to(dtype)
                bs = [(torch.randn(A, h, R, device=device) / R ** 0.5).to(dtype) for h in widths]
                scale = torch.full((S, A), 0.5, device=device)
                y = torch.zeros(T, W, device=device, dtype=dtype)
                t = lora_shrink(x, a, m, backend=primary)
                ops = {
                    "shrink": (lambda bk: lora_shrink(x, a, m, backend=bk),
                               T * H_in * esize + A * S * R * H_in * esize + S * T * R * 4,
                               2 * T * S * R * H_in),
                    "expand": (lambda bk: lora_expand(y, t, bs, m, scale, backend=bk),
                               S * T * R * 4 + A * W * R * esize + 2 * T * W * esize,
                               2 * T * W * R),
                }
                for op, (fn, nbytes, nflop) in ops.items():
                    row = {"phase": phase, "proj": proj, "op": op, "tokens": T, "adapters": A, "rank": R,
                           "bytes": nbytes, "flop": nflop, "err_vs_gather": _check(op, fn, primary, y)}
                    for bk in backends:
                        sec = time_call(lambda: fn(bk), device, min_time)
                        row[bk] = {"us": sec * 1e6, "bytes_per_s": nbytes / sec, "flop_per_s": nflop / sec,
                                   "frac_bw": nbytes / sec / bw, "frac_flop": nflop / sec / flops}
                    row["speedup_vs_gather"] = row["gather"]["us"] / row[primary]["us"]
                    rows.append(row)
                    if args.verbose:
                        print(_row_md(row, backends), flush=True)
                del a, bs, y, t
    return {"header": header, "mapping": mappings, "rows": rows}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check(op, fn, primary, y) -> float:
    """Max |primary - gather| / max |gather| on this shape (expand starts from y = 0 each time)."""
    outs = []
    for bk in (primary, "gather"):
        if op == "expand":
            y.zero_()
        outs.append(fn(bk).float().clone())
    ref = outs[1]
    return ((outs[0] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _row_md(row, backends) -> str:
    cells = [row["phase"], row["proj"], row["op"], str(row["tokens"]), str(row["adapters"]), str(row["rank"])]
    for bk in backends:
        r = row[bk]
        cells += [f"{r['us']:.1f}", f"{r['bytes_per_s'] / 1e9:.1f} ({100 * r['frac_bw']:.1f}%)",
                  f"{r['flop_per_s'] / 1e12:.2f} ({100 * r['frac_flop']:.1f}%)"]
    cells += [f"{row['speedup_vs_gather']:.2f}x", f"{row['err_vs_gather']:.1e}"]
    return "| " + " | ".join(cells) + " |"


def to_markdown(result: dict) -> str:
    h = result["header"]
    backends, primary = h["backends"], h["primary"]
    lines = [
        f"# LoRA kernels benchmark, {h['date']}",
        "",
        f"device: {h['device']}; torch {h['torch']}; triton {h['triton']}; dtype {h['dtype']}"
        f"{'; quick shape set' if h['quick'] else ''}",
        f"ceilings ({h['ceilings']}): {h['peak_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"{h['peak_flop_per_s'] / 1e12:.2f} TFLOP/s",
        "",
        "make_lora_mapping (once per step, includes its host sync):",
        "",
        "| phase | tokens | adapters | µs |",
        "|---|---|---|---|",
        *[f"| {m['phase']} | {m['tokens']} | {m['adapters']} | {m['us']:.1f} |" for m in result["mapping"]],
        "",
        f"GB/s and TFLOP/s with % of the ceilings; speedup = gather µs / {primary} µs; "
        f"err = max |{primary} - gather| / max |gather|.",
        "",
    ]
    head = ["phase", "proj", "op", "T", "adapters", "r"]
    for bk in backends:
        head += [f"{bk} µs", f"{bk} GB/s", f"{bk} TFLOP/s"]
    head += ["speedup", "err"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row_md(row, backends) for row in result["rows"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- paged attention decode

# (B, Hq, Hkv, D, block_size, contexts): a 7B-class decode batch; "ragged" draws 512..2048 per sequence.
PA_SHAPE = (64, 32, 8, 128, 16)
PA_CONTEXTS = (512, 1024, 2048, "ragged")


def _paged_case(B, Hq, Hkv, D, bs, ctxs, dtype, device, gen):
    """A cache holding exactly the batch's blocks in shuffled order (+ a null row), and its block tables."""
    need = [-(-c // bs) for c in ctxs]
    nb = sum(need)
    k = torch.randn(nb * bs + 1, Hkv, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(nb * bs + 1, Hkv, D, generator=gen).to(device=device, dtype=dtype)
    perm = torch.randperm(nb, generator=gen)
    bt = torch.full((B, max(need)), nb, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[used:used + n].int()
        used += n
    q = torch.randn(B, Hq, D, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, bt.to(device), torch.tensor(ctxs, dtype=torch.int32, device=device)


def _gather_sdpa(q, k, v, bt, ctx, scale, bs, max_ctx):
    """Today's CPU-style reference: copy every context into a padded batch (block index_select), masked SDPA."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    nb = (k.shape[0] - 1) // bs
    kb, vb = k[: nb * bs].view(nb, bs, Hkv, D), v[: nb * bs].view(nb, bs, Hkv, D)
    ids = bt.long().clamp_max(nb - 1).flatten()
    kk = kb.index_select(0, ids).view(B, -1, Hkv, D)[:, :max_ctx].transpose(1, 2)
    vv = vb.index_select(0, ids).view(B, -1, Hkv, D)[:, :max_ctx].transpose(1, 2)
    mask = (torch.arange(max_ctx, device=q.device)[None, :] < ctx[:, None].long())[:, None, None, :]
    o = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask, scale=scale,
                                                         enable_gqa=True)
    return o[:, :, 0]


def run_paged_attention_decode(args) -> dict:
    from .paged_attention import paged_attention_decode, paged_attention_decode_ref
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    if device.type != "cuda":
        # Smoke only: Triton's interpreter (forced on for this process if triton is not imported yet).
        import os
        import sys
        if "lorabus.kernels.paged_attention_triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from . import paged_attention_triton as pt
        rows = []
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ctxs = [1, 37, 80]
            q, k, v, bt, ctx = _paged_case(3, 8, 2, 64, 16, ctxs, dtype, device, gen)
            ref = paged_attention_decode_ref(q, k, v, bt, ctx, 64 ** -0.5, block_size=16).float()
            row = {"dtype": str(dtype).removeprefix("torch."), "B": 3, "Hq": 8, "Hkv": 2, "D": 64, "block": 16,
                   "contexts": ctxs, "interpreted": pt.INTERPRETED}
            if pt.INTERPRETED:
                t0 = time.perf_counter()
                out = paged_attention_decode(q, k, v, bt, ctx, 64 ** -0.5, block_size=16, backend="triton")
                row["triton_interpreter_s"] = time.perf_counter() - t0
                row["err_vs_ref"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            rows.append(row)
        return {"device": _cpu_name(), "smoke": True, "rows": rows}
    dtype = DTYPES[args.dtype]
    esize = torch.finfo(dtype).bits // 8
    bw = args.peak_bw or H200_BW
    B, Hq, Hkv, D, bs = PA_SHAPE
    scale = D ** -0.5
    rows = []
    for c in PA_CONTEXTS:
        ctxs = (torch.randint(512, 2049, (B,), generator=gen).tolist() if c == "ragged" else [c] * B)
        q, k, v, bt, ctx = _paged_case(B, Hq, Hkv, D, bs, ctxs, dtype, device, gen)
        out = torch.empty_like(q)
        max_ctx = max(ctxs)
        fns = {"triton": lambda: paged_attention_decode(q, k, v, bt, ctx, scale, out, block_size=bs,
                                                        backend="triton"),
               "gather_sdpa": lambda: _gather_sdpa(q, k, v, bt, ctx, scale, bs, max_ctx)}
        ref = paged_attention_decode_ref(q, k, v, bt, ctx, scale, block_size=bs).float()
        nbytes = 2 * sum(ctxs) * Hkv * D * esize + 2 * B * Hq * D * esize
        row = {"contexts": c, "B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "block": bs, "bytes": nbytes}
        for name, fn in fns.items():
            err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
            sec = time_call(fn, device, 0.3)
            row[name] = {"us": sec * 1e6, "bytes_per_s": nbytes / sec, "frac_bw": nbytes / sec / bw,
                         "err_vs_ref": err}
        row["speedup"] = row["gather_sdpa"]["us"] / row["triton"]["us"]
        rows.append(row)
        del q, k, v, out
    return {"device": torch.cuda.get_device_name(device), "smoke": False, "dtype": args.dtype,
            "peak_bytes_per_s": bw, "rows": rows}


def paged_attention_markdown(res: dict) -> str:
    if res["smoke"]:
        lines = [f"# paged_attention_decode: CPU correctness smoke ({res['device']}; no timing)", "",
                 "| dtype | B | Hq/Hkv | D | block | contexts | triton (interpreter) s | err vs torch ref |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            t = f"{r['triton_interpreter_s']:.2f}" if r["interpreted"] else "skipped (triton imported without TRITON_INTERPRET)"
            e = f"{r['err_vs_ref']:.1e}" if r["interpreted"] else "-"
            lines.append(f"| {r['dtype']} | {r['B']} | {r['Hq']}/{r['Hkv']} | {r['D']} | {r['block']} | "
                         f"{r['contexts']} | {t} | {e} |")
        return "\n".join(lines)
    lines = [f"# paged_attention_decode, {res['device']}, {res['dtype']}", "",
             f"GB/s = K/V of every context once + q + out over time, % of {res['peak_bytes_per_s'] / 1e12:.1f} TB/s; "
             "speedup = gather_sdpa µs / triton µs; err = max |x - torch ref| / max |ref|.", "",
             "| contexts | B | Hq/Hkv | D | block | triton µs | triton GB/s | gather+SDPA µs | gather+SDPA GB/s "
             "| speedup | triton err | gather err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t, g = r["triton"], r["gather_sdpa"]
        lines.append(f"| {r['contexts']} | {r['B']} | {r['Hq']}/{r['Hkv']} | {r['D']} | {r['block']} | "
                     f"{t['us']:.1f} | {t['bytes_per_s'] / 1e9:.0f} ({100 * t['frac_bw']:.0f}%) | {g['us']:.1f} | "
                     f"{g['bytes_per_s'] / 1e9:.0f} ({100 * g['frac_bw']:.0f}%) | {r['speedup']:.2f}x | "
                     f"{t['err_vs_ref']:.1e} | {g['err_vs_ref']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="reduced shape set (a couple of minutes on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch threads (default 1)")
    p.add_argument("--phase", choices=("all", "decode", "prefill"), default="all", help="only these cases")
    p.add_argument("--peak-bw", type=float, help="memory ceiling in bytes/s")
    p.add_argument("--peak-flops", type=float, help="matrix ceiling in FLOP/s")
    p.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    p.add_argument("--op", choices=("all", "lora", "paged_attention_decode"), default="all",
                   help="which entries to run (default all)")
    args = p.parse_args(argv)
    result = run(args) if args.op in ("all", "lora") else {}
    if args.op in ("all", "paged_attention_decode"):
        result["paged_attention_decode"] = run_paged_attention_decode(args)
    if args.json:  # before printing, so a closed stdout cannot lose it
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    parts = [to_markdown(result)] if "rows" in result else []
    if "paged_attention_decode" in result:
        parts.append(paged_attention_markdown(result["paged_attention_decode"]))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
