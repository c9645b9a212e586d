"""The CPU step path (engine/model/upcast.py, engine/model/moe_cpu.py, engine/head_linear.py) against plain references, and the pure
parts of benchmarks/vs_llamacpp.py (argument checks, llama.cpp output parsing, byte-level tokenizer)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import engine.head_linear as head_linear_mod
import engine.model.moe_cpu as moe_cpu_mod
from engine.head_linear import HeadLinear
import engine.model.cpu_kernel as cpu_kernel
from engine.model.cpu_kernel import THIN_ROWS, available, bf16_dot, grouped_mm, isa, thin_mm
from engine.model.moe_cpu import moe_cpu
from engine.model.upcast import SPLIT_MIN_N, linear, native_half_gemm, onednn_f32, onednn_mm, split_mm, upcast_mm
from kernels.moe import moe_ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_mm_is_a_16bit_gemm_with_fp32_accumulation(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 70, generator=g).to(dtype)
    w = torch.randn(301, 70, generator=g).to(dtype)  # more rows than one 256-row slice
    b = torch.randn(301, generator=g).to(dtype)
    ref = (x.double() @ w.double().T + b.double()).to(dtype)
    got = upcast_mm(x, w, b)
    assert got.dtype == dtype and got.shape == (37, 301)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_linear_is_f_linear_for_float32_and_upcast_for_16bit_without_native_gemm():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 48), torch.randn(33, 48), torch.randn(33)
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))  # float32: bitwise F.linear
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    got = linear(xb[None], wb, bb)  # [1, 5, 33]
    assert got.shape == (1, 5, 33) and got.dtype == torch.bfloat16
    if not native_half_gemm(torch.bfloat16):
        assert torch.equal(got[0], upcast_mm(xb, wb, bb))


@pytest.mark.parametrize("M, K, N", [(1, 1024, SPLIT_MIN_N), (16, 1024, 2816), (37, 300, 3001), (128, 1024, 5000)])
def test_wide_float32_linear_is_bitwise_f_linear(M, K, N):
    """The column-split float32 GEMM (lm_head, gate/up) gives F.linear's bits, so float32 tokens do not move."""
    g = torch.Generator().manual_seed(M + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / 30
    ref = torch.nn.functional.linear(x, w)
    with torch.inference_mode():
        assert torch.equal(split_mm(x, w), ref)
        got = linear(x[None], w)  # [1, M, N]: the engine's path (inference mode, no bias, N >= SPLIT_MIN_N)
        if onednn_f32():  # AVX512 CPUs: oneDNN's GEMM instead (its own bits, close to MKL's)
            assert got.shape == (1, M, N) and torch.equal(got[0], onednn_mm(x, w))
            torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
            return
    assert got.shape == (1, M, N) and torch.equal(got[0], ref)


@pytest.mark.skipif(not onednn_f32(), reason="float32 GEMMs run through MKL on this CPU (no AVX512)")
def test_onednn_float32_rows_do_not_depend_on_the_row_count_or_place():
    """What batch invariance needs of the float32 GEMM (engine/shape_buckets.py pads rows to buckets): a row's
    result is the same bits at every bucket size and place, with and without a bias; and it is F.linear's value."""
    from engine.shape_buckets import row_buckets_up_to
    g = torch.Generator().manual_seed(5)
    for K, N in [(64, 170), (256, 1001), (1024, 2816)]:
        w, b, x = torch.randn(N, K, generator=g) / 20, torch.randn(N, generator=g), torch.randn(300, K, generator=g)
        alone = torch.zeros(16, K)
        with torch.inference_mode():
            for M in [m for m in row_buckets_up_to(300) if m <= 300]:
                full = linear(x[:M], w, b)  # [M, N]
                torch.testing.assert_close(full, torch.nn.functional.linear(x[:M], w, b), rtol=1e-5, atol=1e-4)
                for r in torch.randint(0, M, (3,), generator=g).tolist():
                    alone[0] = x[r]
                    assert torch.equal(linear(alone, w, b)[0], full[r])


@pytest.mark.skipif(not available(), reason="no AVX2 CPU kernel here (no C compiler or AVX2)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_per_expert_products(dtype):
    """Odd K (the vector tail) and N (a lone last weight row), empty experts, runs of 1..9 rows (partial tiles)."""
    g = torch.Generator().manual_seed(7)
    E, N, K = 7, 37, 75
    w = (torch.randn(E, N, K, generator=g) / 8).to(dtype)
    counts = torch.tensor([3, 0, 9, 1, 5, 0, 4])
    x = torch.randn(int(counts.sum()), K, generator=g)
    got = grouped_mm(x, counts, w)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0], N)
    ends = torch.cumsum(counts, 0).tolist()
    ref = torch.cat([x[e - n:e].double() @ w[i].double().T for i, (e, n) in enumerate(zip(ends, counts.tolist()))])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # a row's result does not depend on the rows batched with it
    alone = grouped_mm(x[3:4], torch.tensor([0, 0, 1, 0, 0, 0, 0]), w)
    assert torch.equal(alone[0], got[3])


