// Compute kernels of the wgpu training backend (see mod.rs).
//
// Every kernel shares one bind group layout: a uniform block of parameters (bound with a
// dynamic offset, one slot per dispatch) and five storage buffers. Tensors are addressed
// by element offsets into whole buffers, so one bind group serves every range of the
// same buffers. Floats travel in the uniform block as their bit patterns.
//
// 1-D kernels run 256 invocations per workgroup on an (x, y) grid of workgroups (x is at
// most 65535), so `flat_id` can exceed the element count and every kernel checks it.

struct Params {
    a: vec4<u32>,
    b: vec4<u32>,
    c: vec4<u32>,
    d: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> b1: array<f32>;
@group(0) @binding(2) var<storage, read_write> b2: array<f32>;
@group(0) @binding(3) var<storage, read_write> b3: array<f32>;
@group(0) @binding(4) var<storage, read_write> b4: array<f32>;
@group(0) @binding(5) var<storage, read_write> b5: array<f32>;

fn fl(bits: u32) -> f32 {
    return bitcast<f32>(bits);
}

fn flat_id(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * 256u;
}

fn flat_group(wid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wid.x + wid.y * groups.x;
}

// `alpha * value + beta * old`, where beta == 0 ignores `old` (even NaN), as BLAS does.
fn blend(value: f32, old: f32, alpha: f32, beta: f32) -> f32 {
    if beta == 0.0 {
        return alpha * value;
    }
    return alpha * value + beta * old;
}

// ---------------------------------------------------------------- elementwise

// a = (len, offset of x in b1, offset of src in b2 / mask / y)
@compute @workgroup_size(256)
fn relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    let v = b1[p.a.y + i];
    // `v > 0` is false for NaN and -0, matching the CPU's max(v, 0).
    b1[p.a.y + i] = select(0.0, v, v > 0.0);
}

// dy (b2) = dy * (y (b1) > 0)
@compute @workgroup_size(256)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    let y = b1[p.a.y + i];
    b2[p.a.z + i] = select(0.0, b2[p.a.z + i], y > 0.0);
}

// x (b1) *= mask (b2)
@compute @workgroup_size(256)
fn mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    b1[p.a.y + i] = b1[p.a.y + i] * b2[p.a.z + i];
}

// dst (b2) = src (b1)
@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    b2[p.a.z + i] = b1[p.a.y + i];
}

// The dropout hash, the same as `dropout_keep` in backend/mod.rs (lowbias32).
fn mix32(value: u32) -> u32 {
    var x = value;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// mask (b1) = keep_scale or 0; b = (seed low, seed high, rate bits, keep_scale bits)
@compute @workgroup_size(256)
fn dropout_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    let h = mix32(i ^ mix32(p.b.x ^ mix32(p.b.y)));
    let uniform01 = f32(h >> 8u) * (1.0 / 16777216.0);
    b1[p.a.y + i] = select(fl(p.b.w), 0.0, uniform01 < fl(p.b.z));
}

// dst (b2)[i] = bias (b1)[i % cols]; a = (len, bias offset, dst offset, cols)
@compute @workgroup_size(256)
fn fill_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    b2[p.a.z + i] = b1[p.a.y + i % p.a.w];
}

// dst (b2)[i] = bias (b1)[(i / plane) % channels]; a = (len, bias, dst, plane), b.x = channels
@compute @workgroup_size(256)
fn fill_channels(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    b2[p.a.z + i] = b1[p.a.y + (i / p.a.w) % p.b.x];
}

// dst (b2)[j] = alpha * sum_i src (b1)[i, j] + beta * dst[j]
// a = (cols, src, dst, rows), b = (alpha, beta)
@compute @workgroup_size(256)
fn sum_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let j = flat_id(gid, groups);
    let cols = p.a.x;
    if j >= cols { return; }
    var total = 0.0;
    for (var i = 0u; i < p.a.w; i++) {
        total += b1[p.a.y + i * cols + j];
    }
    b2[p.a.z + j] = blend(total, b2[p.a.z + j], fl(p.b.x), fl(p.b.y));
}

