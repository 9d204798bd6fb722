"""The 8-bit Adam update on the CPU as one compiled pass (dequantize, Adam, block maxima, requantize, and for an
unprojected tensor its weight step).

:class:`gradproj.inner.Adam8bit` on the CPU otherwise makes about fifteen eager torch passes per chunk (two
table gathers to dequantize m and v, torch's fused Adam, the block maxima, the scaling, the bin arithmetic,
two table gathers to requantize). The kernel here does the same work block by block (256 values, in L1),
once per value: it reads R, the codes and the scales, and writes the new codes and scales and either ψ (a
projected matrix: the engine back-projects it) or, for an unprojected tensor, the weight itself
(:meth:`gradproj.inner.Adam8bit.step_weight`: ``W += −step·ψ``, then ``W += −lr·wd·W``, torch's ``add_`` with
alpha, one fused multiply-add each, as the engine's update). With AVX-512 the table lookups run sixteen at a
time (gathers; the bin tables are padded for their 4-byte loads).

Arithmetic. Adam is torch's fused CPU kernel's (what ``adam_kernel="fused"`` runs): m ← fma(1−β1, R − m, m)
(its lerp, an explicit fused multiply-add there too; fma(−β1, R − m, R) when 1−β1 ≥ 0.5), v ←
fma((1−β2)·R, R, v·β2) (the rounding torch's build of the kernel gives here: its ``v·β2 + (1−β2)·R·R``
compiled into one fma), ψ = 0 + m / (√v + eps), coefficients rounded to float32 from double as torch does. On
an AVX-512 Xeon with torch 2.13 that is torch's kernel bit for bit (but for the last values of a tensor, which
torch runs through scalar code); a build of torch that rounds v twice differs by one rounding of v.
Quantization is :class:`gradproj.inner.adam8bit.LutQuantizer`'s, which is bitsandbytes' (>= 0.50): per block
absmax = max |x|, t = x · fl(1/absmax), bin = trunc(fl(fl(fl(t + 1)·32767.5) + 0.5)), code = table[bin], code 0
for an all-zero block; the source is compiled with ``-ffp-contract=off`` (a patched inductor config, for this
build only) so that no multiply-add is contracted into an fma, and the kernel is checked against the
vectorized quantizer on every bin edge of both maps before it is used (:func:`reproduces_lut`).

Commit. A block is committed (codes, scales, weight) only when both of its maxima are 0 or finite normal
numbers. The blocks run as contiguous ranges, one per torch thread (OpenMP, 2^15 values or more a range), and
a range stops at its first block that is not: the caller runs the eager update on what each range left
(bitsandbytes' quantizer decides what a non-finite or subnormal block stores), so the state after such a step
is exactly what the eager code gives from there.

Build. The source is compiled through inductor's C++ backend (``CppPythonBindingsCodeCache``: the compiler
and ISA flags torch.compile uses, an on-disk cache, a binding that takes tensors as pointers). The same pass
written as torch ops under ``torch.compile(dynamic=True, fullgraph=True)`` measured 0.75 ms per 2^17 values
against 0.94 ms eager (inductor emits every table gather as a scalar loop through int64 indices, and a call
costs ~45 µs of guards). This kernel, ψ mode, one thread, four runs on an Intel(R) Xeon(R) Processor with
AVX-512/AMX (torch 2.13 CPU): 0.23–0.44 ms per 2^17 values, 1.7–3.1x torch's fused Adam over fp32 moments in
the same run, and the eager update 3.3–5.2x the kernel. Building costs ~3.5 s once per process (importing
inductor ~1.6 s, probing the CPU's vector ISA ~1.5 s, the compile ~1 s the first time on a machine), against
~5 ns a value saved per update. So the eager path runs first and the kernel is built once the process has
updated :data:`BUILD_AFTER_VALUES` 8-bit values eagerly (~5·10^8, a few seconds of eager updates: a training
run builds it within its first tens of steps, a test or a short script never pays for it). A build that fails
(no C++ compiler, an inductor error, a kernel that does not reproduce the quantizer) is logged and not
retried; the eager path stays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

log = logging.getLogger("gradproj")

#: 8-bit values the eager path updates in this process before the kernel is built (see the module docstring)
BUILD_AFTER_VALUES = 1 << 29
#: inductor config for the build (this build only, whatever the process's config or environment says): no
#: multiply-add may be contracted into an fma (the bin arithmetic must round as bitsandbytes'), no unsafe math
BUILD_CONFIG = {"cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False}

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#if !INDUCTOR_USE_VECTOR_TYPES()  // no vector ISA picked: ATen's generic (scalar) vector types
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#endif
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
// GATHERS: the table lookups of whole blocks run as AVX-512 gathers where the compiler targets AVX-512
#if @GATHERS@ && defined(__AVX512F__)
#define GATHERS 1
#else
#define GATHERS 0
#endif
#if GATHERS
#include <immintrin.h>
#endif

// The 8-bit Adam update of n values, block by block: gradproj/inner/adam8bit_fused.py.
// mode 0: ψ into out (n values). mode 1: r holds fp32 m (n values) then fp32 v (n values), which are quantized
// as they are (no Adam, out untouched). mode 2: out is the weight: out ← out + alpha·ψ, then out ← out + decay·out
// when decay != 0 (torch's add_ with alpha: one fused multiply-add each). keep_moments: the updated fp32 m and v are
// also written to moments (2n values). A block is committed (its codes, scales and output written) only when both
// of its maxima are 0 or finite normal numbers. The blocks are split into up to `threads` contiguous ranges, one
// per thread; a range stops at its first block that is not committed. info[0]: the number of ranges; range t's
// first value, the end of what it committed, and its end are info[1 + 3t], info[2 + 3t], info[3 + 3t].
static int64_t update_blocks(const int64_t b0, const int64_t b1, const float* r, uint8_t* mc, uint8_t* vc, float* ma,
                             float* va, const float* maps, const uint8_t* mtab, const uint8_t* vtab, float* out,
                             float* moments, const int64_t n, const float w, const float b2, const float c2,
                             const float eps, const float alpha, const float decay, const int64_t mode,
                             const int64_t keep_moments) {
    using Vec = at::vec::Vectorized<float>;
    using IVec = at::vec::Vectorized<int32_t>;
    constexpr int64_t B = @BLOCK@;
    constexpr int64_t L = Vec::size();
    static_assert(B % L == 0 && B % 16 == 0, "a block is whole vectors");
    alignas(64) float m[B];
    alignas(64) float v[B];
    alignas(64) float g[B];
    alignas(64) float uu[B];
    alignas(64) int32_t bins[2][B];
    const bool quantize_only = mode == 1;
    const bool small = std::fabs(w) < 0.5f;  // torch's lerp: base m and weight w, or base R and weight w - 1
    const Vec W(small ? w : w - 1.0f), B2(b2), C2(c2), EPS(eps), ZERO(0.0f), ONE(1.0f), SPAN(@HALF_SPAN@f),
        HALF(0.5f), ALPHA(alpha), DECAY(decay);
    const IVec IZERO(0), ILAST(@LAST_BIN@);
    for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t s = blk * B;
        const int64_t len = std::min<int64_t>(B, n - s);
        const bool full = len == B;
        // a partial block is padded with R = m = v = 0: those lanes stay 0 and leave the block maxima alone
        const float* rb = r + s;
        float* ub = (full && mode == 0) ? out + s : uu;
        if (quantize_only) {
            std::memcpy(m, r + s, len * sizeof(float));
            std::memcpy(v, r + n + s, len * sizeof(float));
        } else {
            if (!full) {
                std::memset(g, 0, sizeof(g));
                std::memcpy(g, r + s, len * sizeof(float));
                rb = g;
            }
            const float sm = ma[blk], sv = va[blk];
#if GATHERS
            if (full) {  // code[c] · absmax, sixteen table lookups at a time
                const __m512 SM = _mm512_set1_ps(sm), SV = _mm512_set1_ps(sv);
                for (int64_t j = 0; j < B; j += 16) {
                    const __m512i cm = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(mc + s + j)));
                    const __m512i cv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(vc + s + j)));
                    _mm512_store_ps(m + j, _mm512_mul_ps(_mm512_i32gather_ps(cm, maps, 4), SM));
                    _mm512_store_ps(v + j, _mm512_mul_ps(_mm512_i32gather_ps(cv, maps + @MAP@, 4), SV));
                }
            } else
#endif
            for (int64_t j = 0; j < len; ++j) {
                m[j] = maps[mc[s + j]] * sm;
                v[j] = maps[@MAP@ + vc[s + j]] * sv;
            }
        }
        for (int64_t j = len; j < B; ++j) {
            m[j] = 0.0f;
            v[j] = 0.0f;
        }
        Vec amx(0.0f), avx(0.0f);
        for (int64_t j = 0; j < B; j += L) {
            Vec mj = Vec::loadu(m + j);
            Vec vj = Vec::loadu(v + j);
            if (!quantize_only) {
                const Vec gj = Vec::loadu(rb + j);
                mj = at::vec::fmadd(W, gj - mj, small ? mj : gj);
                vj = at::vec::fmadd(C2 * gj, gj, vj * B2);
                (ZERO + mj / (vj.sqrt() + EPS)).store(ub + j);
                mj.store(m + j);
                vj.store(v + j);
            }
            amx = at::vec::maximum(amx, mj.abs());  // maximum propagates NaN
            avx = at::vec::maximum(avx, vj.abs());
        }
        const float am = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, amx);
        const float av = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, avx);
        if (!(am <= FLT_MAX) || !(av <= FLT_MAX) || (am > 0.0f && am < FLT_MIN) || (av > 0.0f && av < FLT_MIN)) {
            return s;  // NaN, inf or subnormal: this block and the ones after it are not committed
        }
        if (keep_moments) {
            std::memcpy(moments + s, m, len * sizeof(float));
            std::memcpy(moments + n + s, v, len * sizeof(float));
        }
        const Vec IM(am == 0.0f ? 0.0f : 1.0f / am), IV(av == 0.0f ? 0.0f : 1.0f / av);
        for (int64_t j = 0; j < B; j += L) {
            // trunc(fl(fl(fl(t + 1) * 32767.5) + 0.5)); the clamp only guards memory (|t| <= 1 + 2^-23 here)
            const Vec tm = Vec::loadu(m + j) * IM;
            const Vec tv = Vec::loadu(v + j) * IV;
            const IVec bm = at::vec::convert_to_int_of_same_size<float>((tm + ONE) * SPAN + HALF);
            const IVec bv = at::vec::convert_to_int_of_same_size<float>((tv + ONE) * SPAN + HALF);
            at::vec::minimum(at::vec::maximum(bm, IZERO), ILAST).store(bins[0] + j);
            at::vec::minimum(at::vec::maximum(bv, IZERO), ILAST).store(bins[1] + j);
        }
#if GATHERS
        if (full) {  // sixteen bin-table lookups at a time (4-byte loads at byte offsets: the tables are padded)
            for (int64_t j = 0; j < B; j += 16) {
                const __m512i bm = _mm512_load_si512((const void*)(bins[0] + j));
                const __m512i bv = _mm512_load_si512((const void*)(bins[1] + j));
                _mm_storeu_si128((__m128i*)(mc + s + j),
                                 _mm512_cvtepi32_epi8(_mm512_i32gather_epi32(bm, (const int*)mtab, 1)));
                _mm_storeu_si128((__m128i*)(vc + s + j),
                                 _mm512_cvtepi32_epi8(_mm512_i32gather_epi32(bv, (const int*)vtab, 1)));
            }
        } else
#endif
        for (int64_t j = 0; j < len; ++j) {
            mc[s + j] = mtab[bins[0][j]];
            vc[s + j] = vtab[bins[1][j]];
        }
        if (am == 0.0f) std::memset(mc + s, 0, len);  // an all-zero block stores code 0, as bitsandbytes
        if (av == 0.0f) std::memset(vc + s, 0, len);
        ma[blk] = am;
        va[blk] = av;
        if (mode == 0 && !full) {
            std::memcpy(out + s, uu, len * sizeof(float));
        } else if (mode == 2) {
            float* ws = out + s;
            for (int64_t j = 0; j < len; j += L) {
                const int64_t k = std::min<int64_t>(L, len - j);
                Vec wj = k == L ? Vec::loadu(ws + j) : Vec::loadu(ws + j, k);
                wj = at::vec::fmadd(Vec::loadu(uu + j), ALPHA, wj);
                if (decay != 0.0f) wj = at::vec::fmadd(wj, DECAY, wj);
                if (k == L) wj.store(ws + j); else wj.store(ws + j, k);
            }
        }
    }
    return std::min<int64_t>(b1 * B, n);
}

extern "C" void kernel(const float* r, uint8_t* mc, uint8_t* vc, float* ma, float* va, const float* maps,
                       const uint8_t* mtab, const uint8_t* vtab, float* out, int64_t* info, float* moments,
                       const int64_t n, const float w, const float b2, const float c2, const float eps,
                       const float alpha, const float decay, const int64_t mode, const int64_t keep_moments,
                       const int64_t threads) {
    constexpr int64_t B = @BLOCK@;
    const int64_t nblocks = (n + B - 1) / B;
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, nblocks / @MIN_BLOCKS@));
    info[0] = nt;
#pragma omp parallel for num_threads(nt) schedule(static, 1) if (nt > 1)
    for (int64_t t = 0; t < nt; ++t) {
        const int64_t b0 = nblocks * t / nt, b1 = nblocks * (t + 1) / nt;
        info[1 + 3 * t] = b0 * B;
        info[2 + 3 * t] = update_blocks(b0, b1, r, mc, vc, ma, va, maps, mtab, vtab, out, moments, n, w, b2, c2, eps,
                                        alpha, decay, mode, keep_moments);
        info[3 + 3 * t] = std::min<int64_t>(b1 * B, n);
    }
}
"""

