"""The v2 MX grouped GEMM (jax-triton): weights decoded straight into Hopper's wgmma register fragment.

``out[M_pad, N] = a[M_pad, K] @ W[expert(row tile)]^T`` over row tiles of ``block_m`` rows (the dispatch's
padded layout, ``tile_expert`` per tile, -1 = unused tile, written as zeros), float32 accumulators, for
MXFP4 or MXFP6 weights in the fragment layout (:mod:`quarkmoe_jax.formats.fragment_layout`).

Each program computes the transposed tile ``acc[block_n, block_m] += decode(W)[block_n, 128] @ a^T`` so the
weights are wgmma's M side and come from registers (A operand): the packed bytes are loaded 16 bytes per
thread, one inline-asm per 32-bit word turns them into four bf16x2 register pairs (rotate and mask: 9
integer instructions per 8 elements; the pattern is the e2m1 value times 2^-126), one ``mul.bf16x2`` per
pair applies ``2^126 * 2^(s - 127)`` (two where some scale code exceeds 128: ``exact_scales``), and the
``reshape`` / ``permute`` between them are register renamings that Triton's layout propagation resolves
(no shared-memory round trip on the weight path; checked on the compiled TTGIR / SASS, docs/performance.md,
and for every table tile in CI: tests/moe/test_triton_launch.py compiles them with Triton and ptxas on the CPU).
Only the small activation tile goes through shared memory, as wgmma's B operand. MXFP6 runs the same
decode on the codes' 4-bit parts and ORs in their low-plane bits (8 bytes per thread per 128 K, duplicated
into the word's register by a ``join``: two shifts and masks more per pair), with ``2^(127 - bias)``.

Two ways to keep the weight stream in flight (``TileConfig``): ``prefetch_l2 = 0`` pipelines the weight
loads with ``num_stages`` (Triton turns them into cp.async into shared memory, read back conflict-free
straight into the fragment); ``prefetch_l2 = d > 0`` loads straight into registers and prefetches the units
``d`` steps ahead into L2 (``cp.async.bulk.prefetch.L2``; MXFP4 only: MXFP6 tiles asking for it take the
pipelined path). ``split_k`` splits the K loop over a third grid
axis (float32 partial sums added by XLA) for grids too small for the GPU (few touched experts).

No CPU path (jax-triton has none): :func:`unavailable_reason` says why a call cannot run here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats.fragment_layout import LOW_ROTATIONS, UNIT_K, exact_scales, low_mask, padded_shape
from quarkmoe_jax.formats.mx import MX_FORMATS

__all__ = ["mx_fragment_gemm", "launch_parameters", "fits"]

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra is not installed
    triton = None


def fits(weight: QArray, block_n: int) -> bool:
    """Whether ``block_n`` (64, 128 or 256: 4 warps per 64... 256 rows) tiles the weight's padded rows."""
    return padded_shape(weight)[1] % block_n == 0


def _bf16x2_power_of_two(exponent: int) -> int:
    """The bf16x2 register holding ``2^exponent`` in both halves (a normal bf16)."""
    return ((exponent + 127) << 7) * 0x10001