var<workgroup> partial_sums: array<f32, 256>;
var<workgroup> partial_counts: array<f32, 256>;

// Tree reduction of partial_sums (and partial_counts); every invocation must call it.
fn reduce_partials(t: u32) {
    for (var width = 128u; width > 0u; width >>= 1u) {
        workgroupBarrier();
        if t < width {
            partial_sums[t] += partial_sums[t + width];
            partial_counts[t] += partial_counts[t + width];
        }
    }
    workgroupBarrier();
}

// One workgroup per channel c: dst (b2)[c] = alpha * sum_{e,q} src (b1)[e, c, q] + beta * dst[c]
// a = (channels, src, dst, plane), b = (batch, alpha, beta)
@compute @workgroup_size(256)
fn sum_channels(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let c = flat_group(wid, groups);
    let channels = p.a.x;
    let plane = p.a.w;
    let total_len = p.b.x * plane;
    var total = 0.0;
    if c < channels {
        for (var i = t; i < total_len; i += 256u) {
            let e = i / plane;
            total += b1[p.a.y + (e * channels + c) * plane + i % plane];
        }
    }
    partial_sums[t] = total;
    partial_counts[t] = 0.0;
    reduce_partials(t);
    if t == 0u && c < channels {
        b2[p.a.z + c] = blend(partial_sums[0], b2[p.a.z + c], fl(p.b.y), fl(p.b.z));
    }
}

// ---------------------------------------------------------------- matrix products
//
// C = alpha * A B + beta * C over tiles of TILE_M x TILE_N (16 x 16 invocations, each
// computing (TILE_M / 16) x (TILE_N / 16) outputs) with K in steps of 16 through
// workgroup memory. Operands are read through addressing modes, so the same kernel runs
// dense layers and convolutions without materialising an im2col matrix (implicit GEMM).
//
// a = (m, n, k, modes), b = (A offset (b1), B offset (b2), C offset (b3), k per split),
// c = (alpha, beta, conv: in_channels, conv: out_channels),
// d = (conv: in_height | in_width << 16, kernel | stride << 16, padding, out_height | out_width << 16)
// modes: bits 0-3 A mode, 4-7 B mode, 8-11 C mode.
//  A modes: 0 row-major m x k; 1 stored k x m (transposed);
//           2 output gradient dy[e, oc, q] as [oc, (e, q)];
//           3 weights w[oc, c, ky, kx] as [c, (oc, ky, kx)] (input gradient).
//  B modes: 0 row-major k x n; 1 stored n x k (transposed);
//           2 im2col of input x as [(c, ky, kx), (e, q)] (forward);
//           3 im2col transposed, [(e, q), (c, ky, kx)] (weight gradient);
//           4 dy gathered for the input gradient, [(oc, ky, kx), (e, y, x)].
//  C modes: 0 row-major m x n; 1 conv output [e, oc, q] from (oc, (e, q));
//           2 input gradient [e, c, pixel] from (c, (e, pixel)).
// With more than one split (grid z), each split writes its K range's product to the
// partial buffer b4 ([split, m, n]) and `gemm_reduce` combines them.

const TILE_K: u32 = 16u;

var<workgroup> tile_a: array<f32, 1024>;
var<workgroup> tile_b: array<f32, 1024>;

struct Conv {
    in_c: u32,
    out_c: u32,
    in_h: u32,
    in_w: u32,
    kernel: u32,
    stride: u32,
    pad: u32,
    out_h: u32,
    out_w: u32,
}

fn conv_params() -> Conv {
    return Conv(p.c.z, p.c.w, p.d.x & 0xffffu, p.d.x >> 16u, p.d.y & 0xffffu, p.d.y >> 16u,
                p.d.z, p.d.w & 0xffffu, p.d.w >> 16u);
}