_ARGTYPES = [
    "const float*",  # r
    "uint8_t*",  # m codes
    "uint8_t*",  # v codes
    "float*",  # m scales
    "float*",  # v scales
    "const float*",  # the two code maps (2, 256)
    "const uint8_t*",  # m's bin table (padded)
    "const uint8_t*",  # v's bin table (padded)
    "float*",  # out: ψ, or the weight
    "int64_t*",  # info: the values committed
    "float*",  # the updated fp32 moments (2n), with keep_moments
    "int64_t",  # n
    "float",  # 1 - β1
    "float",  # β2
    "float",  # 1 - β2
    "float",  # eps
    "float",  # the weight's step: alpha (−step size)
    "float",  # the weight's decay: −lr·wd, or 0
    "int64_t",  # mode: 0 ψ, 1 quantize only, 2 weight step
    "int64_t",  # keep_moments
    "int64_t",  # threads
]
#: fewest blocks a thread gets (2^15 values, torch's grain size for elementwise work)
MIN_BLOCKS_PER_THREAD = 128
#: bytes past each bin table's end: the vectorized lookups load 4 bytes at the offset of a bin
TABLE_PAD = 4


class FusedUpdate:
    """The compiled kernel with the code maps and bin tables of one device (the CPU)."""

    def __init__(self, fn: Callable, maps: torch.Tensor, tables: list[torch.Tensor], block_size: int):
        self.fn = fn
        self.block_size = block_size
        self.maps = maps.contiguous()
        self.tables = [torch.cat([t.reshape(-1), t.new_zeros(TABLE_PAD)]) for t in tables]

    def update(
        self, r, out, codes, scales, beta1: float, beta2: float, eps: float, weight_step=None, moments=None
    ) -> list[tuple[int, int]]:
        """The update of fp32 ``r`` (flat, contiguous), with the moments' flat uint8 ``codes`` (m, v) and fp32
        ``scales`` (m, v) updated in place, block by block, on up to torch's number of threads (contiguous ranges
        of blocks, 2^15 values or more each). ``weight_step=None``: ψ into fp32 ``out``; ``(alpha, decay)``:
        ``out`` is the weight (fp32, flat), stepped as ``out.add_(ψ, alpha=alpha)`` and then, when decay != 0,
        ``out.add_(out, alpha=decay)``. ``moments``: a buffer of 2·numel fp32 values to receive the updated m and
        v before quantization (for tests).

        Returns the value ranges ``(start, stop)`` not committed, none when all were: each thread's range stops
        at its first block whose maximum of m or v is not 0 or a finite normal number, leaving that block and the
        rest of its range as they were (codes, scales and weight; ψ there may be partly written)."""
        threads = max(1, torch.get_num_threads())
        info = torch.zeros(1 + 3 * threads, dtype=torch.int64)
        keep = moments is not None
        alpha, decay = weight_step if weight_step is not None else (0.0, 0.0)
        self.fn(
            r, codes[0], codes[1], scales[0], scales[1], self.maps, self.tables[0], self.tables[1], out,
            info, moments if keep else out, r.numel(), 1.0 - beta1, beta2, 1.0 - beta2, eps, alpha, decay,
            0 if weight_step is None else 2, int(keep), threads,
        )  # fmt: skip
        ranges = info[1 : 1 + 3 * int(info[0])].view(-1, 3).tolist()
        return [(done, stop) for _, done, stop in ranges if done < stop]

    def quantize(self, m: torch.Tensor, v: torch.Tensor):
        """(codes, scales) of fp32 ``m`` and ``v`` (same length) by the kernel's quantizer alone, or None when a
        block maximum is not a finite normal number."""
        n = m.numel()
        blocks = -(-n // self.block_size)
        x = torch.cat([m.reshape(-1), v.reshape(-1)]).float()
        codes = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
        scales = [torch.zeros(blocks) for _ in range(2)]
        info = torch.zeros(4, dtype=torch.int64)
        self.fn(
            x, codes[0], codes[1], scales[0], scales[1], self.maps, self.tables[0], self.tables[1], x,
            info, x, n, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 0, 1,
        )  # fmt: skip
        return (codes, scales) if int(info[2]) == n else None


_lock = threading.Lock()
_state: dict = {"kernel": None, "tried": False, "eager_values": 0}


def for_update(numel: int) -> FusedUpdate | None:
    """The kernel for an update of ``numel`` 8-bit values on the CPU, or None (the eager path runs): not built
    yet (the values are counted towards :data:`BUILD_AFTER_VALUES`, and the build happens when they reach
    it), a build that failed, or a step being traced by torch.compile."""
    if torch.compiler.is_compiling():
        return None
    if _state["kernel"] is not None or _state["tried"]:
        return _state["kernel"]
    _state["eager_values"] += numel
    if _state["eager_values"] < BUILD_AFTER_VALUES:
        return None
    return build()


def current() -> FusedUpdate | None:
    """The kernel when it is built already (and the step is not being traced by torch.compile), else None; counts
    nothing towards the build."""
    return None if torch.compiler.is_compiling() else _state["kernel"]


def build() -> FusedUpdate | None:
    """Compile the kernel (once per process; later calls return the first outcome)."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _state["kernel"] = _build()
    return _state["kernel"]


def _build(gathers: bool = True) -> FusedUpdate | None:
    """Compile and check the kernel; ``gathers=False`` builds it with scalar table lookups only (what a CPU
    without AVX-512 runs), for tests."""
    from .adam8bit import BLOCK_SIZE, LUT_BINS, lut_quantizer

    cpu = torch.device("cpu")
    q = lut_quantizer(cpu)
    if q is None:  # the installed bitsandbytes quantizes otherwise: its own calls run
        return None
    started = time.perf_counter()
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        source = (
            _SOURCE.replace("@BLOCK@", str(BLOCK_SIZE))
            .replace("@HALF_SPAN@", repr((LUT_BINS - 1) * 0.5))
            .replace("@LAST_BIN@", str(LUT_BINS - 1))
            .replace("@MAP@", str(q.maps.shape[1]))
            .replace("@MIN_BLOCKS@", str(MIN_BLOCKS_PER_THREAD))
            .replace("@GATHERS@", str(int(gathers)))
        )
        with inductor_config.patch(BUILD_CONFIG):
            fn = CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, source, needs_vec_isa=True)
        kernel = FusedUpdate(fn, q.maps, q.tables, BLOCK_SIZE)
        same = reproduces_lut(kernel, q)
    except Exception as err:  # any build or load failure leaves the eager path, which works everywhere
        reason = f"{type(err).__name__}: {err}"
        log.info("8-bit moments: the compiled CPU update could not be built (%s); the eager one runs", reason)
        return None
    if not same:
        log.info("8-bit moments: the compiled CPU update quantizes differently from bitsandbytes; the eager one runs")
        return None
    log.debug("8-bit moments: the compiled CPU update was built in %.1f s", time.perf_counter() - started)
    return kernel


def reproduces_lut(kernel: FusedUpdate, q) -> bool:
    """Whether the kernel's quantizer gives the vectorized quantizer's codes and scales (which are bitsandbytes')
    on every bin edge of both maps, at block maxima 1 and 3, the latter ending in a partial block."""
    from .adam8bit import _blocks_with_max, boundary_values, quantize_lut

    for scale, cut in ((1.0, 0), (3.0, 100)):
        x = [_blocks_with_max(boundary_values(q.tables[k], k == 0), scale)[: -cut or None] for k in (0, 1)]
        n = max(t.numel() for t in x)
        x = [torch.cat([t, torch.zeros(n - t.numel())]) for t in x]
        got = kernel.quantize(x[0], x[1])
        if got is None:
            return False
        for k in (0, 1):
            codes, scales = quantize_lut(q, x[k], k == 0)
            if not (torch.equal(got[0][k], codes) and torch.equal(got[1][k], scales)):
                return False
    return True
