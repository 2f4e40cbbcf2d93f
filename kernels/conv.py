"""Convolution + BatchNorm + ReLU kernels for the residual block.

Tensors are addressed through their (n, c, h, w) strides, so channels_last
(the fast path: a pixel's channels are contiguous) and contiguous NCHW both
work without copies. Convolutions are implicit GEMMs: rows are output pixels,
columns output channels, the reduction runs over (r, s, input channel), and
``tl.dot`` accumulates in fp32.

BatchNorm is split around the convolutions (see ``fastres/functional.py``):

* ``_conv_kernel`` epilogue ``EPI_STATS`` writes each row tile's per-channel
  mean and M2 (sum of squared deviations) to its own slot of a partial
  buffer; the last tile of each channel column to finish (an atomic counter)
  combines them in tile order (deterministic; Chan's combination avoids the
  cancellation of sum/sum-of-squares), so statistics, scale/shift and the
  running statistics are ready when the launch ends.
* ``_conv_kernel`` prologue ``PRO_BN_RELU`` applies ``relu(v * scale + shift)``
  to the operand as it is loaded, so the normalised activation of the first
  conv is never written to memory.
* Backward, ``PRO_BN_GRAD`` rebuilds BN's input gradient
  ``g * coef_g + y * coef_y + coef_c`` from the masked gradient ``g`` and the
  saved BN input ``y``; ``EPI_RELU_GRAD`` masks a data gradient by the ReLU of
  the previous BN (recomputed from its saved input) and writes that BN's
  per-tile backward sums.
* ``_conv_grads_kernel`` computes a 3x3 stride-1 conv's data and weight
  gradients in one pass over dY: a tile of pixels is both a tile of dX and a
  slice of dW's sum, so dY, its BN input and the conv's input are read once
  instead of twice.
"""

import triton
import triton.language as tl

from .multi_tensor import to_storage

# What the A operand's loaded value v becomes before the dot product.
PRO_NONE = 0
PRO_BN_RELU = 1  # relu(v * scale[c] + shift[c]); zero padding stays zero
PRO_BN_GRAD = 2  # v * scale[c] + v2 * yscale[c] + shift[c] (v: masked grad, v2: the BN input)

# What the epilogue writes besides the output.
EPI_NONE = 0
EPI_STATS = 1  # per-tile mean and M2 of the output, per channel
EPI_RELU_GRAD = 2  # out = acc * (y * scale + shift > 0); per-tile sum(out), sum(out * (y - mean) * invstd)

# Paired convolutions in one launch of ``_conv_kernel`` (a downsampling block's conv1 and projection).
PAIR_NONE = 0
PAIR_OUTPUTS = 1  # one operand, two weights and BatchNorms, two outputs: the second half of axis 1 is the second
PAIR_OPERANDS = 2  # out = conv(A', W) + conv(B', W2): two operands with their prologues summed into one output

# Residual modes of the elementwise kernels.
RES_NONE = 0
RES_TENSOR = 1  # + r
RES_BN = 2  # + r * res_scale[c] + res_shift[c] (the downsample branch's BatchNorm)
RES_AFTER_RELU = 3  # relu(...) + r: the residual added after the ReLU (ResNet-9's x + relu(bn(conv(...))))


@triton.jit
def _pixel_coords(offs, H, W):
    """Flat pixel index -> (n, h, w) over an N x H x W grid."""
    hw = H * W
    n = offs // hw
    rem = offs - n * hw
    h = rem // W
    return n, h, rem - h * W


@triton.jit
def _index(x, IDX64: tl.constexpr):
    """``x`` as a memory offset: int64 only when some tensor of the launch has 2**31 elements or more
    (the launcher's ``IDX64``); 32-bit offsets need half the registers and cheaper arithmetic."""
    if IDX64:
        return x.to(tl.int64)
    return x


@triton.jit
def _to_tf32(x):
    """fp32 ``x`` rounded to TF32 (10 mantissa bits), to nearest with ties away from zero, as cuDNN's TF32
    convolutions round their operands (``cvt.rna.tf32.f32``): the tensor cores otherwise take fp32 bits as
    they are and ignore the low 13, which truncates (a bias toward zero). A bit operation, so that the
    interpreter computes it too; infinities and NaN pass unchanged."""
    bits = x.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = (bits + 0x1000) & 0xFFFFE000
    return tl.where(finite, rounded, bits).to(tl.float32, bitcast=True)


@triton.jit
def _dot_operand(x, COMPUTE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 ``x`` rounded to the compute dtype for ``tl.dot`` (to TF32 for ``DOT_PRECISION`` "tf32").

    ``UPCAST`` (set under the interpreter, whose bf16 ``tl.dot`` returns
    garbage in triton 3.9) multiplies the rounded values in fp32 instead:
    the same products and fp32 sums the tensor cores compute.
    """
    x = to_storage(x, COMPUTE)
    if DOT_PRECISION == "tf32":
        x = _to_tf32(x)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _prologue(v_ptrs, v2_ptrs, mask, offs_c, c_mask, pro_ptr, C, PROLOGUE: tl.constexpr):
    """Load a 2-D operand tile (channels along ``offs_c``) and apply the prologue; fp32 out.

    ``pro_ptr`` holds the per-channel rows [scale, shift(, yscale)] of ``C``
    values each: BatchNorm's packed statistics for ``PRO_BN_RELU``, its packed
    backward coefficients for ``PRO_BN_GRAD``.
    """
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        scale = tl.load(pro_ptr + offs_c, mask=c_mask, other=0.0)
        shift = tl.load(pro_ptr + C + offs_c, mask=c_mask, other=0.0)
        v = tl.where(mask, _relu(v * scale + shift), 0.0)
    elif PROLOGUE == 2:
        v2 = tl.load(v2_ptrs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(pro_ptr + offs_c, mask=c_mask, other=0.0)
        shift = tl.load(pro_ptr + C + offs_c, mask=c_mask, other=0.0)
        yscale = tl.load(pro_ptr + 2 * C + offs_c, mask=c_mask, other=0.0)
        v = tl.where(mask, v * scale + v2 * yscale + shift, 0.0)
    return v


@triton.jit
def _arrived_last(counter_ptr, n_programs):
    """True in the last of ``n_programs`` programs to arrive at ``counter_ptr`` (which it resets to 0).

    Each program stores its partials first; the barrier makes every thread's
    stores happen before the acq_rel atomic, so the last program sees them all.
    It then combines them in a fixed order: results stay deterministic.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1)
    last = arrived == n_programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