// Input pixel of im2col row (c, ky, kx) and column (e, q), or 0 in the padding.
fn im2col_value(g: Conv, row: u32, col: u32) -> f32 {
    let kk = g.kernel * g.kernel;
    let c = row / kk;
    let ky = (row % kk) / g.kernel;
    let kx = row % g.kernel;
    let plane = g.out_h * g.out_w;
    let e = col / plane;
    let q = col % plane;
    let iy = i32((q / g.out_w) * g.stride + ky) - i32(g.pad);
    let ix = i32((q % g.out_w) * g.stride + kx) - i32(g.pad);
    if iy < 0 || ix < 0 || iy >= i32(g.in_h) || ix >= i32(g.in_w) {
        return 0.0;
    }
    return b2[p.b.y + ((e * g.in_c + c) * g.in_h + u32(iy)) * g.in_w + u32(ix)];
}

fn load_a(mode: u32, i: u32, kk: u32, m: u32, k: u32, g: Conv) -> f32 {
    switch mode {
        case 0u: { return b1[p.b.x + i * k + kk]; }
        case 1u: { return b1[p.b.x + kk * m + i]; }
        case 2u: {
            let plane = g.out_h * g.out_w;
            return b1[p.b.x + ((kk / plane) * g.out_c + i) * plane + kk % plane];
        }
        default: {
            let kk2 = g.kernel * g.kernel;
            let oc = kk / kk2;
            return b1[p.b.x + (oc * g.in_c + i) * kk2 + kk % kk2];
        }
    }
}

fn load_b(mode: u32, kk: u32, j: u32, n: u32, k: u32, g: Conv) -> f32 {
    switch mode {
        case 0u: { return b2[p.b.y + kk * n + j]; }
        case 1u: { return b2[p.b.y + j * k + kk]; }
        case 2u: { return im2col_value(g, kk, j); }
        case 3u: { return im2col_value(g, j, kk); }
        default: {
            // dx[e, c, y, x] gathers dy[e, oc, oy, ox] * w[oc, c, ky, kx] over the
            // (oc, ky, kx) with y = oy * stride + ky - padding (same for x).
            let kk2 = g.kernel * g.kernel;
            let oc = kk / kk2;
            let ky = (kk % kk2) / g.kernel;
            let kx = kk % g.kernel;
            let in_plane = g.in_h * g.in_w;
            let e = j / in_plane;
            let pixel = j % in_plane;
            let ty = i32(pixel / g.in_w + g.pad) - i32(ky);
            let tx = i32(pixel % g.in_w + g.pad) - i32(kx);
            if ty < 0 || tx < 0 {
                return 0.0;
            }
            let uy = u32(ty);
            let ux = u32(tx);
            if uy % g.stride != 0u || ux % g.stride != 0u {
                return 0.0;
            }
            let oy = uy / g.stride;
            let ox = ux / g.stride;
            if oy >= g.out_h || ox >= g.out_w {
                return 0.0;
            }
            return b2[p.b.y + ((e * g.out_c + oc) * g.out_h + oy) * g.out_w + ox];
        }
    }
}

fn c_index(mode: u32, i: u32, j: u32, n: u32, g: Conv) -> u32 {
    switch mode {
        case 0u: { return p.b.z + i * n + j; }
        case 1u: {
            let plane = g.out_h * g.out_w;
            return p.b.z + ((j / plane) * g.out_c + i) * plane + j % plane;
        }
        default: {
            let in_plane = g.in_h * g.in_w;
            return p.b.z + ((j / in_plane) * g.in_c + i) * in_plane + j % in_plane;
        }
    }
}

// A B-tile column's part of the implicit-GEMM addressing, decoded once per invocation:
// with B read along n (modes 0, 2, 4) every invocation loads the same tile column at
// every step (256 is a multiple of TILE_N), so only the row part varies per element.
struct Column {
    base: u32,
    y0: i32,
    x0: i32,
}