@pytest.mark.skipif(isa() not in ("avx512", "avx512_bf16"), reason="no AVX512 CPU kernel here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx512_float32_kernel_gives_the_avx2_bits(dtype, monkeypatch):
    """float32 results do not depend on the CPU's ISA: the AVX512 kernel is bitwise the AVX2 one (odd K and N,
    partial row tiles, empty experts), for grouped_mm and thin_mm."""
    g = torch.Generator().manual_seed(8)
    E, N, K = 5, 39, 83
    w = (torch.randn(E, N, K, generator=g) / 8).to(dtype)
    counts = torch.tensor([6, 0, 1, 11, 3])
    x = torch.randn(int(counts.sum()), K, generator=g)
    head = (torch.randn(1001, K, generator=g) / 8).to(dtype)
    wide, thin = grouped_mm(x, counts, w), thin_mm(x, head)
    monkeypatch.setenv("UNMASK_CPU_ISA", "avx2")
    assert isa() == "avx2"
    assert torch.equal(wide, grouped_mm(x, counts, w)) and torch.equal(thin, thin_mm(x, head))


@pytest.mark.skipif(not bf16_dot(), reason="no AVX512-BF16 CPU kernel here")
@pytest.mark.parametrize("K", [1, 75, 352])
def test_bf16_dot_kernel_matches_products_and_is_row_invariant(K):
    """bfloat16 activations x bfloat16 weights (VDPBF16PS): close to the exact product (the K % 32 tail masked),
    and a row's result the same bits alone, at any place, and whatever its expert's row count."""
    g = torch.Generator().manual_seed(K)
    E, N = 6, 37
    w = (torch.randn(E, N, K, generator=g) / 8).bfloat16()
    counts = torch.tensor([3, 0, 9, 1, 5, 4])
    x = torch.randn(int(counts.sum()), K, generator=g).bfloat16()
    got = grouped_mm(x, counts, w)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0], N)
    ends = torch.cumsum(counts, 0).tolist()
    ref = torch.cat([x[e - n:e].double() @ w[i].double().T for i, (e, n) in enumerate(zip(ends, counts.tolist()))])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for r, e in ((3, 2), (11, 2), (12, 3), (17, 4), (21, 5)):
        alone = torch.zeros(E, dtype=torch.int64)
        alone[e] = 1
        assert torch.equal(grouped_mm(x[r:r + 1], alone, w)[0], got[r])