if triton is not None:
    # One 32-bit word of the fragment layout -> four bf16x2 pairs (value * 2^-126 bit patterns).
    _DECODE = tl.constexpr(
        """{
    .reg .b32 t;
    shf.l.wrap.b32 t, $4, $4, 6;  and.b32 $0, t, 0x81C081C0;
    shf.l.wrap.b32 t, $4, $4, 12; and.b32 $1, t, 0x81C081C0;
    shf.l.wrap.b32 t, $4, $4, 2;  and.b32 $2, t, 0x81C081C0;
    shf.l.wrap.b32 t, $4, $4, 8;  and.b32 t, t, 0x00400040;
    and.b32 $3, $4, 0x81808180;   or.b32 $3, $3, t;
    }"""
    )
    # The same, then times 2^126 (bf16x2 0x7e80): exact e2m1 values, for scales applied as 2^(s-127).
    _DECODE_EXACT = tl.constexpr(
        """{
    .reg .b32 t, c;
    mov.b32 c, 0x7e807e80;
    shf.l.wrap.b32 t, $4, $4, 6;  and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 $0, t, c;
    shf.l.wrap.b32 t, $4, $4, 12; and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 $1, t, c;
    shf.l.wrap.b32 t, $4, $4, 2;  and.b32 t, t, 0x81C081C0; mul.rn.bf16x2 $2, t, c;
    shf.l.wrap.b32 t, $4, $4, 8;  and.b32 t, t, 0x00400040;
    and.b32 $3, $4, 0x81808180;   or.b32 t, $3, t; mul.rn.bf16x2 $3, t, c;
    }"""
    )

    def _low_plane_asm(fmt_name: str, exact: bool) -> str:
        """FP6: the FP4 decode of word ``$4`` with each pair's low-plane bits (register ``$5``) OR'ed in."""
        mask = low_mask(fmt_name)
        bias = MX_FORMATS[fmt_name].element.bias
        lines = [".reg .b32 t, u, c;"]
        if exact:
            lines.append(f"mov.b32 c, {_bf16x2_power_of_two(127 - bias):#010x};")
        a_parts = [
            "shf.l.wrap.b32 t, $4, $4, 6;  and.b32 t, t, 0x81C081C0;",
            "shf.l.wrap.b32 t, $4, $4, 12; and.b32 t, t, 0x81C081C0;",
            "shf.l.wrap.b32 t, $4, $4, 2;  and.b32 t, t, 0x81C081C0;",
            "shf.l.wrap.b32 t, $4, $4, 8;  and.b32 t, t, 0x00400040; and.b32 u, $4, 0x81808180; or.b32 t, t, u;",
        ]
        for o, rotation in enumerate(LOW_ROTATIONS[fmt_name]):
            lines.append(a_parts[o])
            rotate = f"shf.l.wrap.b32 u, $5, $5, {rotation}; and.b32 u, u, {mask:#010x};"
            lines.append(rotate if rotation else f"and.b32 u, $5, {mask:#010x};")
            lines.append(f"or.b32 t, t, u; mul.rn.bf16x2 ${o}, t, c;" if exact else f"or.b32 ${o}, t, u;")
        return "{\n" + "\n".join(lines) + "\n}"

    _DECODE_E3M2 = tl.constexpr(_low_plane_asm("mxfp6_e3m2", False))
    _DECODE_E3M2_EXACT = tl.constexpr(_low_plane_asm("mxfp6_e3m2", True))
    _DECODE_E2M3 = tl.constexpr(_low_plane_asm("mxfp6_e2m3", False))
    _DECODE_E2M3_EXACT = tl.constexpr(_low_plane_asm("mxfp6_e2m3", True))
    _PAIRS = tl.constexpr((tl.bfloat16, tl.bfloat16))

    @triton.jit
    def _decode6(words, low, E3M2: tl.constexpr, EXACT: tl.constexpr):
        """FP6: ``words`` as :func:`_decode`'s, ``low`` uint8 ``[BN/2, 128]`` (each low-plane byte twice)."""
        if E3M2:
            if EXACT:
                return tl.inline_asm_elementwise(
                    _DECODE_E3M2_EXACT, "=r,=r,=r,=r,r,r", [words, low], dtype=_PAIRS, is_pure=True, pack=4
                )
            return tl.inline_asm_elementwise(
                _DECODE_E3M2, "=r,=r,=r,=r,r,r", [words, low], dtype=_PAIRS, is_pure=True, pack=4
            )
        if EXACT:
            return tl.inline_asm_elementwise(
                _DECODE_E2M3_EXACT, "=r,=r,=r,=r,r,r", [words, low], dtype=_PAIRS, is_pure=True, pack=4
            )
        return tl.inline_asm_elementwise(
            _DECODE_E2M3, "=r,=r,=r,=r,r,r", [words, low], dtype=_PAIRS, is_pure=True, pack=4
        )

    @triton.jit
    def _decode(words, EXACT: tl.constexpr):
        """uint8 ``[BN/2, 128]`` (4 consecutive register bytes = one word) -> bf16 rows g (o0) and g+8 (o1)."""
        if EXACT:
            return tl.inline_asm_elementwise(
                _DECODE_EXACT, "=r,=r,=r,=r,r", [words], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
            )
        return tl.inline_asm_elementwise(
            _DECODE, "=r,=r,=r,=r,r", [words], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
        )

    @triton.jit
    def _scaled(w, factors):
        """``w * factor`` per bf16x2 pair; ``factors`` int32 holds the pair's bf16x2 factor bits."""
        return tl.inline_asm_elementwise(
            "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r,r", [w, factors], dtype=tl.bfloat16, is_pure=True, pack=2
        )

    @triton.jit
    def _fragment(o0, o1, BN: tl.constexpr):
        """Rows g / g+8 of every 16-row unit -> the ``[BN, 128]`` tile in row / K order (register renaming)."""
        j = tl.join(o0, o1)  # [BN/2, 128, h8]
        j = j.reshape(BN // 16, 8, 2, 4, 8, 2, 2)  # blk g kh tig (q1 q0 k3) j h8
        j = j.permute(0, 6, 1, 2, 4, 3, 5)  # blk h8 g kh (q1 q0 k3) tig j
        return j.reshape(BN, 128)

    @triton.jit
    def _prefetch_l2(pointers, on):
        """``cp.async.bulk.prefetch.L2`` of the 1 KiB unit at each pointer where ``on`` (sm_90)."""
        return tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            setp.ne.b32 p, $2, 0;
            @p cp.async.bulk.prefetch.L2.global [$1], 1024;
            mov.u32 $0, 0;
            }""",
            "=r,l,r",
            [pointers, on],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _program_tile(tile_expert_ptr, a_ptr, K_UNITS, N_UNITS, BLOCK_M, BLOCK_N, SPLIT_K):
        """This program's share: its row tile's ``expert`` (-1: unused), the K units it runs (``iterations``),
        its ``rows``, the base of its activation rows and its first weight unit (rows of ``program_id(1)``,
        K split ``program_id(2)``)."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        expert = tl.load(tile_expert_ptr + pid_m)
        units_per_split = K_UNITS // SPLIT_K
        iterations = tl.where(expert >= 0, units_per_split, 0)
        e = tl.maximum(expert, 0).to(tl.int64)
        first_unit = pid_k * units_per_split
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        a_base = a_ptr + rows.to(tl.int64)[:, None] * (K_UNITS * 128) + first_unit * 128
        unit = (e * N_UNITS + pid_n * (BLOCK_N // 16)) * K_UNITS + first_unit
        return expert, iterations, rows, a_base, unit

    @triton.jit
    def _mx_accumulate(
        w_ptr,
        s_ptr,
        low_ptr,
        unit,
        a_base,
        iterations,
        K_UNITS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EXACT: tl.constexpr,
        PREFETCH_L2: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        FP6: tl.constexpr,
        E3M2: tl.constexpr,
        ELEM_BIAS: tl.constexpr,
    ):
        """The K loop of one program: float32 ``acc[BLOCK_N, BLOCK_M] = decode(W) @ a^T`` over ``iterations``
        128-K units from weight unit ``unit`` (its bytes, scales and FP6 low plane) and activation rows at
        ``a_base``."""
        w_base = w_ptr + unit * 1024
        s_base = s_ptr + unit * 64
        low_base = low_ptr + unit * 512
        g = tl.arange(0, 8)
        blk = tl.arange(0, BLOCK_N // 16)
        sj = tl.arange(0, 8)
        if PREFETCH_L2 == 0:
            # [BN/2, 128]: p = 8*blk + g (rows g, g+8 of unit blk), c = 64*kh + 16*tig + byte
            p = tl.arange(0, BLOCK_N // 2)
            c = tl.arange(0, 128)
            w_offsets = ((p // 8) * (K_UNITS * 1024) + (p % 8) * 64)[:, None] + ((c // 64) * 512 + (c % 64))[None, :]
            s_offsets = (blk * (K_UNITS * 64))[:, None, None] + (g * 8)[None, :, None] + sj[None, None, :]
            if FP6:  # [BN/2, 64]: byte c' = 32*kh + 8*tig + 2*q + b of row pair p
                cl = tl.arange(0, 64)
                low_offsets = ((p // 8) * (K_UNITS * 512) + (p % 8) * 64)[:, None] + cl[None, :]
        else:
            # [tig, g, blk, kh, byte]: the coalesced default layout of this shape is the fragment's own
            tig = tl.arange(0, 4)
            kh = tl.arange(0, 2)
            jj = tl.arange(0, 16)
            w_offsets = (
                (tig * 16)[:, None, None, None, None]
                + (g * 64)[None, :, None, None, None]
                + (blk * (K_UNITS * 1024))[None, None, :, None, None]
                + (kh * 512)[None, None, None, :, None]
                + jj[None, None, None, None, :]
            )
            s_offsets = (
                (tig * 0)[:, None, None, None]
                + (g * 8)[None, :, None, None]
                + (blk * (K_UNITS * 64))[None, None, :, None]
                + sj[None, None, None, :]
            )
            # warp w prefetches units w and w + BN/32 of the step PREFETCH_L2 ahead (warp-uniform addresses)
            pf_warp = tl.arange(0, BLOCK_N) // 32
            pf_on = (pf_warp < BLOCK_N // 32).to(tl.int32)
            for d in tl.static_range(1, PREFETCH_L2):
                for u in tl.static_range(2):
                    _prefetch_l2(
                        w_base + d * 1024 + (pf_warp + u * (BLOCK_N // 32)) * (K_UNITS * 1024),
                        pf_on * (d < iterations).to(tl.int32),
                    )
        offs_k = tl.arange(0, 128)

        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for it in tl.range(0, iterations, num_stages=NUM_STAGES if PREFETCH_L2 == 0 else 1):
            words = tl.load(w_base + w_offsets)
            scale_bytes = tl.load(s_base + s_offsets)
            if FP6:
                low = tl.load(low_base + low_offsets)
                low_base += 512
            a = tl.load(a_base + offs_k[None, :])
            if PREFETCH_L2 > 0:
                for u in tl.static_range(2):
                    _prefetch_l2(
                        w_base + PREFETCH_L2 * 1024 + (pf_warp + u * (BLOCK_N // 32)) * (K_UNITS * 1024),
                        pf_on * ((it + PREFETCH_L2) < iterations).to(tl.int32),
                    )
                words = words.permute(2, 1, 3, 0, 4).reshape(BLOCK_N // 2, 128)
            w_base += 1024
            s_base += 64
            a_base += 128

            if FP6:
                o0, o1 = _decode6(words, tl.join(low, low).reshape(BLOCK_N // 2, 128), E3M2, EXACT)
            else:
                o0, o1 = _decode(words, EXACT)
            w = _fragment(o0, o1, BLOCK_N)  # [BN, 128] bf16, scale not yet applied
            if PREFETCH_L2 == 0:
                s = scale_bytes.reshape(BLOCK_N // 16, 8, 4, 2).permute(0, 3, 1, 2).reshape(BLOCK_N, 4)
            else:
                s = scale_bytes.reshape(4, 8, BLOCK_N // 16, 4, 2).permute(2, 4, 1, 3, 0).reshape(BLOCK_N, 4, 4)
            codes = s.to(tl.int32)
            if EXACT:  # 2^(s-127) in both halves; code 0 -> the bf16 subnormal 2^-127
                factors = tl.maximum(codes * 0x00800080, 0x00400040)
            else:  # 2^(s-bias) = bf16 bits (s + 127 - bias) << 7, exact for s <= 127 + bias
                factors = codes * 0x00800080 + (127 - ELEM_BIAS) * 0x00800080
            if PREFETCH_L2 == 0:
                factors = tl.broadcast_to(factors[:, :, None], (BLOCK_N, 4, 32)).reshape(BLOCK_N, 128)
            else:
                factors = tl.broadcast_to(factors[:, :, None, :, None], (BLOCK_N, 4, 4, 4, 2)).reshape(BLOCK_N, 128)
            w = _scaled(w, factors)
            acc = tl.dot(w, tl.trans(a), acc)

        return acc

    @triton.jit
    def _mx_fragment_gemm_kernel(
        tile_expert_ptr,
        a_ptr,
        w_ptr,
        s_ptr,
        low_ptr,
        out_ptr,
        K_UNITS: tl.constexpr,
        N_UNITS: tl.constexpr,
        M_PAD: tl.constexpr,
        N_OUT: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EXACT: tl.constexpr,
        PREFETCH_L2: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        FP6: tl.constexpr,
        E3M2: tl.constexpr,
        ELEM_BIAS: tl.constexpr,
    ):
        pid_n, pid_k = tl.program_id(1), tl.program_id(2)
        expert, iterations, rows, a_base, unit = _program_tile(
            tile_expert_ptr, a_ptr, K_UNITS, N_UNITS, BLOCK_M, BLOCK_N, SPLIT_K
        )
        acc = _mx_accumulate(
            w_ptr,
            s_ptr,
            low_ptr,
            unit,
            a_base,
            iterations,
            K_UNITS,
            BLOCK_M,
            BLOCK_N,
            EXACT,
            PREFETCH_L2,
            NUM_STAGES,
            FP6,
            E3M2,
            ELEM_BIAS,
        )
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INTERLEAVED:  # gpt-oss: weight row c is gate (c even) or up (c odd) of channel c // 2: shard-major
            cols = (cols % 2) * (N_OUT // 2) + cols // 2
        out_rows = pid_k * M_PAD + rows
        tl.store(out_ptr + out_rows.to(tl.int64)[None, :] * N_OUT + cols[:, None], acc)


if triton is not None:

    @triton.jit
    def _partial_sum(
        acc, partial_ptr, count_ptr, rows, cols, pid_k, M_PAD: tl.constexpr, N_PAD: tl.constexpr, SPLIT_K: tl.constexpr
    ):
        """Split-K in the kernel: every split stores its float32 ``acc[cols, rows]`` into ``partial`` and counts
        itself in; the split that arrives last returns the sum of all splits in split order (the same sum,
        bit for bit, whichever split is last) and ``True``; the others return ``False``."""
        offsets = rows.to(tl.int64)[None, :] * N_PAD + cols[:, None]
        tl.store(partial_ptr + pid_k * (M_PAD * N_PAD) + offsets, acc)
        tl.debug_barrier()  # every thread's partial is stored before the count says so
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
        last = arrived == SPLIT_K - 1
        total = tl.zeros_like(acc)
        if last:
            for k in tl.static_range(SPLIT_K):
                # visible here: each split stored, then a barrier, then its release; this program's acquire
                total += tl.load(partial_ptr + k * (M_PAD * N_PAD) + offsets)
        return total, last

    @triton.jit
    def _rounded(x, ACT_BF16: tl.constexpr):
        """``x`` (float32) rounded to the activation dtype and back (a no-op for float32 activations)."""
        if ACT_BF16:
            return x.to(tl.bfloat16).to(tl.float32)
        return x

    @triton.jit
    def _mx_fused_gemm_kernel(
        tile_expert_ptr,
        a_ptr,
        w_ptr,
        s_ptr,
        low_ptr,
        bias_ptr,
        row_scale_ptr,
        row_weight_ptr,
        count_in_ptr,
        out_ptr,
        partial_ptr,
        count_ptr,
        K_UNITS: tl.constexpr,
        N_UNITS: tl.constexpr,
        M_PAD: tl.constexpr,
        N_PAD: tl.constexpr,
        N_STORE: tl.constexpr,
        GATED: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        ACTIVATION: tl.constexpr,
        LIMIT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ROW_SCALES: tl.constexpr,
        ROW_WEIGHTS: tl.constexpr,
        ACT_BF16: tl.constexpr,
        OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EXACT: tl.constexpr,
        PREFETCH_L2: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        FP6: tl.constexpr,
        E3M2: tl.constexpr,
        ELEM_BIAS: tl.constexpr,
    ):
        """The v2 K loop with the epilogue in the kernel (v3): split-K summed by the last split, then row
        scales, bias, the gated activation (``ACTIVATION``: 1 silu, 2 swigluoai; clamp ``LIMIT`` if > 0),
        router weights, and the output written in its dtype, ``out[M_PAD, N_STORE]``. Gated weights:
        interleaved rows (gpt-oss: row 2c gate, 2c + 1 up of channel c) or halves (Mixtral: rows ``[0, N/2)``
        gate, ``[N/2, N)`` up; each program then runs the K loop over both halves' ``BLOCK_N`` rows)."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        expert, iterations, rows, a_base, unit = _program_tile(
            tile_expert_ptr, a_ptr, K_UNITS, N_UNITS, BLOCK_M, BLOCK_N, SPLIT_K
        )
        e = tl.maximum(expert, 0).to(tl.int64)
        acc = _mx_accumulate(
            w_ptr,
            s_ptr,
            low_ptr,
            unit,
            a_base,
            iterations,
            K_UNITS,
            BLOCK_M,
            BLOCK_N,
            EXACT,
            PREFETCH_L2,
            NUM_STAGES,
            FP6,
            E3M2,
            ELEM_BIAS,
        )
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows of this program (gate rows for halves)
        HALVES: tl.constexpr = GATED and not INTERLEAVED
        if HALVES:
            up_acc = _mx_accumulate(
                w_ptr,
                s_ptr,
                low_ptr,
                unit + (N_UNITS // 2) * K_UNITS,
                a_base,
                iterations,
                K_UNITS,
                BLOCK_M,
                BLOCK_N,
                EXACT,
                PREFETCH_L2,
                NUM_STAGES,
                FP6,
                E3M2,
                ELEM_BIAS,
            )
        if SPLIT_K > 1:
            count = count_ptr + pid_m * tl.num_programs(1) + pid_n
            if HALVES:  # both halves into one buffer: gate rows then up rows
                both = tl.join(acc, up_acc).permute(2, 0, 1).reshape(2 * BLOCK_N, BLOCK_M)
                both_cols = tl.join(cols, cols + N_PAD // 2).permute(1, 0).reshape(2 * BLOCK_N)
                total, last = _partial_sum(both, partial_ptr, count, rows, both_cols, pid_k, M_PAD, N_PAD, SPLIT_K)
                acc, up_acc = total.reshape(2, BLOCK_N, BLOCK_M).permute(1, 2, 0).split()
            else:
                acc, last = _partial_sum(acc, partial_ptr, count, rows, cols, pid_k, M_PAD, N_PAD, SPLIT_K)
        else:
            last = True
        if last:
            valid = expert >= 0
            if ROW_SCALES:
                row_scale = tl.load(row_scale_ptr + rows)[None, :]
                acc = acc * row_scale
                if HALVES:
                    up_acc = up_acc * row_scale
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + e * N_PAD + cols)[:, None]
                if HALVES:
                    up_acc = up_acc + tl.load(bias_ptr + e * N_PAD + N_PAD // 2 + cols)[:, None]
            if GATED:
                if INTERLEAVED:  # rows 2c, 2c + 1 -> channel c
                    gate, up = acc.reshape(BLOCK_N // 2, 2, BLOCK_M).permute(0, 2, 1).split()
                    out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                else:
                    gate, up = acc, up_acc
                    out_cols = cols
                gate = _rounded(gate, ACT_BF16)
                up = _rounded(up, ACT_BF16)
                if LIMIT > 0:
                    gate = tl.minimum(gate, LIMIT)
                    up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
                if ACTIVATION == 1:  # silu(gate) rounded to the activation dtype, times up
                    out = _rounded(_rounded(gate * tl.sigmoid(gate), ACT_BF16) * up, ACT_BF16)
                else:  # swigluoai: (up + 1) * gate * sigmoid(1.702 gate), rounded once
                    out = _rounded((up + 1.0) * gate * tl.sigmoid(1.702 * gate), ACT_BF16)
            else:
                out = acc
                out_cols = cols
            if ROW_WEIGHTS:
                out = out * tl.load(row_weight_ptr + rows)[None, :]
            out = tl.where(valid, out, 0.0)
            offsets = rows.to(tl.int64)[None, :] * N_STORE + out_cols[:, None]
            if OUT_BF16:
                tl.store(out_ptr + offsets, out.to(tl.bfloat16), mask=out_cols[:, None] < N_STORE)
            else:
                tl.store(out_ptr + offsets, out, mask=out_cols[:, None] < N_STORE)


def launch_parameters(
    *, num_tiles: int, n_pad: int, k_pad: int, fmt_name: str, exact: bool, config, interleaved: bool = False
) -> dict:
    """The v2 kernel's launch for ``num_tiles`` row tiles of ``config.block_m`` rows times a fragment-layout
    weight of padded shape ``[E, n_pad, k_pad]`` in ``fmt_name`` (``mxfp4``, ``mxfp6_e3m2``, ``mxfp6_e2m3``;
    ``exact``: some scale code exceeds 128, :func:`~quarkmoe_jax.formats.fragment_layout.exact_scales`):
    ``grid``, ``num_warps``, ``num_stages`` and the kernel's constants, as :func:`mx_fragment_gemm` launches
    it (and tests/moe/test_triton_launch.py compiles it on the CPU)."""
    k_units = k_pad // UNIT_K
    split = config.split_k
    if k_units % split:
        raise ValueError(f"split_k {split} does not divide the K loop's {k_units} units")
    fp6 = fmt_name != "mxfp4"
    prefetch = 0 if fp6 else config.prefetch_l2
    stages = config.num_stages if prefetch == 0 else 1
    if fp6 and config.prefetch_l2:  # the L2-prefetch path is FP4's: pipeline the loads instead
        stages = max(config.num_stages, 3)
    m_pad = num_tiles * config.block_m
    return dict(
        grid=(num_tiles, n_pad // config.block_n, split),
        num_warps=config.num_warps,
        num_stages=stages,
        K_UNITS=k_units,
        N_UNITS=n_pad // 16,
        M_PAD=m_pad,
        N_OUT=n_pad,
        INTERLEAVED=bool(interleaved),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        SPLIT_K=split,
        EXACT=bool(exact),
        PREFETCH_L2=prefetch,
        NUM_STAGES=stages,
        FP6=fp6,
        E3M2=fmt_name == "mxfp6_e3m2",
        ELEM_BIAS=MX_FORMATS[fmt_name].element.bias,
    )


def _operand(a, weight: QArray, tile_expert, config):
    """``a`` as both MX kernels read it (bfloat16, K padded to the weight's) and the launch's sizes
    ``(a, n, n_pad, k_pad, num_tiles, m_pad)``; raises as :func:`mx_fragment_gemm` says."""
    _, n_pad, k_pad = padded_shape(weight)
    if not fits(weight, config.block_n):
        raise NotImplementedError(f"triton backend: block_n {config.block_n} does not tile N = {n_pad}")
    num_tiles = tile_expert.shape[0]
    m_pad = a.shape[0]
    if m_pad != num_tiles * config.block_m:
        raise ValueError(f"a has {m_pad} rows, expected {num_tiles} tiles x {config.block_m}")
    a = a.astype(jnp.bfloat16)
    if a.shape[1] < k_pad:
        a = jnp.pad(a, ((0, 0), (0, k_pad - a.shape[1])))
    return a, weight.shape[1], n_pad, k_pad, num_tiles, m_pad


def mx_fragment_gemm(a, weight: QArray, tile_expert, *, config, interleaved: bool = False):
    """``a [M_pad, K]`` (bfloat16, rows in the dispatch's tile layout) times MX ``weight`` (MXFP4 or MXFP6,
    fragment layout, ``[E, N, K]``) of each row tile's expert -> float32 ``[M_pad, N]`` accumulators.

    ``config``: :class:`~quarkmoe_jax.kernels.base.TileConfig` (``block_m``, ``block_n``, ``num_warps``,
    ``num_stages``, ``prefetch_l2``, ``split_k``; as :meth:`TritonBackend.fit_tile
    <quarkmoe_jax.kernels.triton.backend.TritonBackend.fit_tile>` fits a table's tile to the launch; MXFP6
    ignores ``prefetch_l2``). ``interleaved``: the weight's rows alternate two
    shards (gpt-oss's gate / up); the output is shard-major.

    Raises:
      NotImplementedError: ``block_n`` does not tile the weight's rows.
    """
    from quarkmoe_jax.kernels.triton.launch import triton_call

    a, n, n_pad, k_pad, num_tiles, m_pad = _operand(a, weight, tile_expert, config)
    fmt_name = weight.qtype.element
    launch = launch_parameters(
        num_tiles=num_tiles,
        n_pad=n_pad,
        k_pad=k_pad,
        fmt_name=fmt_name,
        exact=exact_scales(weight),
        config=config,
        interleaved=interleaved,
    )
    fp6 = weight.extra is not None
    out = triton_call(
        tile_expert.astype(jnp.int32),
        a,
        weight.values,
        weight.scales,
        weight.extra if fp6 else weight.values,  # not read for MXFP4
        kernel=_mx_fragment_gemm_kernel,
        out_shape=jax.ShapeDtypeStruct((config.split_k * m_pad, n_pad), jnp.float32),
        **launch,
    )
    if config.split_k > 1:
        out = out.reshape(config.split_k, m_pad, n_pad).sum(axis=0)
    if interleaved:  # each shard's n_pad/2 columns end with the padded rows' zeros
        return out.reshape(m_pad, 2, n_pad // 2)[:, :, : n // 2].reshape(m_pad, n)
    return out[:, :n]


FUSED_ACTIVATIONS = {"silu": 1, "swigluoai": 2}
"""Gated activations the v3 epilogue computes in the kernel (``ACTIVATION`` codes); others run the v2 kernel
with the epilogue in XLA."""


def fused_unsupported(weight: QArray, epilogue, config, out_dtype) -> str | None:
    """Why :func:`mx_fused_gemm` cannot take this launch (``None``: it can)."""
    if epilogue.col_scales:
        return "per-column weight scales (MX weights have none)"
    if epilogue.gated and epilogue.activation not in FUSED_ACTIVATIONS:
        return f"gated activation {epilogue.activation!r} (in the kernel: {', '.join(FUSED_ACTIVATIONS)})"
    if not epilogue.gated and epilogue.activation is not None:
        return f"non-gated activation {epilogue.activation!r}"
    if jnp.dtype(epilogue.activation_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"activation dtype {epilogue.activation_dtype}"
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"output dtype {jnp.dtype(out_dtype).name}"
    n = weight.shape[1]
    if epilogue.gated and not epilogue.interleaved and (padded_shape(weight)[1] != n or (n // 2) % config.block_n):
        return f"gate / up halves of {n // 2} rows not tiled by block_n {config.block_n}"
    return None


def fused_launch_parameters(
    *,
    num_tiles: int,
    n: int,
    n_pad: int,
    k_pad: int,
    fmt_name: str,
    exact: bool,
    config,
    epilogue,
    n_out: int,
    out_dtype,
) -> dict:
    """:func:`launch_parameters` for the v3 kernel (epilogue in the kernel): its grid (gate / up halves: one
    program per ``block_n`` channels of both halves) and the epilogue's constants."""
    params = launch_parameters(
        num_tiles=num_tiles, n_pad=n_pad, k_pad=k_pad, fmt_name=fmt_name, exact=exact, config=config
    )
    del params["N_OUT"], params["INTERLEAVED"]
    halves = epilogue.gated and not epilogue.interleaved
    limit = epilogue.swiglu_limit
    if epilogue.activation == "swigluoai" and limit is None:
        from quarkmoe_jax.activations import SWIGLUOAI_LIMIT

        limit = SWIGLUOAI_LIMIT
    params.update(
        grid=(num_tiles, (n // 2 if halves else n_pad) // config.block_n, config.split_k),
        N_PAD=n_pad,
        N_STORE=n_out,
        GATED=bool(epilogue.gated),
        INTERLEAVED=bool(epilogue.gated and epilogue.interleaved),
        ACTIVATION=FUSED_ACTIVATIONS.get(epilogue.activation, 0),
        LIMIT=float(limit or 0.0),
        HAS_BIAS=bool(epilogue.has_bias),
        ROW_SCALES=bool(epilogue.row_scales),
        ROW_WEIGHTS=bool(epilogue.row_weights),
        ACT_BF16=jnp.dtype(epilogue.activation_dtype) == jnp.bfloat16,
        OUT_BF16=jnp.dtype(out_dtype) == jnp.bfloat16,
    )
    return params


def mx_fused_gemm(
    a,
    weight: QArray,
    tile_expert,
    bias=None,
    row_weights=None,
    row_scales=None,
    *,
    config,
    epilogue,
    n_out,
    out_dtype,
):
    """The v3 kernel: :func:`mx_fragment_gemm`'s product with the epilogue (``epilogue``: row scales, bias
    ``[E, N]``, the gated activation, router ``row_weights``) and the split-K sum in the kernel ->
    ``out_dtype [M_pad, n_out]``, as :func:`quarkmoe_jax.kernels.base.epilogue_of_accumulators` computes it
    from the v2 accumulators (to float32 summation order and the activation's last bit; rows of unused tiles,
    which no pair reads, are zeros here). Gate / up halves
    run half v2's programs (each over both halves), so their K split is sized again on that grid (up to
    twice ``config.split_k``).

    Raises:
      NotImplementedError: :func:`fused_unsupported` names a reason, or ``block_n`` does not tile the rows.
    """
    from quarkmoe_jax.kernels.triton.launch import triton_call

    reason = fused_unsupported(weight, epilogue, config, out_dtype)
    if reason is not None:
        raise NotImplementedError(f"triton backend, fused epilogue: {reason}")
    for name, wanted, given in (
        ("bias", epilogue.has_bias, bias),
        ("row_scales", epilogue.row_scales, row_scales),
        ("row_weights", epilogue.row_weights, row_weights),
    ):
        if wanted and given is None:
            raise ValueError(f"mx_fused_gemm: the epilogue applies {name} but none was given")
    a, n, n_pad, k_pad, num_tiles, m_pad = _operand(a, weight, tile_expert, config)
    if epilogue.gated and not epilogue.interleaved:  # half v2's programs: split K again to fill the GPU
        from quarkmoe_jax.kernels.triton.backend import split_k_for

        split = split_k_for(num_tiles, n // 2 // config.block_n, k_pad // UNIT_K, 2 * config.split_k)
        config = dataclasses.replace(config, split_k=split)
    params = fused_launch_parameters(
        num_tiles=num_tiles,
        n=n,
        n_pad=n_pad,
        k_pad=k_pad,
        fmt_name=weight.qtype.element,
        exact=exact_scales(weight),
        config=config,
        epilogue=epilogue,
        n_out=n_out,
        out_dtype=out_dtype,
    )
    split = config.split_k
    programs = params["grid"][0] * params["grid"][1]
    unused = jnp.zeros((1,), jnp.float32)
    bias = unused if bias is None else jnp.pad(jnp.asarray(bias, jnp.float32), ((0, 0), (0, n_pad - n)))
    fp6 = weight.extra is not None
    out, _, _ = triton_call(
        tile_expert.astype(jnp.int32),
        a,
        weight.values,
        weight.scales,
        weight.extra if fp6 else weight.values,  # not read for MXFP4
        bias,
        unused if row_scales is None else jnp.asarray(row_scales, jnp.float32),
        unused if row_weights is None else jnp.asarray(row_weights, jnp.float32),
        jnp.zeros((programs if split > 1 else 1,), jnp.int32),
        kernel=_mx_fused_gemm_kernel,
        out_shape=[
            jax.ShapeDtypeStruct((m_pad, n_out), out_dtype),
            jax.ShapeDtypeStruct((split * m_pad * n_pad if split > 1 else 1,), jnp.float32),
            jax.ShapeDtypeStruct((programs if split > 1 else 1,), jnp.int32),
        ],
        input_output_aliases={8: 2},
        **params,
    )
    return out