fn decode_column(mode: u32, j: u32, g: Conv) -> Column {
    if mode == 2u {
        // Forward im2col column (e, oy, ox): the window's top-left input pixel.
        let plane = g.out_h * g.out_w;
        let q = j % plane;
        return Column(p.b.y + (j / plane) * g.in_c * g.in_h * g.in_w,
                      i32((q / g.out_w) * g.stride) - i32(g.pad),
                      i32((q % g.out_w) * g.stride) - i32(g.pad));
    }
    // Input-gradient column (e, y, x), shifted by the padding.
    let in_plane = g.in_h * g.in_w;
    let pixel = j % in_plane;
    return Column(p.b.y + (j / in_plane) * g.out_c * g.out_h * g.out_w,
                  i32(pixel / g.in_w + g.pad),
                  i32(pixel % g.in_w + g.pad));
}

// load_b for modes 2 and 4 with the column decoded (same values as load_b).
fn load_b_column(mode: u32, kk: u32, col: Column, g: Conv) -> f32 {
    let kk2 = g.kernel * g.kernel;
    let outer = kk / kk2;
    let ky = (kk % kk2) / g.kernel;
    let kx = kk % g.kernel;
    if mode == 2u {
        let iy = col.y0 + i32(ky);
        let ix = col.x0 + i32(kx);
        if iy < 0 || ix < 0 || iy >= i32(g.in_h) || ix >= i32(g.in_w) {
            return 0.0;
        }
        return b2[col.base + (outer * g.in_h + u32(iy)) * g.in_w + u32(ix)];
    }
    let ty = col.y0 - i32(ky);
    let tx = col.x0 - i32(kx);
    if ty < 0 || tx < 0 {
        return 0.0;
    }
    let uy = u32(ty);
    let ux = u32(tx);
    if uy % g.stride != 0u || ux % g.stride != 0u {
        return 0.0;
    }
    let oy = uy / g.stride;
    let ox = ux / g.stride;
    if oy >= g.out_h || ox >= g.out_w {
        return 0.0;
    }
    return b2[col.base + (outer * g.out_h + oy) * g.out_w + ox];
}