def test_kernel_builds_without_its_avx512_file(tmp_path, monkeypatch):
    """A compiler that cannot build grouped_mm_avx512.c still gets the AVX2 kernel (isa avx2)."""
    if not available():
        pytest.skip("no AVX2 CPU kernel here")
    broken = tmp_path / "grouped_mm_avx512.c"
    broken.write_text("#error this compiler has no AVX512-BF16\n")
    monkeypatch.setenv("UNMASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel, "_SOURCE_AVX512", broken)
    cpu_kernel._library.cache_clear(), cpu_kernel._best_isa.cache_clear()
    try:
        assert isa() == "avx2" and not bf16_dot()
        g = torch.Generator().manual_seed(1)
        x, w = torch.randn(5, 40, generator=g), torch.randn(2, 7, 40, generator=g)
        got = grouped_mm(x, torch.tensor([2, 3]), w)
        torch.testing.assert_close(got, torch.cat([x[:2] @ w[0].T, x[2:] @ w[1].T]), rtol=1e-5, atol=1e-5)
    finally:
        cpu_kernel._library.cache_clear(), cpu_kernel._best_isa.cache_clear()


@pytest.mark.skipif(not available(), reason="no AVX2 CPU kernel here (no C compiler or AVX2)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 75, 256])
def test_thin_mm_matches_a_double_product_and_is_row_invariant(dtype, K):
    """lm_head-shaped products at row counts across THIN_ROWS chunks (1..70); a row alone gives the same bits as the
    same row at any place in any batch."""
    g = torch.Generator().manual_seed(K)
    w = (torch.randn(1001, K, generator=g) / 8).to(dtype)  # odd N: a lone last weight row
    x = torch.randn(70, K, generator=g)
    ref = x.double() @ w.double().T  # [70, 1001]
    for M in (1, 3, THIN_ROWS - 1, THIN_ROWS, THIN_ROWS + 1, 70):
        got = thin_mm(x[:M], w)
        assert got.dtype == torch.float32 and got.shape == (M, 1001)
        torch.testing.assert_close(got.double(), ref[:M], rtol=1e-5, atol=1e-5)
    full = thin_mm(x, w)
    for r in torch.randint(0, 70, (6,), generator=g).tolist():
        assert torch.equal(thin_mm(x[r:r + 1], w)[0], full[r])
        assert torch.equal(thin_mm(x[r:], w)[0], full[r])


def plain(w: torch.Tensor) -> torch.Tensor:
    """A loaded weight in the plain layout (shape_buckets.pack_linears keeps oneDNN's weights blocked)."""
    return w.to_dense() if w.is_mkldnn else w


def test_loaded_cpu_model_heads_through_the_thin_kernel(make_checkpoint, monkeypatch):
    """load_model makes the lm_head a HeadLinear: logits equal F.linear's up to rounding, per-row logits do not depend
    on the batch, and without the kernel (thin_mm None: no compiler, UNMASK_CPU_KERNELS=0) it is the bucketed GEMM."""
    from engine import load_model
    from engine.shape_buckets import BucketedLinear
    head = load_model(make_checkpoint("llada"), dtype="float32").net.lm_head
    assert type(head) is HeadLinear
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, head.in_features, generator=g)  # [B, L, D]
    calls = []
    monkeypatch.setattr(head_linear_mod, "thin_mm", lambda *a: calls.append(1) or thin_mm(*a))
    with torch.inference_mode():
        got = head(x)  # [B, L, V]
        assert bool(calls) == (not onednn_f32())  # with oneDNN's AVX512 GEMM the head stays bucketed
        ref = torch.nn.functional.linear(x, plain(head.weight))
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        if available():
            assert torch.equal(head(x[1:, 4:5])[0, 0], got[1, 4])
        monkeypatch.setattr(head_linear_mod, "thin_mm", lambda *a: None)
        fallback = head(x)
        assert torch.equal(fallback, BucketedLinear.forward(head, x))


def test_bf16_head_takes_the_kernel_only_without_native_bf16_gemms(make_checkpoint, monkeypatch):
    """With oneDNN's native bf16 GEMM (AVX512-BF16 / AMX) the AVX2 kernel is slower from 8 rows on: the head stays
    bucketed there; on CPUs without it the kernel replaces the slice-converting upcast GEMM."""
    from engine import load_model
    from engine.model.upcast import uses_upcast
    head = load_model(make_checkpoint("llada"), dtype="bfloat16").net.lm_head
    calls = []
    monkeypatch.setattr(head_linear_mod, "thin_mm", lambda *a: calls.append(1))  # None: falls back after the call
    x = torch.randn(5, head.in_features).bfloat16()
    with torch.inference_mode():
        y = head(x)
    assert y.shape == (5, head.out_features) and bool(calls) == uses_upcast(head.weight)
    torch.testing.assert_close(y.float(), x.float() @ plain(head.weight).float().T, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", ["grouped", "looped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 9, 70])
def test_moe_cpu_matches_reference(dtype, T, path, monkeypatch):
    if path == "looped":
        monkeypatch.setattr(moe_cpu_mod, "grouped_mm", lambda *a: None)
    elif not available():
        pytest.skip("no AVX2 CPU kernel here")
    g = torch.Generator().manual_seed(T)
    E, I, D, k = 6, 24, 40, 2
    x = torch.randn(T, D, generator=g)
    wg, wu = torch.randn(E, I, D, generator=g) / 6, torch.randn(E, I, D, generator=g) / 6
    wd = torch.randn(E, D, I, generator=g) / 5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    w = torch.rand(T, k, generator=g)
    ref = moe_ref(x, wg, wu, wd, w, ids)
    got = moe_cpu(*(t.to(dtype) for t in (x, wg, wu, wd, w)), ids)
    assert got.dtype == dtype and got.shape == (T, D)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), ref, **tol)