@triton.jit
def _relu(x):
    """max(x, 0) with NaN kept NaN, as torch's ReLU (``tl.maximum``'s default maxnum would turn NaN into 0)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_passes(pre):
    """Where ReLU's gradient passes: torch's ``threshold_backward`` zeroes it where the value is <= 0 only,
    so a NaN pre-activation passes its gradient on (``pre > 0`` would drop it)."""
    return ~(pre <= 0.0)


@triton.jit
def _group(index, count, GROUP: tl.constexpr):
    """Partials ``0 .. count - 1`` are combined in groups of ``GROUP``: the group of ``index``, its first
    member, its size, the number of groups and the rows the groups' results take (none with one group).
    The last member of a group to arrive combines the group; the last group to arrive combines the
    groups' results (two levels: at most ``GROUP`` partials each while ``count <= GROUP**2``, where one
    program used to walk all ``count``). Per channel column the counters are one per group, then one for
    the groups' arrivals when there are several (the launchers' ``_finalize_layout``)."""
    group = index // GROUP
    first = group * GROUP
    n_groups = tl.cdiv(count, GROUP)
    return group, first, tl.minimum(GROUP, count - first), n_groups, tl.where(n_groups > 1, n_groups, 0)


@triton.jit
def _group_rows(count, GROUP: tl.constexpr):
    """Rows the group results of a BatchNorm finalize over ``count`` partials take (:func:`_bn_forward_finalize`):
    groups of ``GROUP`` partials, then groups of ``GROUP`` groups, and so on while more than ``GROUP``
    remain. Per channel column its counters are one per group of each level, then one for the last
    arrivals: these rows + 1 (the launchers' ``_finalize_levels``)."""
    tl.static_assert(GROUP >= 2, "a finalize's groups take at least two partials")
    rows = count * 0
    while count > GROUP:
        count = tl.cdiv(count, GROUP)
        rows += count
    return rows


@triton.jit
def _group_moments(mean_ptr, m2_ptr, first, n, unit, M, offs_c, c_mask, C, BLOCK_T: tl.constexpr):
    """Mean and M2 (sum of squared deviations) of channels ``offs_c`` over the ``n <= BLOCK_T`` partials
    ``first .. first + n - 1`` (rows ``[*, C]`` of ``mean_ptr``/``m2_ptr``), partial i covering
    ``min(unit, M - i * unit)`` rows: loaded once, combined in registers (Chan's combination, so no
    sum-of-squares cancellation; a fixed order, so results are deterministic). Read through L2 (``.cg``):
    other programs wrote them in this launch. No loop: with a loop bounded by these program-dependent
    values, ptxas gave the forward conv 38 more registers."""
    offs_t = tl.arange(0, BLOCK_T)
    index = first + offs_t
    mask = (offs_t < n)[:, None] & c_mask[None, :]
    count = tl.minimum(unit, M - index * unit).to(tl.float32)[:, None]
    offs = index[:, None].to(tl.int64) * C + offs_c[None, :]
    part_mean = tl.load(mean_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    part_m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    rows = tl.minimum(n * unit, M - first * unit).to(tl.float32)
    mean = tl.sum(tl.where(mask, count * part_mean, 0.0), axis=0) / rows
    dev = part_mean - mean[None, :]
    return mean, tl.sum(tl.where(mask, part_m2 + count * dev * dev, 0.0), axis=0)


@triton.jit
def _group_sums(a_ptr, b_ptr, c_ptr, first, n, offs_c, c_mask, C, HAS_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per-channel sums of the ``n <= BLOCK_T`` partials ``first .. first + n - 1`` (rows ``[*, C]``) of two
    (``HAS_C``: three) arrays, loaded once (no loop: see :func:`_group_moments`). Read through L2."""
    offs_t = tl.arange(0, BLOCK_T)
    mask = (offs_t < n)[:, None] & c_mask[None, :]
    offs = (first + offs_t)[:, None].to(tl.int64) * C + offs_c[None, :]
    sum_a = tl.sum(tl.load(a_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    sum_b = tl.sum(tl.load(b_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    sum_c = sum_a
    if HAS_C:
        sum_c = tl.sum(tl.load(c_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    return sum_a, sum_b, sum_c


@triton.jit
def _combine_sums(a_ptr, b_ptr, c_ptr, n, offs_c, c_mask, C, HAS_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per-channel sums of all ``n`` partials (rows ``[*, C]``) of two (``HAS_C``: three) arrays, in a fixed
    order: ``[BLOCK_T, C]`` register tiles over the loop (one load while ``n <= BLOCK_T``), one cross-thread
    reduction after it. Read through L2 (``.cg``): other programs wrote them in this launch."""
    offs_t = tl.arange(0, BLOCK_T)
    sum_a = tl.zeros((BLOCK_T, offs_c.shape[0]), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_T, offs_c.shape[0]), dtype=tl.float32)
    sum_c = tl.zeros((BLOCK_T, offs_c.shape[0]), dtype=tl.float32)
    for t0 in tl.range(0, n, BLOCK_T, num_stages=1):
        mask = (t0 + offs_t < n)[:, None] & c_mask[None, :]
        offs = (t0 + offs_t)[:, None].to(tl.int64) * C + offs_c[None, :]
        sum_a += tl.load(a_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        sum_b += tl.load(b_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_C:
            sum_c += tl.load(c_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.sum(sum_a, axis=0), tl.sum(sum_b, axis=0), tl.sum(sum_c, axis=0)


@triton.jit
def _sum_partials(src_ptr, first, n, row_numel, offs_e, e_mask, BLOCK_T: tl.constexpr):
    """Sum of rows ``first .. first + n - 1`` (each ``row_numel`` fp32 values) of ``src`` at ``offs_e``, in
    row order: [BLOCK_T, BLOCK_E] register tiles, one cross-thread reduction at the end (one load while
    ``n <= BLOCK_T``). Read through L2: other programs wrote them in this launch."""
    offs_t = tl.arange(0, BLOCK_T)
    total = tl.zeros((BLOCK_T, offs_e.shape[0]), dtype=tl.float32)
    for t0 in tl.range(0, n, BLOCK_T, num_stages=1):
        ptrs = src_ptr + (first + t0 + offs_t)[:, None].to(tl.int64) * row_numel + offs_e[None, :]
        total += tl.load(ptrs, mask=(t0 + offs_t < n)[:, None] & e_mask[None, :], other=0.0, cache_modifier=".cg")
    return tl.sum(total, axis=0)


@triton.jit
def _store_row(ptr, row, values, offs_c, c_mask, C):
    """``values`` into row ``row`` of packed per-channel rows ``[*, C]``."""
    tl.store(ptr + row.to(tl.int64) * C + offs_c, values, mask=c_mask)


@triton.jit
def _bn_forward_stats(mean, m2, weight, bias, running_mean, running_var, stats_ptr, running_mean_ptr,
                      running_var_ptr, offs_c, c_mask, M, C, factor, eps, TRACK: tl.constexpr):
    """From a batch's per-channel mean and M2 over ``M`` rows (and the BatchNorm's weight, bias and running
    statistics, loaded by the caller): packed stats [4, C] = (weight * invstd, bias - mean * scale, mean,
    invstd), and nn.BatchNorm2d's running-statistics update with ``factor`` (momentum, or 1 /
    num_batches_tracked) and the unbiased variance."""
    m_f = tl.cast(M, tl.float32)
    var = m2 / m_f
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    scale = weight * invstd
    tl.store(stats_ptr + offs_c, scale, mask=c_mask)
    tl.store(stats_ptr + C + offs_c, bias - mean * scale, mask=c_mask)
    tl.store(stats_ptr + 2 * C + offs_c, mean, mask=c_mask)
    tl.store(stats_ptr + 3 * C + offs_c, invstd, mask=c_mask)
    if TRACK:
        stat_ty = running_mean_ptr.dtype.element_ty
        unbiased = var * (m_f / (m_f - 1.0))
        tl.store(running_mean_ptr + offs_c, to_storage((1.0 - factor) * running_mean + factor * mean, stat_ty),
                 mask=c_mask)
        tl.store(running_var_ptr + offs_c, to_storage((1.0 - factor) * running_var + factor * unbiased, stat_ty),
                 mask=c_mask)


@triton.jit(noinline=True)
def _bn_forward_finalize(part_ptr, counter_ptr, stats_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
                         num_batches_ptr, tile, col, n_cols, n_tiles, M, C, momentum, eps,
                         TILE_M: tl.constexpr, TRACK: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """BatchNorm's forward finalize after row tile ``tile`` of channel column ``col`` stored its partial.

    ``part`` holds [2, n_tiles, C] per-tile (mean, M2), then, while more than ``BLOCK_T`` partials remain,
    [2, n_groups, C] per group of ``BLOCK_T`` of them, level after level (:func:`_group_rows`); ``counter``
    holds per column a slot per group of each level and one for the last level's arrivals, then one
    that the columns' finalizers arrive at after reading num_batches_tracked, so that the last of them
    advances it (momentum=None averages with its old value). Serial work after the last tile: per level
    an arrival and one load (its group), then an arrival and one load of the last level's at most
    ``BLOCK_T`` partials, the BatchNorm's own rows loaded with it; then num_batches_tracked's arrival.
    ResNet-18's first-stage conv at batch 512 (8192 tiles, groups of 16): three levels (512, 32, 2
    groups), then the 2; with two levels the last program walked the 512 groups in 64 loads.
    Not inlined: inlined, ptxas gave the whole forward conv up to 38 more registers.
    """
    offs_c = col * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    extra = _group_rows(n_tiles, BLOCK_T)
    counters = counter_ptr + col * (extra + 1)
    src_mean = part_ptr
    src_m2 = part_ptr + n_tiles.to(tl.int64) * C
    dst = part_ptr + 2 * n_tiles.to(tl.int64) * C
    count = n_tiles
    unit = TILE_M
    index = tile
    group = index // BLOCK_T
    last = _arrived_last(counters + group, tl.minimum(BLOCK_T, count - group * BLOCK_T))
    while last & (count > BLOCK_T):
        # The last of its group: the group's moments become a partial of the next level.
        n_groups = tl.cdiv(count, BLOCK_T)
        first = group * BLOCK_T
        mean, m2 = _group_moments(src_mean, src_m2, first, tl.minimum(BLOCK_T, count - first), unit, M, offs_c,
                                  c_mask, C, BLOCK_T)
        _store_row(dst, group, mean, offs_c, c_mask, C)
        _store_row(dst, n_groups + group, m2, offs_c, c_mask, C)
        src_mean = dst
        src_m2 = dst + n_groups.to(tl.int64) * C
        dst += 2 * n_groups.to(tl.int64) * C
        counters += n_groups
        count = n_groups
        unit = unit * BLOCK_T
        index = group
        group = index // BLOCK_T
        last = _arrived_last(counters + group, tl.minimum(BLOCK_T, count - group * BLOCK_T))
    if last:
        # Loaded before the partials, so that all of the finalize's loads are in flight at once.
        weight = tl.load(weight_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        running_mean = tl.zeros(offs_c.shape, dtype=tl.float32)
        running_var = tl.zeros(offs_c.shape, dtype=tl.float32)
        factor = momentum
        if TRACK:
            num_batches = tl.load(num_batches_ptr, cache_modifier=".cg")
            running_mean = tl.load(running_mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            running_var = tl.load(running_var_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            if CUMULATIVE:
                factor = 1.0 / (num_batches + 1).to(tl.float32)
        mean, m2 = _group_moments(src_mean, src_m2, 0, count, unit, M, offs_c, c_mask, C, BLOCK_T)
        _bn_forward_stats(mean, m2, weight, bias, running_mean, running_var, stats_ptr, running_mean_ptr,
                          running_var_ptr, offs_c, c_mask, M, C, factor, eps, TRACK)
        if TRACK:
            if _arrived_last(counter_ptr + n_cols * (extra + 1), n_cols):
                tl.store(num_batches_ptr, num_batches + 1)


@triton.jit
def _bn_backward_coefs(sum_g, sum_gx, weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr,
                       offs_c, c_mask, M, C):
    """BatchNorm backward's per-channel constants from the batch sums of channels ``offs_c``.

    With sum_g = sum(g), sum_gx = sum(g * x_hat): dbias = sum_g,
    dweight = sum_gx, and dy = g * coef_g + y * coef_y + coef_c is
    ``weight * invstd * (g - sum_g / M - x_hat * sum_gx / M)`` written in y.
    ``coef`` is packed [3, C] as (coef_g, coef_c, coef_y), the ``PRO_BN_GRAD``
    prologue's (scale, shift, yscale); ``stats`` is the forward's packed [4, C].
    """
    grad_ty = dweight_ptr.dtype.element_ty
    tl.store(dweight_ptr + offs_c, to_storage(sum_gx, grad_ty), mask=c_mask)
    tl.store(dbias_ptr + offs_c, to_storage(sum_g, grad_ty), mask=c_mask)
    weight = tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr + 2 * C + offs_c, mask=c_mask, other=0.0)
    invstd = tl.load(stats_ptr + 3 * C + offs_c, mask=c_mask, other=0.0)
    m_f = tl.cast(M, tl.float32)
    coef_g = weight * invstd
    coef_y = -coef_g * invstd * sum_gx / m_f
    tl.store(coef_ptr + offs_c, coef_g, mask=c_mask)
    tl.store(coef_ptr + C + offs_c, -coef_g * sum_g / m_f - coef_y * mean, mask=c_mask)
    tl.store(coef_ptr + 2 * C + offs_c, coef_y, mask=c_mask)


@triton.jit
def _bn_backward_finalize(part_ptr, counter_ptr, weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr,
                          res_weight_ptr, res_stats_ptr, res_coef_ptr, res_dweight_ptr, res_dbias_ptr,
                          index, col, count, M, C, HAS_RES: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """BatchNorm backward's finalize after partial ``index`` of channel column ``col`` was stored: the last
    program to arrive turns the batch sums into the BatchNorm's coefficients and parameter gradients
    (:func:`_bn_backward_coefs`; with ``HAS_RES`` also those of the residual's BatchNorm, ``res_*``).

    ``part`` holds [2 (3 with HAS_RES), count, C] partial sums (g, g x_hat (, g x_hat of the residual)),
    then the same per group of ``BLOCK_T`` partials, level after level while more than ``BLOCK_T`` remain;
    ``counter`` as :func:`_group_rows` says. The levels of the forward's (:func:`_bn_forward_finalize`).
    """
    offs_c = col * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    counters = counter_ptr + col * (_group_rows(count, BLOCK_T) + 1)
    arrays = 3 if HAS_RES else 2
    src = part_ptr
    src_plane = count.to(tl.int64) * C
    dst = part_ptr + arrays * src_plane
    group = index // BLOCK_T
    last = _arrived_last(counters + group, tl.minimum(BLOCK_T, count - group * BLOCK_T))
    while last & (count > BLOCK_T):
        # The last of its group: the group's sums become a partial of the next level.
        n_groups = tl.cdiv(count, BLOCK_T)
        first = group * BLOCK_T
        sum_a, sum_b, sum_c = _group_sums(src, src + src_plane, src + 2 * src_plane, first,
                                          tl.minimum(BLOCK_T, count - first), offs_c, c_mask, C, HAS_RES, BLOCK_T)
        dst_plane = n_groups.to(tl.int64) * C
        _store_row(dst, group, sum_a, offs_c, c_mask, C)
        _store_row(dst + dst_plane, group, sum_b, offs_c, c_mask, C)
        if HAS_RES:
            _store_row(dst + 2 * dst_plane, group, sum_c, offs_c, c_mask, C)
        src = dst
        src_plane = dst_plane
        dst += arrays * dst_plane
        counters += n_groups
        count = n_groups
        index = group
        group = index // BLOCK_T
        last = _arrived_last(counters + group, tl.minimum(BLOCK_T, count - group * BLOCK_T))
    if last:
        sum_g, sum_gx, sum_gr = _group_sums(src, src + src_plane, src + 2 * src_plane, 0, count, offs_c, c_mask, C,
                                            HAS_RES, BLOCK_T)
        _bn_backward_coefs(sum_g, sum_gx, weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr, offs_c, c_mask, M, C)
        if HAS_RES:
            _bn_backward_coefs(sum_g, sum_gr, res_weight_ptr, res_stats_ptr, res_coef_ptr, res_dweight_ptr,
                               res_dbias_ptr, offs_c, c_mask, M, C)


@triton.jit(noinline=True)
def _bn_backward_finalize_call(part_ptr, counter_ptr, weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr, index,
                               col, count, M, C, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_bn_backward_finalize` of one BatchNorm, as a call: inlined into ``_conv_kernel``'s data gradient
    it cost up to 22 registers across the whole kernel (ptxas), as the forward's did (the elementwise tail
    inlines it: under its register cap, the call's ABI spills)."""
    _bn_backward_finalize(part_ptr, counter_ptr, weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr,
                          weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr, index, col, count, M, C, False,
                          BLOCK_T, BLOCK_N)


@triton.jit
def _accumulate_taps(acc, a_ptr, a2_ptr, pro_ptr, w_ptr, n, hb, wb, row_mask, offs_k, offs_o, o_mask,
                     HA, WA, CA, k_tiles, taps_r, taps_s, r0, s0, sa_n, sa_c, sa_h, sa_w, sw_o, sw_a, sw_r, sw_s,
                     STRIDE: tl.constexpr, TRANSPOSED: tl.constexpr, PROLOGUE: tl.constexpr, COMPUTE: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += the implicit GEMM of operand A' (``a`` through the prologue) with W over every tap and
    channel tile: step (i, j) of the tap loop is tap (r0 + i, s0 + j) reading source pixel (hb + i, wb + j);
    transposed, tap (r0 + STRIDE * i, s0 + STRIDE * j) reading (hb - i, wb - j)."""
    # Index math hoisted out of the loop: per step only scalars change (the tap's offset and bounds).
    a_base = n * sa_n + hb * sa_h + wb * sa_w
    w_base = offs_k[:, None] * sw_a + offs_o[None, :] * sw_o + r0 * sw_r + s0 * sw_s
    # One flat loop over (tap, channel tile), so that loads of the next step are pipelined across taps.
    for step in range(0, taps_r * taps_s * k_tiles):
        tap = step // k_tiles
        k0 = (step - tap * k_tiles) * BLOCK_K
        i = tap // taps_s
        j = tap - i * taps_s
        if TRANSPOSED:
            di = -i
            dj = -j
            dr = STRIDE * i
            ds = STRIDE * j
        else:
            di = i
            dj = j
            dr = i
            ds = j
        valid = row_mask & (hb >= -di) & (hb < HA - di) & (wb >= -dj) & (wb < WA - dj)
        offs_a = k0 + offs_k
        a_mask_c = offs_a < CA
        a_mask = valid[:, None] & a_mask_c[None, :]
        a_offs = (a_base + (di * sa_h + dj * sa_w))[:, None] + offs_a[None, :] * sa_c
        a = _prologue(a_ptr + a_offs, a2_ptr + a_offs, a_mask, offs_a[None, :], a_mask_c[None, :],
                      pro_ptr, CA, PROLOGUE)
        w_mask = a_mask_c[:, None] & o_mask[None, :]
        w_offs = w_base + (k0 * sw_a + dr * sw_r + ds * sw_s)
        w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
        w = _dot_operand(w.to(tl.float32), COMPUTE, UPCAST_DOT, DOT_PRECISION)
        acc = tl.dot(_dot_operand(a, COMPUTE, UPCAST_DOT, DOT_PRECISION), w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _relu_grad_epilogue(acc, ey_ptrs, mask, stats_ptr, offs_o, o_mask, CO):
    """``EPI_RELU_GRAD`` on a data-gradient tile: acc masked by relu'(BN(ey)) (the BN's packed forward
    ``stats``), and the masked tile's per-channel sums of g and g * x_hat for that BN's backward."""
    y = tl.load(ey_ptrs, mask=mask, other=0.0).to(tl.float32)
    scale = _stats_row(stats_ptr, 0, offs_o, o_mask, CO)
    shift = _stats_row(stats_ptr, 1, offs_o, o_mask, CO)
    mean = _stats_row(stats_ptr, 2, offs_o, o_mask, CO)
    invstd = _stats_row(stats_ptr, 3, offs_o, o_mask, CO)
    acc = tl.where(mask & _relu_passes(y * scale + shift), acc, 0.0)
    return acc, tl.sum(acc, axis=0), tl.sum(acc * (y - mean) * invstd, axis=0)


@triton.jit
def _conv_kernel(
    a_ptr, a2_ptr, w_ptr, out_ptr, res_ptr, ey_ptr, pro_ptr,
    bn_weight_ptr, bn_bias_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr,
    stats_ptr, coef_ptr, dweight_ptr, dbias_ptr, part_ptr, counter_ptr,
    w2_ptr, out2_ptr, b_ptr, b2_ptr, pro_b_ptr,
    bn2_weight_ptr, bn2_bias_ptr, running_mean2_ptr, running_var2_ptr, num_batches2_ptr, stats2_ptr,
    HA, WA, CA, HO, WO, CO, M,
    sa_n, sa_c, sa_h, sa_w,
    so_n, so_c, so_h, so_w,
    sr_n, sr_c, sr_h, sr_w,
    sw_o, sw_a, sw_r, sw_s,
    sb_n, sb_c, sb_h, sb_w,
    sw2_o, sw2_a, sw2_r, sw2_s,
    momentum, eps, momentum2, eps2,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr,
    PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr,
    HAS_AFFINE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    TRACK: tl.constexpr, CUMULATIVE: tl.constexpr, PAIR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """out[m, o] = sum over (r, s, a) of A'[source(m, r, s), a] * W[o, a, r, s], then the epilogue.

    A: [N, HA, WA, CA] operand (``a2``: the BN input for ``PRO_BN_GRAD``, same
    strides; ``pro``: the prologue's packed per-channel rows). out/ey:
    [N, HO, WO, CO], M = N * HO * WO rows. ``sw_o``/``sw_a`` are the weight
    strides of the output/operand channel, so the data gradient
    (``TRANSPOSED``) swaps them.

    Epilogues, each finished inside this launch by the last row tile of every
    channel column (the partials go to ``part`` [2, cdiv(M, BLOCK_M), CO]):

    * ``EPI_STATS``: BatchNorm's forward on the output: packed ``stats`` and
      the running statistics of the BN given by ``bn_*``.
    * ``EPI_RELU_GRAD``: out = acc * relu'(previous BN's pre-activation,
      recomputed from ``ey`` and that BN's ``stats``), then that BN's backward
      coefficients (``coef``) and parameter gradients.
    * ``HAS_AFFINE``: eval-mode BatchNorm folded in, its scale and shift
      computed here from the running statistics.

    Pairs (a downsampling block's conv1 and projection conv, which read the same x):

    * ``PAIR_OUTPUTS``: axis 1 is twice the output's channel tiles; the second
      half convolves A with ``w2`` (``w``'s shape and strides) into ``out2``
      through BN ``bn2_*`` (stats ``stats2``, partials and counters past the
      first half's).
    * ``PAIR_OPERANDS``: out = conv(A', W) + conv(B', W2), B (``b``, BN input
      ``b2``, prologue rows ``pro_b``) with A's shape, its strides ``sb_*``.
    """
    COMPUTE: tl.constexpr = out_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_cols = tl.num_programs(1)
    n_tiles = tl.num_programs(0)
    if PAIR == 1:
        # Pointers are selected per program: both halves run the same code.
        n_cols = tl.cdiv(CO, BLOCK_N)
        second = pid_n >= n_cols
        pid_n = pid_n - second.to(tl.int32) * n_cols
        w_ptr = tl.where(second, w2_ptr, w_ptr)  # the launcher checked that w2 has w's strides
        out_ptr = tl.where(second, out2_ptr, out_ptr)
        bn_weight_ptr = tl.where(second, bn2_weight_ptr, bn_weight_ptr)
        bn_bias_ptr = tl.where(second, bn2_bias_ptr, bn_bias_ptr)
        running_mean_ptr = tl.where(second, running_mean2_ptr, running_mean_ptr)
        running_var_ptr = tl.where(second, running_var2_ptr, running_var_ptr)
        num_batches_ptr = tl.where(second, num_batches2_ptr, num_batches_ptr)
        stats_ptr = tl.where(second, stats2_ptr, stats_ptr)
        momentum = tl.where(second, momentum2, momentum)
        eps = tl.where(second, eps2, eps)
        # Each half's partials: [2, n_tiles, CO] per tile, then [2, n_groups, CO] per group of each level
        # (_bn_forward_finalize); its counters: per column one per group of each level and one for the last
        # level's arrivals, then num_batches'.
        extra = _group_rows(n_tiles, BLOCK_T)
        part_ptr += second.to(tl.int64) * 2 * (n_tiles + extra).to(tl.int64) * CO
        counter_ptr += second.to(tl.int32) * (n_cols * (extra + 1) + 1)
    offs_o = _index(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), IDX64)
    o_mask = offs_o < CO
    offs_k = _index(tl.arange(0, BLOCK_K), IDX64)
    # The taps each row reads start at source pixel (hb, wb) (see _accumulate_taps).
    if TRANSPOSED:
        # dX[h] = sum over r of dY[(h + PAD - r) / STRIDE] W[r], where the division is exact. With
        # STRIDE > 1 the rows are split by output phase (h % STRIDE, w % STRIDE): each phase takes only the
        # taps of matching parity, so no tap is computed and masked away. Axis 0 of the grid is
        # STRIDE**2 phases x the row tiles of the largest phase.
        tiles_per_phase = tl.num_programs(0) // (STRIDE * STRIDE)
        phase = pid_m // tiles_per_phase
        ph = phase // STRIDE
        pw = phase - ph * STRIDE
        HP = (HO - ph + STRIDE - 1) // STRIDE
        WP = (WO - pw + STRIDE - 1) // STRIDE
        offs_m = _index(pid_m - phase * tiles_per_phase, IDX64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < (M // (HO * WO)) * HP * WP
        n, hp, wp = _pixel_coords(offs_m, HP, WP)
        ho = hp * STRIDE + ph
        wo = wp * STRIDE + pw
        r0 = (ph + PAD) % STRIDE
        s0 = (pw + PAD) % STRIDE
        hb = hp + (ph + PAD - r0) // STRIDE
        wb = wp + (pw + PAD - s0) // STRIDE
        taps_r = (R - r0 + STRIDE - 1) // STRIDE
        taps_s = (S - s0 + STRIDE - 1) // STRIDE
    else:
        offs_m = _index(pid_m, IDX64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < M
        n, ho, wo = _pixel_coords(offs_m, HO, WO)
        r0 = 0
        s0 = 0
        hb = ho * STRIDE - PAD
        wb = wo * STRIDE - PAD
        taps_r = R
        taps_s = S
    k_tiles = tl.cdiv(CA, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_taps(acc, a_ptr, a2_ptr, pro_ptr, w_ptr, n, hb, wb, row_mask, offs_k, offs_o, o_mask,
                           HA, WA, CA, k_tiles, taps_r, taps_s, r0, s0, sa_n, sa_c, sa_h, sa_w,
                           sw_o, sw_a, sw_r, sw_s, STRIDE, TRANSPOSED, PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION,
                           BLOCK_K)
    if PAIR == 2:
        acc = _accumulate_taps(acc, b_ptr, b2_ptr, pro_b_ptr, w2_ptr, n, hb, wb, row_mask, offs_k, offs_o, o_mask,
                               HA, WA, CA, k_tiles, taps_r, taps_s, r0, s0, sb_n, sb_c, sb_h, sb_w,
                               sw2_o, sw2_a, sw2_r, sw2_s, STRIDE, TRANSPOSED, PROLOGUE, COMPUTE, UPCAST_DOT,
                               DOT_PRECISION, BLOCK_K)

    mask = row_mask[:, None] & o_mask[None, :]
    out_offs = (n * so_n + ho * so_h + wo * so_w)[:, None] + offs_o[None, :] * so_c
    if HAS_AFFINE:
        running_var = tl.load(running_var_ptr + offs_o, mask=o_mask, other=1.0).to(tl.float32)
        scale = tl.load(bn_weight_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32) / tl.sqrt_rn(running_var + eps)
        shift = tl.load(bn_bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32) \
            - tl.load(running_mean_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32) * scale
        acc = acc * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        res_offs = (n * sr_n + ho * sr_h + wo * sr_w)[:, None] + offs_o[None, :] * sr_c
        acc += tl.load(res_ptr + res_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = _relu(acc)
    part0_ptr = part_ptr + pid_m.to(tl.int64) * CO + offs_o
    part1_ptr = part0_ptr + n_tiles.to(tl.int64) * CO
    if EPILOGUE == 1:
        count = tl.sum(row_mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(mask, acc, 0.0), axis=0) / count
        dev = tl.where(mask, acc - tile_mean[None, :], 0.0)
        tl.store(part0_ptr, tile_mean, mask=o_mask)
        tl.store(part1_ptr, tl.sum(dev * dev, axis=0), mask=o_mask)
    elif EPILOGUE == 2:
        acc, sum_g, sum_gx = _relu_grad_epilogue(acc, ey_ptr + out_offs, mask, stats_ptr, offs_o, o_mask, CO)
        tl.store(part0_ptr, sum_g, mask=o_mask)
        tl.store(part1_ptr, sum_gx, mask=o_mask)
    tl.store(out_ptr + out_offs, to_storage(acc, COMPUTE), mask=mask)
    if EPILOGUE == 1:
        _bn_forward_finalize(part_ptr, counter_ptr, stats_ptr, bn_weight_ptr, bn_bias_ptr, running_mean_ptr,
                             running_var_ptr, num_batches_ptr, pid_m, pid_n, n_cols, n_tiles, M, CO,
                             momentum, eps, BLOCK_M, TRACK, CUMULATIVE, BLOCK_T, BLOCK_N)
    elif EPILOGUE == 2:
        _bn_backward_finalize_call(part_ptr, counter_ptr, bn_weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr,
                                   pid_m, pid_n, n_tiles, M, CO, BLOCK_T, BLOCK_N)


@triton.jit
def _conv_wgrad_kernel(
    dy_ptr, dy2_ptr, x_ptr, grad_ptr, part_ptr, counter_ptr, dy_pro_ptr, x_pro_ptr,
    H, W, C, P, Q, K, M, ROWS_PER_SPLIT,
    sd_n, sd_c, sd_h, sd_w,
    sx_n, sx_c, sx_h, sx_w,
    sg_k, sg_c, sg_r, sg_s,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    DY_PROLOGUE: tl.constexpr, X_PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT: tl.constexpr, IDX64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dW[k, c, r, s] = sum over pixels of dY'[pix, k] * X'[source(pix, r, s), c], split over the pixels.

    dY (``dy2``: the BN input for ``PRO_BN_GRAD``, same strides): [N, P, Q, K],
    M = N * P * Q rows; X: [N, H, W, C]. Program axis 0 walks (r, s, k tile,
    c tile), axis 1 the splits of the rows. Without ``SPLIT`` (one split) the tile goes
    straight to ``grad`` (in the weight's own strides ``sg_*``, so autograd
    never copies it into the parameter's memory format); with more, each
    split writes its fp32 slice of ``part`` [splits, R, S, K, C] and they are
    summed pairwise up a binary tree (deterministic; see the end).
    """
    COMPUTE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n_k_tiles = tl.cdiv(K, BLOCK_K)
    n_c_tiles = tl.cdiv(C, BLOCK_C)
    rs = pid // (n_k_tiles * n_c_tiles)
    tile = pid - rs * (n_k_tiles * n_c_tiles)
    r = rs // S
    s = rs - r * S
    offs_k = _index((tile // n_c_tiles) * BLOCK_K + tl.arange(0, BLOCK_K), IDX64)
    offs_c = _index((tile % n_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    k_mask = offs_k < K
    c_mask = offs_c < C
    offs_p = tl.arange(0, BLOCK_P)

    # Hoisted: the channel offsets of both operands and the tap's offset in X.
    dy_cols = offs_k[:, None] * sd_c
    x_cols = offs_c[None, :] * sx_c
    tap_offs = (r - PAD) * sx_h + (s - PAD) * sx_w

    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    start = _index(split, IDX64) * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + offs_p
        row_mask = rows < end
        n, ho, wo = _pixel_coords(rows, P, Q)
        dy_offs = dy_cols + (n * sd_n + ho * sd_h + wo * sd_w)[None, :]
        dy_mask = k_mask[:, None] & row_mask[None, :]
        dy = _prologue(dy_ptr + dy_offs, dy2_ptr + dy_offs, dy_mask, offs_k[:, None], k_mask[:, None],
                       dy_pro_ptr, K, DY_PROLOGUE)
        hb = ho * STRIDE
        wb = wo * STRIDE
        valid = row_mask & (hb >= PAD - r) & (hb < H + PAD - r) & (wb >= PAD - s) & (wb < W + PAD - s)
        x_mask = valid[:, None] & c_mask[None, :]
        x_offs = (n * sx_n + hb * sx_h + wb * sx_w + tap_offs)[:, None] + x_cols
        x = _prologue(x_ptr + x_offs, x_ptr, x_mask, offs_c[None, :], c_mask[None, :], x_pro_ptr, C, X_PROLOGUE)
        acc = tl.dot(_dot_operand(dy, COMPUTE, UPCAST_DOT, DOT_PRECISION),
                     _dot_operand(x, COMPUTE, UPCAST_DOT, DOT_PRECISION), acc,
                     input_precision=DOT_PRECISION)

    grad_ty = grad_ptr.dtype.element_ty
    if not SPLIT:
        grad_offs = offs_k[:, None] * sg_k + offs_c[None, :] * sg_c + r * sg_r + s * sg_s
        tl.store(grad_ptr + grad_offs, to_storage(acc, grad_ty), mask=k_mask[:, None] & c_mask[None, :])
    else:
        # ``part`` holds one fp32 [R, S, K, C] slice per split, dense (every element is some tile's): the
        # tile's [BLOCK_K, BLOCK_C] block of it is addressed by a flat range (int32 offsets within the
        # split's slice; v4 accesses where C is a multiple of 16), masked to the rows and columns within K
        # and C. The splits are summed pairwise up a binary tree: at each level the later of two siblings to
        # arrive adds their two sums (left + right, whichever arrived later: deterministic) into the pair's
        # first slice, or at the root into grad; a node without a sibling goes up as it is. The last program
        # walks log2(splits) arrivals and loads, where it used to load every split's slice in turn (132 on a
        # 1x1 conv's two tiles). Counters: per tile one per pair, at the index of the pair's second split.
        kcrs = K * C * R * S
        k0 = (tile // n_c_tiles) * BLOCK_K
        c0 = (tile % n_c_tiles) * BLOCK_C
        block = part_ptr + ((r * S + s) * K * C + k0 * C + c0)
        tl.store(block + split.to(tl.int64) * kcrs
                 + (tl.arange(0, BLOCK_K)[:, None] * C + tl.arange(0, BLOCK_C)[None, :]),
                 acc, mask=k_mask[:, None] & c_mask[None, :])
        flat = tl.arange(0, BLOCK_K * BLOCK_C)
        kk = flat // BLOCK_C
        cc = flat % BLOCK_C
        within = kk * C + cc
        valid = (k0 + kk < K) & (c0 + cc < C)
        node = split
        span = 1
        alive = split >= 0
        while alive & (span < n_splits):
            left = block + ((node - (node & 1)) * span).to(tl.int64) * kcrs + within
            right = (node | 1) * span
            if right < n_splits:
                alive = _arrived_last(counter_ptr + pid.to(tl.int64) * n_splits + right, 2)
                if alive:
                    total = tl.load(left, mask=valid, other=0.0, cache_modifier=".cg") + tl.load(
                        block + right.to(tl.int64) * kcrs + within, mask=valid, other=0.0, cache_modifier=".cg")
                    if 2 * span < n_splits:
                        tl.store(left, total, mask=valid)
                    else:
                        grad_offs = (_index(k0 + kk, IDX64) * sg_k + _index(c0 + cc, IDX64) * sg_c
                                     + r * sg_r + s * sg_s)
                        tl.store(grad_ptr + grad_offs, to_storage(total, grad_ty), mask=valid)
            node = node // 2
            span = span * 2


@triton.jit
def _wgrad_tap(acc, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
               DR: tl.constexpr, DS: tl.constexpr, X_PROLOGUE: tl.constexpr, COMPUTE: tl.constexpr,
               UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += dY'^T X'(tap): tap (DR, DS) of a 3x3, padding-1, stride-1 conv's weight gradient over one row
    tile (``dy_t``: the tile's dY' as [K, rows]; row m reads X' at (h + DR - 1, w + DS - 1), ``x_ptrs``
    addressing (h, w); ``x_scale``/``x_shift``: [1, BLOCK_N] rows of X's BatchNorm for ``PRO_BN_RELU``)."""
    hh = h + (DR - 1)
    ww = w + (DS - 1)
    mask = (row_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[:, None] & c_mask[None, :]
    x = tl.load(x_ptrs + ((DR - 1) * sx_h + (DS - 1) * sx_w), mask=mask, other=0.0).to(tl.float32)
    if X_PROLOGUE == 1:
        x = tl.where(mask, _relu(x * x_scale + x_shift), 0.0)
    return tl.dot(dy_t, _dot_operand(x, COMPUTE, UPCAST_DOT, DOT_PRECISION), acc, input_precision=DOT_PRECISION)


@triton.jit
def _conv_grads_kernel(
    dy_ptr, dy2_ptr, dy_pro_ptr, w_ptr, x_ptr, x_pro_ptr, out_ptr, grad_ptr, res_ptr, ey_ptr,
    bn_weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr, part_ptr, counter_ptr,
    H, W, C, K, M,
    sd_n, sd_c, sd_h, sd_w,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    sw_k, sw_c, sw_r, sw_s,
    sg_k, sg_c, sg_r, sg_s,
    X_PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Both gradients of a 3x3, padding-1, stride-1 conv in one pass over dY: dX (as ``_conv_kernel``'s
    transposed launch, with its ``EPI_RELU_GRAD`` or residual epilogue) and dW (as ``_conv_wgrad_kernel``).

    dY' (dY through the ``PRO_BN_GRAD`` prologue: ``dy2`` the BN input, ``dy_pro`` its backward
    coefficients) is [N, H, W, K], X' (X through ``X_PROLOGUE``) and dX are [N, H, W, C]: the same
    pixels, so a row tile of pixels is both a tile of dX and a slice of the weight gradient's sum. K fits
    one tile (``BLOCK_KW``); axis 1 is C's tiles of ``BLOCK_N``.

    Programs are persistent: program p takes row tiles p, p + P, ... and keeps its partial dW (nine
    [K, BLOCK_N] taps) and BatchNorm sums in registers, so partials cost P x 9 x K x C floats rather than
    one set per row tile. ``part`` holds [2, P, C] BN sums (``EPI_RELU_GRAD``), then per column [P, 9, K,
    BLOCK_N] dW; the last program of a column sums them in program order (deterministic) and writes dW
    in the weight's own strides ``sg_*`` and the BN's backward coefficients.
    """
    COMPUTE: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    col = tl.program_id(1)
    n_tiles = tl.cdiv(M, BLOCK_M)
    offs_c = _index(col * BLOCK_N + tl.arange(0, BLOCK_N), IDX64)
    c_mask = offs_c < C
    offs_k = _index(tl.arange(0, BLOCK_K), IDX64)
    offs_kw = _index(tl.arange(0, BLOCK_KW), IDX64)
    kw_mask = offs_kw < K
    k_tiles = tl.cdiv(K, BLOCK_K)
    dw00 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw01 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw02 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw10 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw11 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw12 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw20 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw21 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    dw22 = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # X's BatchNorm rows, loaded once: nine taps reloading them per tile would hold nine copies.
    x_scale = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    x_shift = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    if X_PROLOGUE == 1:
        x_scale = _stats_row(x_pro_ptr, 0, offs_c, c_mask, C)
        x_shift = _stats_row(x_pro_ptr, 1, offs_c, c_mask, C)
    for tile in range(pid, n_tiles, n_programs):
        offs_m = tile * BLOCK_M + _index(tl.arange(0, BLOCK_M), IDX64)  # pixel counts fit 32 bits
        row_mask = offs_m < M
        n, h, w = _pixel_coords(offs_m, H, W)
        # dX: dY' at (h + 1 - r, w + 1 - s) against W[:, :, r, s] (the stride-1 transposed conv).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _accumulate_taps(acc, dy_ptr, dy2_ptr, dy_pro_ptr, w_ptr, n, h + 1, w + 1, row_mask, offs_k, offs_c,
                               c_mask, H, W, K, k_tiles, 3, 3, 0, 0, sd_n, sd_c, sd_h, sd_w, sw_c, sw_k, sw_r, sw_s,
                               1, True, 2, COMPUTE, UPCAST_DOT, DOT_PRECISION, BLOCK_K)
        mask = row_mask[:, None] & c_mask[None, :]
        out_offs = (n * so_n + h * so_h + w * so_w)[:, None] + offs_c[None, :] * so_c
        if EPILOGUE == 2:
            acc, tile_g, tile_gx = _relu_grad_epilogue(acc, ey_ptr + out_offs, mask, stats_ptr, offs_c, c_mask, C)
            sum_g += tile_g
            sum_gx += tile_gx
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + out_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offs, to_storage(acc, COMPUTE), mask=mask)
        # dW: the tile's dY' (all K, as [K, rows]) against X' at each of the nine taps.
        dy_offs = offs_kw[:, None] * sd_c + (n * sd_n + h * sd_h + w * sd_w)[None, :]
        dy_mask = kw_mask[:, None] & row_mask[None, :]
        dy_t = _prologue(dy_ptr + dy_offs, dy2_ptr + dy_offs, dy_mask, offs_kw[:, None], kw_mask[:, None],
                         dy_pro_ptr, K, 2)
        dy_t = _dot_operand(dy_t, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        x_ptrs = x_ptr + ((n * sx_n + h * sx_h + w * sx_w)[:, None] + offs_c[None, :] * sx_c)
        dw00 = _wgrad_tap(dw00, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          0, 0, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw01 = _wgrad_tap(dw01, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          0, 1, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw02 = _wgrad_tap(dw02, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          0, 2, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw10 = _wgrad_tap(dw10, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          1, 0, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw11 = _wgrad_tap(dw11, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          1, 1, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw12 = _wgrad_tap(dw12, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          1, 2, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw20 = _wgrad_tap(dw20, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          2, 0, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw21 = _wgrad_tap(dw21, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          2, 1, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)
        dw22 = _wgrad_tap(dw22, dy_t, x_ptrs, x_scale, x_shift, h, w, row_mask, c_mask, H, W, sx_h, sx_w,
                          2, 2, X_PROLOGUE, COMPUTE, UPCAST_DOT, DOT_PRECISION)

    # This program's partials, [9, K, BLOCK_N] per program (columns past C hold zeros: stored whole). Two
    # levels, as the BatchNorm finalizes: the last of each group of BLOCK_T programs sums the group's into
    # a group partial, the last group sums those (see _group). ``part``: [2, P, C] then [2, n_groups, C] BN
    # sums (EPI_RELU_GRAD), then per column [P, E] then [n_groups, E] dW partials, E = 9 K BLOCK_N.
    tap_numel = K * BLOCK_N
    dw_numel = 9 * tap_numel
    group, first, n, n_groups, extra = _group(pid, n_programs, BLOCK_T)
    counters = counter_ptr + col * (extra + 1)
    rows = (n_programs + extra).to(tl.int64)
    column = part_ptr + col.to(tl.int64) * rows * dw_numel
    bn_plane = n_programs.to(tl.int64) * C
    if EPILOGUE == 2:
        column += 2 * rows * C
        _store_row(part_ptr, pid, sum_g, offs_c, c_mask, C)
        _store_row(part_ptr + bn_plane, pid, sum_gx, offs_c, c_mask, C)
    mine = column + pid.to(tl.int64) * dw_numel + offs_kw[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tap_mask = kw_mask[:, None]
    tl.store(mine, dw00, mask=tap_mask)
    tl.store(mine + tap_numel, dw01, mask=tap_mask)
    tl.store(mine + 2 * tap_numel, dw02, mask=tap_mask)
    tl.store(mine + 3 * tap_numel, dw10, mask=tap_mask)
    tl.store(mine + 4 * tap_numel, dw11, mask=tap_mask)
    tl.store(mine + 5 * tap_numel, dw12, mask=tap_mask)
    tl.store(mine + 6 * tap_numel, dw20, mask=tap_mask)
    tl.store(mine + 7 * tap_numel, dw21, mask=tap_mask)
    tl.store(mine + 8 * tap_numel, dw22, mask=tap_mask)
    src = column
    bn_src = part_ptr
    count = n_programs
    last = _arrived_last(counters + group, n)
    if last:
        if n_groups > 1:
            group_dw = column + n_programs.to(tl.int64) * dw_numel + group.to(tl.int64) * dw_numel
            for e0 in tl.range(0, dw_numel, BLOCK_E, num_stages=1):
                offs_e = e0 + tl.arange(0, BLOCK_E)
                e_mask = offs_e < dw_numel
                tl.store(group_dw + offs_e, _sum_partials(column, first, n, dw_numel, offs_e, e_mask, BLOCK_T),
                         mask=e_mask)
            if EPILOGUE == 2:
                sum_g, sum_gx, _ = _group_sums(part_ptr, part_ptr + bn_plane, part_ptr, first, n, offs_c, c_mask, C,
                                               False, BLOCK_T)
                bn_src = part_ptr + 2 * bn_plane
                _store_row(bn_src, group, sum_g, offs_c, c_mask, C)
                _store_row(bn_src + n_groups.to(tl.int64) * C, group, sum_gx, offs_c, c_mask, C)
            last = _arrived_last(counters + n_groups, n_groups)
            src = column + n_programs.to(tl.int64) * dw_numel
            bn_plane = n_groups.to(tl.int64) * C
            count = n_groups
    if last:
        # dW of this column in the weight's own strides, BLOCK_E values of up to BLOCK_T partials per step.
        grad_ty = grad_ptr.dtype.element_ty
        for e0 in tl.range(0, dw_numel, BLOCK_E, num_stages=1):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < dw_numel
            total = _sum_partials(src, 0, count, dw_numel, offs_e, e_mask, BLOCK_T)
            tap = offs_e // tap_numel
            k = (offs_e // BLOCK_N) % K
            c = col * BLOCK_N + offs_e % BLOCK_N
            r = tap // 3
            grad_offs = k * sg_k + c * sg_c + r * sg_r + (tap - 3 * r) * sg_s
            tl.store(grad_ptr + grad_offs, to_storage(total, grad_ty), mask=e_mask & (c < C))
        if EPILOGUE == 2:
            sum_g, sum_gx, _ = _combine_sums(bn_src, bn_src + bn_plane, bn_src, count, offs_c, c_mask, C, False,
                                             BLOCK_T)
            _bn_backward_coefs(sum_g, sum_gx, bn_weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr, offs_c,
                               c_mask, M, C)


@triton.jit
def _rows(pid_m, m0, N, H, W, c_mask, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, IDX64: tl.constexpr):
    """Pixel coordinates and mask of rows ``m0 .. m0 + SUB_M`` of row tile ``pid_m`` over N x H x W."""
    offs_m = _index(pid_m, IDX64) * BLOCK_M + m0 + tl.arange(0, SUB_M)
    n, h, w = _pixel_coords(offs_m, H, W)
    return n, h, w, (offs_m < N * H * W)[:, None] & c_mask[None, :]


@triton.jit
def _offsets(n, h, w, offs_c, s_n, s_c, s_h, s_w):
    return (n * s_n + h * s_h + w * s_w)[:, None] + offs_c[None, :] * s_c


@triton.jit
def _tail_pre_activation(y_ptr, res_ptr, n, h, w, offs_c, mask, scale, shift, res_scale, res_shift,
                         sy_n, sy_c, sy_h, sy_w, sr_n, sr_c, sr_h, sr_w, RESIDUAL: tl.constexpr):
    """The block tail's pre-activation ``y * scale + shift [+ residual]`` (fp32), with y's offsets, y and the residual
    (loaded, not added, for ``RES_AFTER_RELU``).

    ``scale``/``shift`` (``res_scale``/``res_shift`` for ``RES_BN``): [1, BLOCK_C] rows of packed BatchNorm statistics.
    """
    y_offs = _offsets(n, h, w, offs_c, sy_n, sy_c, sy_h, sy_w)
    y = tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    pre = y * scale + shift
    res = y
    if RESIDUAL != 0:
        res = tl.load(res_ptr + _offsets(n, h, w, offs_c, sr_n, sr_c, sr_h, sr_w), mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 2:
            pre += res * res_scale + res_shift
        elif RESIDUAL == 1:
            pre += res
    return y_offs, y, res, pre


@triton.jit
def _stats_row(stats_ptr, row, offs_c, c_mask, C):
    """Row ``row`` of packed per-channel vectors [rows, C], as a [1, BLOCK_C] broadcast row."""
    return tl.load(stats_ptr + row * C + offs_c, mask=c_mask, other=0.0)[None, :]


@triton.jit
def _pooled_size(H, W, POOL: tl.constexpr):
    """The tail's row grid: y's H x W, or with ``POOL`` the max-pool's output (H and W even: no remainder)."""
    if POOL == 2:
        return H // 2, W // 2
    return H, W


@triton.jit
def _window_tap(y_ptr, n, h, w, DH: tl.constexpr, DW: tl.constexpr, offs_c, mask, scale, shift,
                sy_n, sy_c, sy_h, sy_w):
    """Pooled pixel (h, w)'s window element (2h + DH, 2w + DW): its offsets in y, y, the pre-activation and
    relu(pre) rounded to y's dtype (what torch's max-pool compares: its ties are ties of stored values)."""
    offs = _offsets(n, 2 * h + DH, 2 * w + DW, offs_c, sy_n, sy_c, sy_h, sy_w)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pre = y * scale + shift
    return offs, y, pre, to_storage(_relu(pre), y_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _window_max(best, index, value, K: tl.constexpr):
    """torch's max-pool scan step: element ``K`` of the window (row-major) takes the max when it is greater
    or NaN (so the first of equal maxima is kept, the last NaN taken)."""
    takes = (value > best) | (value != value)
    return tl.where(takes, value, best), tl.where(takes, K, index)


@triton.jit
def _bn_relu_apply_kernel(
    y_ptr, res_ptr, out_ptr, stats_ptr, res_stats_ptr,
    N, H, W, C,
    sy_n, sy_c, sy_h, sy_w,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    RESIDUAL: tl.constexpr, POOL: tl.constexpr, RELU: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, SUB_M: tl.constexpr,
):
    """out = relu(y * scale + shift [+ residual]) (``RES_AFTER_RELU``: relu(y * scale + shift) + residual;
    without ``RELU``, y * scale + shift: a conv -> BatchNorm with no ReLU after it) over
    [N, H, W, C], with out's strides; ``POOL`` 2 (no
    residual): out = its 2x2 stride-2 max-pool, a program's rows being pooled pixels, so the full-size
    activation is never written.

    A program's ``BLOCK_M`` rows go ``SUB_M`` at a time, so a thread holds few values (few registers).
    """
    offs_c = _index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    c_mask = offs_c < C
    scale = _stats_row(stats_ptr, 0, offs_c, c_mask, C)
    shift = _stats_row(stats_ptr, 1, offs_c, c_mask, C)
    res_scale = scale
    res_shift = shift
    if RESIDUAL == 2:
        res_scale = _stats_row(res_stats_ptr, 0, offs_c, c_mask, C)
        res_shift = _stats_row(res_stats_ptr, 1, offs_c, c_mask, C)
    OH, OW = _pooled_size(H, W, POOL)
    for m0 in range(0, BLOCK_M, SUB_M):
        n, h, w, mask = _rows(tl.program_id(0), m0, N, OH, OW, c_mask, BLOCK_M, SUB_M, IDX64)
        if POOL == 2:
            _, _, _, best = _window_tap(y_ptr, n, h, w, 0, 0, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            _, _, _, v = _window_tap(y_ptr, n, h, w, 0, 1, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            best, _ = _window_max(best, 0, v, 1)
            _, _, _, v = _window_tap(y_ptr, n, h, w, 1, 0, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            best, _ = _window_max(best, 0, v, 2)
            _, _, _, v = _window_tap(y_ptr, n, h, w, 1, 1, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            best, _ = _window_max(best, 0, v, 3)
            tl.store(out_ptr + _offsets(n, h, w, offs_c, so_n, so_c, so_h, so_w),
                     best.to(out_ptr.dtype.element_ty), mask=mask)  # exact: the values are y's dtype already
        else:
            _, _, res, pre = _tail_pre_activation(y_ptr, res_ptr, n, h, w, offs_c, mask, scale, shift, res_scale,
                                                  res_shift, sy_n, sy_c, sy_h, sy_w, sr_n, sr_c, sr_h, sr_w, RESIDUAL)
            out = pre
            if RELU:
                out = _relu(pre)
            if RESIDUAL == 3:  # rounded as torch rounds the ReLU's output before the add
                out = to_storage(out, out_ptr.dtype.element_ty).to(tl.float32) + res
            tl.store(out_ptr + _offsets(n, h, w, offs_c, so_n, so_c, so_h, so_w),
                     to_storage(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pooled_grad(acc_g, acc_gx, g_ptr, offs, y, pre, index, K: tl.constexpr, dout, mask, mean):
    """Window element ``K``'s gradient: the pooled gradient where it was the window's max and its ReLU
    passes, else 0; stored, and added to BatchNorm's sums of g and g * (y - mean)."""
    g = tl.where(mask & (index == K) & _relu_passes(pre), dout, 0.0)
    tl.store(g_ptr + offs, to_storage(g, g_ptr.dtype.element_ty), mask=mask)
    return acc_g + g, acc_gx + g * (y - mean)


@triton.jit
def _bn_relu_backward_kernel(
    dout_ptr, y_ptr, res_ptr, g_ptr, stats_ptr, res_stats_ptr,
    bn_weight_ptr, coef_ptr, dweight_ptr, dbias_ptr,
    res_bn_weight_ptr, res_coef_ptr, res_dweight_ptr, res_dbias_ptr,
    part_ptr, counter_ptr,
    N, H, W, C,
    sd_n, sd_c, sd_h, sd_w,
    sy_n, sy_c, sy_h, sy_w,
    sr_n, sr_c, sr_h, sr_w,
    RESIDUAL: tl.constexpr, POOL: tl.constexpr, RELU: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, SUB_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Backward of ``_bn_relu_apply_kernel`` and of its BatchNorm(s) (without ``RELU``, g = dout).

    g = dout * (pre-activation > 0), recomputed from y (and the residual), is
    stored with y's strides; each row tile's sums of g and g * x_hat (and
    g * x_hat of the residual's BatchNorm for ``RES_BN``) go to ``part``
    [2 or 3, n_tiles, C], and the last row tile of each channel column turns them (two levels:
    :func:`_bn_backward_finalize`) into the BatchNorms' packed backward coefficients and parameter gradients.
    The tile's rows go ``SUB_M`` at a time, the sums accumulating per channel. ``POOL`` 2: ``dout`` is the
    max-pool's output gradient, rows are pooled pixels, and each window's max (recomputed as the forward
    chose it) takes its pixel's gradient, the other three a zero.
    """
    offs_c = _index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    c_mask = offs_c < C
    # Per-thread partial sums (each thread's own elements: no shuffles in the loop), reduced across threads
    # once after it. The per-channel rows are (re)loaded inside the loop (L1 hits): held across it they
    # would cost more registers than the data.
    acc_g = tl.zeros((SUB_M, BLOCK_C), dtype=tl.float32)
    acc_gx = tl.zeros((SUB_M, BLOCK_C), dtype=tl.float32)
    acc_gr = tl.zeros((SUB_M, BLOCK_C), dtype=tl.float32)
    OH, OW = _pooled_size(H, W, POOL)
    for m0 in range(0, BLOCK_M, SUB_M):
        n, h, w, mask = _rows(tl.program_id(0), m0, N, OH, OW, c_mask, BLOCK_M, SUB_M, IDX64)
        scale = _stats_row(stats_ptr, 0, offs_c, c_mask, C)
        shift = _stats_row(stats_ptr, 1, offs_c, c_mask, C)
        if POOL == 2:
            dout = tl.load(dout_ptr + _offsets(n, h, w, offs_c, sd_n, sd_c, sd_h, sd_w), mask=mask,
                           other=0.0).to(tl.float32)
            o0, y0, p0, best = _window_tap(y_ptr, n, h, w, 0, 0, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            o1, y1, p1, v = _window_tap(y_ptr, n, h, w, 0, 1, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            best, index = _window_max(best, tl.zeros((SUB_M, BLOCK_C), tl.int32), v, 1)
            o2, y2, p2, v = _window_tap(y_ptr, n, h, w, 1, 0, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            best, index = _window_max(best, index, v, 2)
            o3, y3, p3, v = _window_tap(y_ptr, n, h, w, 1, 1, offs_c, mask, scale, shift, sy_n, sy_c, sy_h, sy_w)
            best, index = _window_max(best, index, v, 3)
            mean = _stats_row(stats_ptr, 2, offs_c, c_mask, C)
            acc_g, acc_gx = _pooled_grad(acc_g, acc_gx, g_ptr, o0, y0, p0, index, 0, dout, mask, mean)
            acc_g, acc_gx = _pooled_grad(acc_g, acc_gx, g_ptr, o1, y1, p1, index, 1, dout, mask, mean)
            acc_g, acc_gx = _pooled_grad(acc_g, acc_gx, g_ptr, o2, y2, p2, index, 2, dout, mask, mean)
            acc_g, acc_gx = _pooled_grad(acc_g, acc_gx, g_ptr, o3, y3, p3, index, 3, dout, mask, mean)
        else:
            res_scale = scale
            res_shift = shift
            if RESIDUAL == 2:
                res_scale = _stats_row(res_stats_ptr, 0, offs_c, c_mask, C)
                res_shift = _stats_row(res_stats_ptr, 1, offs_c, c_mask, C)
            y_offs, y, res, pre = _tail_pre_activation(y_ptr, res_ptr, n, h, w, offs_c, mask, scale, shift,
                                                       res_scale, res_shift, sy_n, sy_c, sy_h, sy_w, sr_n, sr_c,
                                                       sr_h, sr_w, RESIDUAL)
            dout = tl.load(dout_ptr + _offsets(n, h, w, offs_c, sd_n, sd_c, sd_h, sd_w), mask=mask,
                           other=0.0).to(tl.float32)
            passes = mask
            if RELU:
                passes = mask & _relu_passes(pre)
            g = tl.where(passes, dout, 0.0)
            tl.store(g_ptr + y_offs, to_storage(g, g_ptr.dtype.element_ty), mask=mask)
            acc_g += g
            acc_gx += g * (y - _stats_row(stats_ptr, 2, offs_c, c_mask, C))
            if RESIDUAL == 2:
                acc_gr += g * (res - _stats_row(res_stats_ptr, 2, offs_c, c_mask, C))
    n_tiles = tl.num_programs(0)
    plane = n_tiles.to(tl.int64) * C
    part = part_ptr + tl.program_id(0).to(tl.int64) * C + offs_c
    tl.store(part, tl.sum(acc_g, axis=0), mask=c_mask)
    tl.store(part + plane, tl.sum(acc_gx, axis=0) * tl.load(stats_ptr + 3 * C + offs_c, mask=c_mask, other=0.0),
             mask=c_mask)
    if RESIDUAL == 2:
        res_invstd = tl.load(res_stats_ptr + 3 * C + offs_c, mask=c_mask, other=0.0)
        tl.store(part + 2 * plane, tl.sum(acc_gr, axis=0) * res_invstd, mask=c_mask)
    _bn_backward_finalize(part_ptr, counter_ptr, bn_weight_ptr, stats_ptr, coef_ptr, dweight_ptr, dbias_ptr,
                          res_bn_weight_ptr, res_stats_ptr, res_coef_ptr, res_dweight_ptr, res_dbias_ptr,
                          tl.program_id(0), tl.program_id(1), n_tiles, N * H * W, C, RESIDUAL == 2, BLOCK_T, BLOCK_C)


@triton.jit
def _bn_stats_kernel(
    x_ptr, part_ptr, counter_ptr, stats_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    num_batches_ptr,
    N, H, W, C,
    sx_n, sx_c, sx_h, sx_w,
    momentum, eps,
    TRACK: tl.constexpr, CUMULATIVE: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, SUB_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """BatchNorm's forward statistics of x over [N, H, W, C] (a tensor no fused conv produced: a residual
    sum), as ``_conv_kernel``'s ``EPI_STATS`` gives them: each row tile's per-channel mean and M2 (two passes
    over the tile, the second from cache: no sum-of-squares cancellation) to its slot of ``part``
    [2, n_tiles, C], combined by the last tile of each channel column (:func:`_bn_forward_finalize`) into
    packed stats [4, C] and the running statistics."""
    pid_m = tl.program_id(0)
    offs_c = _index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    c_mask = offs_c < C
    M = N * H * W
    total = tl.zeros((SUB_M, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, BLOCK_M, SUB_M):
        n, h, w, mask = _rows(pid_m, m0, N, H, W, c_mask, BLOCK_M, SUB_M, IDX64)
        total += tl.load(x_ptr + _offsets(n, h, w, offs_c, sx_n, sx_c, sx_h, sx_w), mask=mask,
                         other=0.0).to(tl.float32)
    count = tl.minimum(BLOCK_M, M - pid_m * BLOCK_M).to(tl.float32)
    tile_mean = tl.sum(total, axis=0) / count
    dev2 = tl.zeros((SUB_M, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, BLOCK_M, SUB_M):
        n, h, w, mask = _rows(pid_m, m0, N, H, W, c_mask, BLOCK_M, SUB_M, IDX64)
        v = tl.load(x_ptr + _offsets(n, h, w, offs_c, sx_n, sx_c, sx_h, sx_w), mask=mask, other=0.0).to(tl.float32)
        dev = tl.where(mask, v - tile_mean[None, :], 0.0)
        dev2 += dev * dev
    n_tiles = tl.num_programs(0)
    part = part_ptr + pid_m.to(tl.int64) * C + offs_c
    tl.store(part, tile_mean, mask=c_mask)
    tl.store(part + n_tiles.to(tl.int64) * C, tl.sum(dev2, axis=0), mask=c_mask)
    _bn_forward_finalize(part_ptr, counter_ptr, stats_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
                         num_batches_ptr, pid_m, tl.program_id(1), tl.num_programs(1), n_tiles, M, C, momentum, eps,
                         BLOCK_M, TRACK, CUMULATIVE, BLOCK_T, BLOCK_C)


@triton.jit
def _bn_grad_apply_kernel(
    g_ptr, y_ptr, res_ptr, coef_ptr, out_ptr,
    N, H, W, C,
    s_n, s_c, s_h, s_w,
    HAS_RESIDUAL: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    SUB_M: tl.constexpr,
):
    """BatchNorm's input gradient out = g * coef_g + y * coef_y + coef_c [+ residual] over [N, H, W, C], every
    tensor with the same strides (``coef``: packed [3, C] backward coefficients; the residual: a shortcut's
    gradient that joins here). For a BatchNorm no fused conv consumes: a pre-activation block's first."""
    offs_c = _index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), IDX64)
    c_mask = offs_c < C
    coef_g = _stats_row(coef_ptr, 0, offs_c, c_mask, C)
    coef_c = _stats_row(coef_ptr, 1, offs_c, c_mask, C)
    coef_y = _stats_row(coef_ptr, 2, offs_c, c_mask, C)
    for m0 in range(0, BLOCK_M, SUB_M):
        n, h, w, mask = _rows(tl.program_id(0), m0, N, H, W, c_mask, BLOCK_M, SUB_M, IDX64)
        offs = _offsets(n, h, w, offs_c, s_n, s_c, s_h, s_w)
        d = (tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef_g
             + tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef_y + coef_c)
        if HAS_RESIDUAL:
            d += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, to_storage(d, out_ptr.dtype.element_ty), mask=mask)


# Called from the kernels above; compiled as part of them.
DEVICE_FUNCTIONS = ("_accumulate_taps", "_relu_grad_epilogue", "_wgrad_tap", "_to_tf32", "_dot_operand", "_pixel_coords",
                    "_index", "_prologue", "_rows", "_offsets", "_stats_row", "_tail_pre_activation", "_pooled_size",
                    "_window_tap", "_window_max", "_pooled_grad", "_arrived_last",
                    "_relu", "_relu_passes", "_group", "_group_rows", "_group_moments", "_group_sums",
                    "_combine_sums", "_store_row",
                    "_bn_forward_stats", "_bn_forward_finalize", "_bn_backward_coefs", "_bn_backward_finalize",
                    "_bn_backward_finalize_call",
                    "_sum_partials")


# ------------------------------------------------------ ahead-of-time compile specs

# Register caps (Triton's ``maxnreg``) a kernel is built with, per target (compute capability x 10; a device
# takes the entry of the highest target at or below its own). The launchers pass the device's entry and
# tests/aot_compile.py compiles each target with its own. ``_conv_grads_kernel`` runs one program of 8 warps
# per SM, so any cap up to 255 keeps that occupancy: sm_90 168 (ptxas otherwise spends more on scheduling),
# no stack frame; sm_80, without wgmma, keeps the nine dW taps' accumulators in mma.sync registers and spilled
# 8-136 B under 168; under 255 it takes 248-255 registers and no stack frame (triton 3.9; 3.6 keeps an 8 B
# frame in two of the 14 variants).
MAXNREG = {"_conv_grads_kernel": {80: 255, 90: 168}}


def maxnreg_for(kernel: str, cc: int) -> int | None:
    """``kernel``'s register cap on compute capability ``cc`` (x 10) from :data:`MAXNREG`, or None."""
    caps = MAXNREG.get(kernel)
    if not caps:
        return None
    eligible = [target for target in caps if target <= cc]
    return caps[max(eligible)] if eligible else caps[min(caps)]


# Recorded from the launches of ResNet-20 and ResNet-18-CIFAR training and eval steps (fp32, bf16, fp16;
# BatchNorm with momentum=None and without running statistics) by tests/launch_specs.py: the same
# dtypes, constants and divisibility Triton's JIT derives on a GPU. See tests/aot_compile.py.
AOT_SPECS = {
    "_conv_kernel": "launches",
    "_conv_wgrad_kernel": "launches",
    "_conv_grads_kernel": "launches",
    "_bn_relu_apply_kernel": "launches",
    "_bn_relu_backward_kernel": "launches",
    "_bn_stats_kernel": "launches",
    "_bn_grad_apply_kernel": "launches",
}