// Written for TILE_M = TILE_N = 64 (4 x 4 per invocation); the 32 x 32 variant is
// generated from this text by the host (see mod.rs).
@compute @workgroup_size(16, 16)
fn gemm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let m = p.a.x;
    let n = p.a.y;
    let k = p.a.z;
    let mode_a = p.a.w & 15u;
    let mode_b = (p.a.w >> 4u) & 15u;
    let mode_c = (p.a.w >> 8u) & 15u;
    let g = conv_params();
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    let k_begin = wid.z * p.b.w;
    let k_end = min(k, k_begin + p.b.w);
    let t = lid.y * 16u + lid.x;
    // Loads are arranged so that neighbouring invocations read neighbouring addresses:
    // along k for row-major A / transposed B, along m (n) otherwise.
    let a_along_k = mode_a == 0u;
    let b_along_k = mode_b == 1u || mode_b == 3u;
    let column_modes = mode_b == 2u || mode_b == 4u;
    var column = Column(0u, 0, 0);
    if column_modes {
        column = decode_column(mode_b, min(col0 + t % TILE_N, n - 1u), g);
    }
    var acc: array<f32, ROWS_X_COLS>;
    for (var k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        for (var r = 0u; r < TILE_M * TILE_K / 256u; r++) {
            let e = t + r * 256u;
            var i: u32;
            var kk: u32;
            if a_along_k {
                kk = e % TILE_K;
                i = e / TILE_K;
            } else {
                i = e % TILE_M;
                kk = e / TILE_M;
            }
            let gi = row0 + i;
            let gk = k0 + kk;
            var v = 0.0;
            if gi < m && gk < k_end {
                v = load_a(mode_a, gi, gk, m, k, g);
            }
            tile_a[kk * TILE_M + i] = v;
        }
        for (var r = 0u; r < TILE_N * TILE_K / 256u; r++) {
            let e = t + r * 256u;
            var j: u32;
            var kk: u32;
            if b_along_k {
                kk = e % TILE_K;
                j = e / TILE_K;
            } else {
                j = e % TILE_N;
                kk = e / TILE_N;
            }
            let gj = col0 + j;
            let gk = k0 + kk;
            var v = 0.0;
            if gj < n && gk < k_end {
                if column_modes {
                    v = load_b_column(mode_b, gk, column, g);
                } else {
                    v = load_b(mode_b, gk, gj, n, k, g);
                }
            }
            tile_b[kk * TILE_N + j] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            var av: array<f32, PER_ROW>;
            var bv: array<f32, PER_COL>;
            for (var r = 0u; r < PER_ROW; r++) {
                av[r] = tile_a[kk * TILE_M + lid.y + 16u * r];
            }
            for (var c = 0u; c < PER_COL; c++) {
                bv[c] = tile_b[kk * TILE_N + lid.x + 16u * c];
            }
            for (var r = 0u; r < PER_ROW; r++) {
                for (var c = 0u; c < PER_COL; c++) {
                    acc[r * PER_COL + c] = fma(av[r], bv[c], acc[r * PER_COL + c]);
                }
            }
        }
        workgroupBarrier();
    }
    let split = wid.z;
    let splits = (k + p.b.w - 1u) / p.b.w;
    for (var r = 0u; r < PER_ROW; r++) {
        let gi = row0 + lid.y + 16u * r;
        for (var c = 0u; c < PER_COL; c++) {
            let gj = col0 + lid.x + 16u * c;
            if gi < m && gj < n {
                if splits > 1u {
                    b4[(split * m + gi) * n + gj] = acc[r * PER_COL + c];
                } else {
                    let index = c_index(mode_c, gi, gj, n, g);
                    b3[index] = blend(acc[r * PER_COL + c], b3[index], fl(p.c.x), fl(p.c.y));
                }
            }
        }
    }
}

// Sums the split-K partials (b4, [splits, m, n]) into C (b3) with alpha and beta.
// Same parameters as `gemm`.
@compute @workgroup_size(256)
fn gemm_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_id(gid, groups);
    let m = p.a.x;
    let n = p.a.y;
    if id >= m * n { return; }
    let splits = (p.a.z + p.b.w - 1u) / p.b.w;
    var total = 0.0;
    for (var s = 0u; s < splits; s++) {
        total += b4[s * m * n + id];
    }
    let index = c_index((p.a.w >> 8u) & 15u, id / n, id % n, n, conv_params());
    b3[index] = blend(total, b3[index], fl(p.c.x), fl(p.c.y));
}

// ---------------------------------------------------------------- im2col / col2im

// cols (b2) = im2col of one example (b1); a = (len, input offset, cols offset, _),
// conv geometry in c.z (in channels), d as for gemm; batch index 0.
@compute @workgroup_size(256)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_id(gid, groups);
    if id >= p.a.x { return; }
    let g = conv_params();
    let cols = g.out_h * g.out_w;
    let row = id / cols;
    let col = id % cols;
    let kk = g.kernel * g.kernel;
    let c = row / kk;
    let ky = (row % kk) / g.kernel;
    let kx = row % g.kernel;
    let iy = i32((col / g.out_w) * g.stride + ky) - i32(g.pad);
    let ix = i32((col % g.out_w) * g.stride + kx) - i32(g.pad);
    var v = 0.0;
    if iy >= 0 && ix >= 0 && iy < i32(g.in_h) && ix < i32(g.in_w) {
        v = b1[p.a.y + (c * g.in_h + u32(iy)) * g.in_w + u32(ix)];
    }
    b2[p.a.z + id] = v;
}