def test_vs_llamacpp_parsing_and_arguments():
    from benchmarks.vs_llamacpp import parse_args, parse_llamacpp
    out = "load ...\ndiffusion step: 32/32\ntotal time: 1234.50ms, time per step: 38.6ms\n\n hello world\n\n"
    seconds, text = parse_llamacpp(out)
    assert seconds == pytest.approx(1.2345) and text == " hello world\n"
    with pytest.raises(RuntimeError, match="total time"):
        parse_llamacpp("no timing here")
    args = parse_args(["--families", "llada,rnd1", "--threads", "1,2"])
    assert args.families == ["llada", "rnd1"] and args.threads == [1, 2]
    for bad in (["--families", "gpt2"], ["--threads", "0"], ["--gen-len", "48", "--block-length", "32"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_byte_level_tokenizer_has_the_same_ids(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from engine.random_checkpoint import write_random_checkpoint
    text = "The quick brown fox, 12 + 30?\n\tsea  sky"
    ids = []
    for byte_level in (False, True):
        path = write_random_checkpoint(tmp_path / str(byte_level), "dream", vocab_size=400, num_layers=1,
                                       hidden_size=16, num_heads=2, byte_level=byte_level)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        ids.append(tok.encode(text))
        assert tok.decode(ids[-1]) == text
        if byte_level:
            assert "Ġthe" in tok.get_vocab() and " the" not in tok.get_vocab()
    assert ids[0] == ids[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_weights_give_the_plain_layouts_tokens(make_checkpoint, monkeypatch, dtype):
    """Where oneDNN runs a dtype's GEMMs (upcast.packs), loading keeps Linear weights in its blocked layout: the same
    generated tokens as the plain layout, batched requests included; MoE routers and a tied head stay plain."""
    from engine import LLM, SamplingParams
    from engine.model.upcast import packs
    if not packs(torch.zeros(2, 2, dtype=getattr(torch, dtype))):
        pytest.skip(f"oneDNN does not run {dtype} GEMMs on this CPU")
    prompts = [[5, 9, 14, 3], [7, 2, 11, 30, 8, 6, 1]]
    sp = [SamplingParams(max_tokens=12, block_length=4, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=8, block_length=8, temperature=0.8, seed=3, ignore_eos=True)]
    for family in ("llada", "llada_moe"):
        ckpt = make_checkpoint(family)
        packed = LLM(ckpt, dtype=dtype)
        net = packed.model.net
        assert net.layers[0].attn.qkv_proj.weight.is_mkldnn and net.lm_head.weight.is_mkldnn
        assert not any(m.router.weight.is_mkldnn for m in net.modules() if hasattr(m, "router"))
        monkeypatch.setenv("UNMASK_PACK_WEIGHTS", "0")
        flat = LLM(ckpt, dtype=dtype)
        monkeypatch.delenv("UNMASK_PACK_WEIGHTS")
        assert not flat.model.net.lm_head.weight.is_mkldnn
        assert [o.token_ids for o in packed.generate(prompts, sp)] == [o.token_ids for o in flat.generate(prompts, sp)]
    tied = LLM(make_checkpoint("sdar", tie_word_embeddings=True), dtype=dtype).model.net
    assert tied.lm_head.weight is tied.embed.weight and not tied.lm_head.weight.is_mkldnn


def test_gpu_step_benchmark_runs_the_engine_loop_on_a_smoke_shape(tmp_path):
    """benchmarks/gpu_step.py (run on a lent GPU) exercised on the CPU: the drawn network goes through the
    engine's own step loop, one token per step, and every setting gets a row with its floor."""
    import json
    from benchmarks.gpu_step import main
    out = tmp_path / "gpu_step.md"
    rc = main(["--smoke", "--kernels", "torch", "--batches", "1,3", "--gen-len", "8", "--block-length", "4",
               "--repeats", "1", "--dtype", "float32", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["cache"], r["batch"]) for r in rows] == [("none", 1), ("none", 3), ("dual", 1), ("dual", 3)]
    assert all(r["steps"] == 8 and r["ms_per_step"] > 0 and r["floor_ms"] > 0 for r in rows)
    # the dual cache reads the cached K/V on top of the weights; batch 3 computes 3x the tokens
    none1, none3, dual1 = rows[0], rows[1], rows[2]
    assert dual1["bytes_gb"] > none1["bytes_gb"] and abs(none3["tflop"] / none1["tflop"] - 3) < 1e-6
    assert "| torch | dual | 3 | 8 |" in out.read_text()


_FAULTS_SCRIPT = """
import resource, sys, torch
from engine.loader import load_model
load_model(sys.argv[1], dtype="float32")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # warm: the first block maps its pages once
    torch.empty(48 << 18).fill_(1.0)
f0 = faults()
for _ in range(10):  # a step's large temporary (48 MiB, above glibc's dynamic mmap limit): allocated, written, freed
    torch.empty(48 << 18).fill_(1.0)
print(faults() - f0)
"""


def test_large_temporaries_reuse_their_pages_after_a_cpu_model_loads(make_checkpoint):
    """engine/host_memory.py: once a CPU model is loaded, a freed 48 MiB block is reused from the heap instead of
    being unmapped and faulted in again (12k minor faults each time); UNMASK_MALLOC_TUNING=0 keeps glibc's defaults."""
    import os
    import subprocess
    import sys
    ckpt = str(make_checkpoint("llada"))

    def faults(**env: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, ckpt], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.strip().splitlines()[-1])

    tuned, default = faults(), faults(UNMASK_MALLOC_TUNING="0")
    assert tuned < 500, tuned
    assert default > 10 * 12_000 // 2, default  # each of the 10 blocks mapped and faulted in anew