// input_grad (b2) = adjoint of im2col applied to cols (b1); one invocation per pixel.
@compute @workgroup_size(256)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_id(gid, groups);
    if id >= p.a.x { return; }
    let g = conv_params();
    let in_plane = g.in_h * g.in_w;
    let c = id / in_plane;
    let y = (id % in_plane) / g.in_w;
    let x = id % g.in_w;
    let cols = g.out_h * g.out_w;
    var total = 0.0;
    for (var ky = 0u; ky < g.kernel; ky++) {
        let ty = i32(y + g.pad) - i32(ky);
        if ty < 0 || u32(ty) % g.stride != 0u { continue; }
        let oy = u32(ty) / g.stride;
        if oy >= g.out_h { continue; }
        for (var kx = 0u; kx < g.kernel; kx++) {
            let tx = i32(x + g.pad) - i32(kx);
            if tx < 0 || u32(tx) % g.stride != 0u { continue; }
            let ox = u32(tx) / g.stride;
            if ox >= g.out_w { continue; }
            let row = (c * g.kernel + ky) * g.kernel + kx;
            total += b1[p.a.y + row * cols + oy * g.out_w + ox];
        }
    }
    b2[p.a.z + id] = total;
}

// ---------------------------------------------------------------- max pooling
// a = (len, input offset (b1), output offset (b2), output gradient offset (b3)),
// b = (in_height, in_width, size, stride), c = (out_height, out_width)

fn negative_infinity() -> f32 {
    return bitcast<f32>(0xff800000u);
}

// Position (within its plane) of the first maximum of window (oy, ox), as the CPU finds it:
// a value replaces the best when strictly greater, or when it is NaN.
fn window_argmax(base: u32, oy: u32, ox: u32) -> u32 {
    let top = oy * p.b.w;
    let left = ox * p.b.w;
    var best_at = top * p.b.y + left;
    var best = negative_infinity();
    for (var y = top; y < top + p.b.z; y++) {
        for (var x = left; x < left + p.b.z; x++) {
            let at = y * p.b.y + x;
            let v = b1[base + at];
            if v > best || v != v {
                best_at = at;
                best = v;
            }
        }
    }
    return best_at;
}

@compute @workgroup_size(256)
fn max_pool(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_id(gid, groups);
    if id >= p.a.x { return; }
    let out_plane = p.c.x * p.c.y;
    let plane = id / out_plane;
    let q = id % out_plane;
    let base = p.a.y + plane * p.b.x * p.b.y;
    let at = window_argmax(base, q / p.c.y, q % p.c.y);
    b2[p.a.z + id] = b1[base + at];
}

// One invocation per input pixel: a.x is the input length; input gradient in b2.
@compute @workgroup_size(256)
fn max_pool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_id(gid, groups);
    if id >= p.a.x { return; }
    let in_plane = p.b.x * p.b.y;
    let plane = id / in_plane;
    let at = id % in_plane;
    let y = at / p.b.y;
    let x = at % p.b.y;
    let size = p.b.z;
    let stride = p.b.w;
    let base = p.a.y + plane * in_plane;
    // Windows (oy, ox) with oy * stride <= y < oy * stride + size, in row-major order
    // like the CPU's accumulation.
    var oy_first = 0u;
    if y + 1u > size { oy_first = (y + 1u - size + stride - 1u) / stride; }
    var ox_first = 0u;
    if x + 1u > size { ox_first = (x + 1u - size + stride - 1u) / stride; }
    let oy_last = min(y / stride, p.c.x - 1u);
    let ox_last = min(x / stride, p.c.y - 1u);
    var total = 0.0;
    for (var oy = oy_first; oy <= oy_last; oy++) {
        for (var ox = ox_first; ox <= ox_last; ox++) {
            if window_argmax(base, oy, ox) == at {
                total += b3[p.a.w + (plane * p.c.x + oy) * p.c.y + ox];
            }
        }
    }
    b2[p.a.z + id] = total;
}

// ---------------------------------------------------------------- loss

// One workgroup: softmax cross-entropy of `rows` rows of logits (b1) against labels (b2,
// class indices as floats); writes [loss sum, correct count] to b4 and, when b.z is 1,
// scale * (softmax - onehot) to b3.
// a = (rows, classes, logits offset, labels offset), b = (grad offset, stats offset,
// with gradient, _), c.x = scale
@compute @workgroup_size(256)
fn softmax_cross_entropy(@builtin(local_invocation_index) t: u32) {
    let rows = p.a.x;
    let classes = p.a.y;
    var loss = 0.0;
    var correct = 0.0;
    for (var row = t; row < rows; row += 256u) {
        let base = p.a.z + row * classes;
        var best = negative_infinity();
        var best_at = 0u;
        for (var j = 0u; j < classes; j++) {
            let v = b1[base + j];
            if v > best {
                best = v;
                best_at = j;
            }
        }
        var sum_exp = 0.0;
        for (var j = 0u; j < classes; j++) {
            sum_exp += exp(b1[base + j] - best);
        }
        let label = min(u32(b2[p.a.w + row]), classes - 1u);
        loss += log(sum_exp) - (b1[base + label] - best);
        if best_at == label {
            correct += 1.0;
        }
        if p.b.z == 1u {
            let scale = fl(p.c.x);
            let inverse = 1.0 / sum_exp;
            let grad_base = p.b.x + row * classes;
            for (var j = 0u; j < classes; j++) {
                var g = scale * exp(b1[base + j] - best) * inverse;
                if j == label {
                    g -= scale;
                }
                b3[grad_base + j] = g;
            }
        }
    }
    partial_sums[t] = loss;
    partial_counts[t] = correct;
    reduce_partials(t);
    if t == 0u {
        b4[p.b.y] = partial_sums[0];
        b4[p.b.y + 1u] = partial_counts[0];
    }
}

// ---------------------------------------------------------------- optimizers

// SGD: params b1, grads b2, velocity b3, anchor b4.
// a = (len, params, grads, velocity), b = (anchor, flags: 1 momentum, 2 anchor, 4 nesterov),
// c = (learning rate, momentum, weight decay, proximal mu)
@compute @workgroup_size(256)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    let flags = p.b.y;
    let lr = fl(p.c.x);
    let momentum = fl(p.c.y);
    var w = b1[p.a.y + i];
    var g = b2[p.a.z + i] + fl(p.c.z) * w;
    if (flags & 2u) != 0u {
        g += fl(p.c.w) * (w - b4[p.b.x + i]);
    }
    if (flags & 1u) != 0u {
        let v = momentum * b3[p.a.w + i] + g;
        b3[p.a.w + i] = v;
        if (flags & 4u) != 0u {
            g = g + momentum * v;
        } else {
            g = v;
        }
    }
    b1[p.a.y + i] = w - lr * g;
}

// Adam: params b1, grads b2, first moment b3, second moment b4, anchor b5.
// a = (len, params, grads, moment1), b = (moment2, anchor, has anchor, _),
// c = (lr / bias_correction1, beta1, beta2, epsilon), d = (weight decay, mu, bias_correction2_sqrt)
@compute @workgroup_size(256)
fn adam_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_id(gid, groups);
    if i >= p.a.x { return; }
    let beta1 = fl(p.c.y);
    let beta2 = fl(p.c.z);
    let w = b1[p.a.y + i];
    var g = b2[p.a.z + i] + fl(p.d.x) * w;
    if p.b.z == 1u {
        g += fl(p.d.y) * (w - b5[p.b.y + i]);
    }
    let m = beta1 * b3[p.a.w + i] + (1.0 - beta1) * g;
    let v = beta2 * b4[p.b.x + i] + (1.0 - beta2) * g * g;
    b3[p.a.w + i] = m;
    b4[p.b.x + i] = v;
    let denominator = sqrt(v) / fl(p.d.z) + fl(p.c.w);
    b1[p.a.y + i] = w - fl(p.c.x) * m / denominator;
}
