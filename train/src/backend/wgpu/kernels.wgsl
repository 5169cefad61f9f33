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

// dst (b2)[j] = alpha * sum_i src (b1)[i, j] + beta * dst[j]
// a = (cols, src, dst, rows), b = (alpha, beta, lanes)
// A workgroup covers 256 / lanes columns with `lanes` invocations each (lane l sums rows
// l, l + lanes, ...), so a short, wide batch and a long, narrow one both spread over
// many invocations.
@compute @workgroup_size(256)
fn sum_rows(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let cols = p.a.x;
    let lanes = p.b.z;
    let per_group = 256u / lanes;
    let j = flat_group(wid, groups) * per_group + t % per_group;
    var total = 0.0;
    if j < cols {
        for (var i = t / per_group; i < p.a.w; i += lanes) {
            total += b1[p.a.y + i * cols + j];
        }
    }
    total = sum_lanes(t, lanes, total);
    if t < per_group && j < cols {
        b2[p.a.z + j] = blend(total, b2[p.a.z + j], fl(p.b.x), fl(p.b.y));
    }
}

// The sum of `value` over the `lanes` invocations t % (256 / lanes) of a 256-invocation
// workgroup, returned to the first lane (t < 256 / lanes); `lanes` is a power of two
// from the uniform block, and every invocation must call this.
fn sum_lanes(t: u32, lanes: u32, value: f32) -> f32 {
    let per_group = 256u / lanes;
    partial_sums[t] = value;
    for (var width = lanes / 2u; width > 0u; width >>= 1u) {
        workgroupBarrier();
        if t / per_group < width {
            partial_sums[t] += partial_sums[t + width * per_group];
        }
    }
    workgroupBarrier();
    return partial_sums[t];
}

// Workgroup (c, part) sums part `part` (b.w values long) of channel c's batch * plane
// values of src (b1, [e, c, q]). With one part it writes dst (b2)[c] = alpha * sum +
// beta * dst[c]; with more, partials (b3)[part, c], which `sum_rows` then combines.
// a = (channels, src, dst, plane), b = (batch, alpha, beta, part length)
@compute @workgroup_size(256)
fn sum_channels(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let c = wid.x;
    let part = wid.y;
    let channels = p.a.x;
    let plane = p.a.w;
    let begin = part * p.b.w;
    let end = min(p.b.x * plane, begin + p.b.w);
    var total = 0.0;
    for (var i = begin + t; i < end; i += 256u) {
        let e = i / plane;
        total += b1[p.a.y + (e * channels + c) * plane + i % plane];
    }
    total = sum_lanes(t, 256u, total);
    if t == 0u {
        if groups.y == 1u {
            b2[p.a.z + c] = blend(total, b2[p.a.z + c], fl(p.b.y), fl(p.b.z));
        } else {
            b3[part * channels + c] = total;
        }
    }
}

// ---------------------------------------------------------------- matrix products
//
// C = alpha * A B + beta * C over tiles of TILE_M x TILE_N with K in steps of TILE_K
// through workgroup memory. The operand layouts are pipeline constants (one pipeline per
// combination, see mod.rs), so the loads compile without branches:
//  MODE_A: 0 row-major m x k; 1 stored k x m (transposed).
//  MODE_B: 0 row-major k x n; 1 stored n x k (transposed).
//  MODE_C: 0 row-major m x n; 1 convolution output [e, oc, q] from (oc, (e, q)) with
//          d.x = plane (output pixels per channel).
// a = (m, n, k, _), b = (A offset (b1), B offset (b2), C offset (b3), k per split),
// c = (alpha, beta), d.x = plane.
// With more than one split (grid z), each split writes its K range's product to the
// partial buffer b4 ([split, m, n]) and `gemm_reduce` combines them.
//
// Convolutions run through the same kernel after `im2col` (explicit, over the whole
// batch: a few memory passes are cheaper on a GPU than decoding im2col indices inside
// the product's loads) and `to_channel_major`.

override MODE_A: u32 = 0u;
override MODE_B: u32 = 0u;
override MODE_C: u32 = 0u;

// The tiles as rows of vec4 along m (n), one vec4 of padding per k row: the along-k
// stores then hit each bank at most twice.
const ROW4_A: u32 = TILE_M / 4u + 1u;
const ROW4_B: u32 = TILE_N / 4u + 1u;

var<workgroup> tile_a: array<vec4<f32>, ROW4_A * TILE_K>;
var<workgroup> tile_b: array<vec4<f32>, ROW4_B * TILE_K>;

// Element `e` of a K step's A tile as (i, kk): neighbouring invocations read neighbouring
// addresses, along k for row-major A and along m for transposed A (same for B).
fn a_coords(e: u32) -> vec2<u32> {
    if MODE_A == 0u {
        return vec2<u32>(e / TILE_K, e % TILE_K);
    }
    return vec2<u32>(e % TILE_M, e / TILE_M);
}

fn b_coords(e: u32) -> vec2<u32> {
    if MODE_B == 1u {
        return vec2<u32>(e / TILE_K, e % TILE_K);
    }
    return vec2<u32>(e % TILE_N, e / TILE_N);
}

fn load_a(e: u32, row0: u32, k0: u32, m: u32, k: u32, k_end: u32) -> f32 {
    let at = a_coords(e);
    let gi = row0 + at.x;
    let gk = k0 + at.y;
    if gi >= m || gk >= k_end {
        return 0.0;
    }
    if MODE_A == 0u {
        return b1[p.b.x + gi * k + gk];
    }
    return b1[p.b.x + gk * m + gi];
}

fn load_b(e: u32, col0: u32, k0: u32, n: u32, k: u32, k_end: u32) -> f32 {
    let at = b_coords(e);
    let gj = col0 + at.x;
    let gk = k0 + at.y;
    if gj >= n || gk >= k_end {
        return 0.0;
    }
    if MODE_B == 1u {
        return b2[p.b.y + gj * k + gk];
    }
    return b2[p.b.y + gk * n + gj];
}

fn store_a(e: u32, v: f32) {
    let at = a_coords(e);
    tile_a[at.y * ROW4_A + at.x / 4u][at.x % 4u] = v;
}

fn store_b(e: u32, v: f32) {
    let at = b_coords(e);
    tile_b[at.y * ROW4_B + at.x / 4u][at.x % 4u] = v;
}

fn c_index(i: u32, j: u32, m: u32, n: u32) -> u32 {
    if MODE_C == 0u {
        return p.b.z + i * n + j;
    }
    let plane = p.d.x;
    return p.b.z + ((j / plane) * m + i) * plane + j % plane;
}

// Writes one row of an invocation's 4 x 4 block: to C, or to split `split`'s partials.
fn store_row(gi: u32, gj0: u32, values: vec4<f32>, m: u32, n: u32, split: u32, splits: u32) {
    if gi >= m { return; }
    for (var c = 0u; c < 4u; c++) {
        let gj = gj0 + c;
        if gj < n {
            if splits > 1u {
                b4[(split * m + gi) * n + gj] = values[c];
            } else {
                let index = c_index(gi, gj, m, n);
                b3[index] = blend(values[c], b3[index], fl(p.c.x), fl(p.c.y));
            }
        }
    }
}

// SIDE x SIDE invocations, each computing a 4 x 4 block of the TILE_M x TILE_N tile
// (TILE = 4 * SIDE) in four vec4 accumulators: registers, where a private array indexed
// in loops may live in slow local memory. Each invocation loads 4 values of each operand
// per K step (TILE_K = 4 * THREADS / TILE), into registers one step ahead, so the global
// loads of the next step overlap this step's arithmetic. The host generates the 64 and
// 32 variants by defining TILE_M, TILE_N, TILE_K, SIDE and THREADS ahead of this text
// (see mod.rs).
@compute @workgroup_size(SIDE, SIDE)
fn gemm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let m = p.a.x;
    let n = p.a.y;
    let k = p.a.z;
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    let k_begin = wid.z * p.b.w;
    let k_end = min(k, k_begin + p.b.w);
    let e0 = lid.y * SIDE + lid.x;
    let e1 = e0 + THREADS;
    let e2 = e0 + 2u * THREADS;
    let e3 = e0 + 3u * THREADS;
    var acc0 = vec4<f32>();
    var acc1 = vec4<f32>();
    var acc2 = vec4<f32>();
    var acc3 = vec4<f32>();
    var next_a = vec4<f32>(load_a(e0, row0, k_begin, m, k, k_end), load_a(e1, row0, k_begin, m, k, k_end),
                           load_a(e2, row0, k_begin, m, k, k_end), load_a(e3, row0, k_begin, m, k, k_end));
    var next_b = vec4<f32>(load_b(e0, col0, k_begin, n, k, k_end), load_b(e1, col0, k_begin, n, k, k_end),
                           load_b(e2, col0, k_begin, n, k, k_end), load_b(e3, col0, k_begin, n, k, k_end));
    for (var k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        store_a(e0, next_a.x);
        store_a(e1, next_a.y);
        store_a(e2, next_a.z);
        store_a(e3, next_a.w);
        store_b(e0, next_b.x);
        store_b(e1, next_b.y);
        store_b(e2, next_b.z);
        store_b(e3, next_b.w);
        workgroupBarrier();
        let k1 = k0 + TILE_K;
        if k1 < k_end {
            next_a = vec4<f32>(load_a(e0, row0, k1, m, k, k_end), load_a(e1, row0, k1, m, k, k_end),
                               load_a(e2, row0, k1, m, k, k_end), load_a(e3, row0, k1, m, k, k_end));
            next_b = vec4<f32>(load_b(e0, col0, k1, n, k, k_end), load_b(e1, col0, k1, n, k, k_end),
                               load_b(e2, col0, k1, n, k, k_end), load_b(e3, col0, k1, n, k, k_end));
        }
        for (var kk = 0u; kk < TILE_K; kk++) {
            let a = tile_a[kk * ROW4_A + lid.y];
            let b = tile_b[kk * ROW4_B + lid.x];
            acc0 = fma(vec4<f32>(a.x), b, acc0);
            acc1 = fma(vec4<f32>(a.y), b, acc1);
            acc2 = fma(vec4<f32>(a.z), b, acc2);
            acc3 = fma(vec4<f32>(a.w), b, acc3);
        }
        workgroupBarrier();
    }
    let splits = (k + p.b.w - 1u) / p.b.w;
    let gi = row0 + lid.y * 4u;
    let gj = col0 + lid.x * 4u;
    store_row(gi, gj, acc0, m, n, wid.z, splits);
    store_row(gi + 1u, gj, acc1, m, n, wid.z, splits);
    store_row(gi + 2u, gj, acc2, m, n, wid.z, splits);
    store_row(gi + 3u, gj, acc3, m, n, wid.z, splits);
}

// Sums the split-K partials (b4, [splits, m, n]) into C (b3) with alpha and beta, each
// output summed by `lanes` (d.y) invocations as in `sum_rows`. Same parameters and
// pipeline constants as `gemm`.
@compute @workgroup_size(256)
fn gemm_reduce(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let m = p.a.x;
    let n = p.a.y;
    let lanes = p.d.y;
    let per_group = 256u / lanes;
    let id = flat_group(wid, groups) * per_group + t % per_group;
    let splits = (p.a.z + p.b.w - 1u) / p.b.w;
    var total = 0.0;
    if id < m * n {
        for (var s = t / per_group; s < splits; s += lanes) {
            total += b4[s * m * n + id];
        }
    }
    total = sum_lanes(t, lanes, total);
    if t < per_group && id < m * n {
        let index = c_index(id / n, id % n, m, n);
        b3[index] = blend(total, b3[index], fl(p.c.x), fl(p.c.y));
    }
}

// ---------------------------------------------------------------- im2col / col2im
//
// Over a batch: the im2col matrix has rows (c, ky, kx) and columns (e, q), example-major,
// so one product covers every example. Geometry:
// a = (len, input offset, cols offset, batch), c.z = in channels,
// d = (in_height | in_width << 16, kernel | stride << 16, padding, out_height | out_width << 16).

struct Conv {
    in_c: u32,
    in_h: u32,
    in_w: u32,
    kernel: u32,
    stride: u32,
    pad: u32,
    out_h: u32,
    out_w: u32,
}

fn conv_params() -> Conv {
    return Conv(p.c.z, p.d.x & 0xffffu, p.d.x >> 16u, p.d.y & 0xffffu, p.d.y >> 16u,
                p.d.z, p.d.w & 0xffffu, p.d.w >> 16u);
}

// cols (b2) = im2col of the batch's inputs (b1): grid z is the row (c, ky, kx), decoded
// once per workgroup; x and y run over the columns (e, q).
@compute @workgroup_size(256)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let col = flat_id(gid, groups);
    let g = conv_params();
    let plane = g.out_h * g.out_w;
    let columns = plane * p.a.w;
    if col >= columns { return; }
    let row = gid.z;
    let kk = g.kernel * g.kernel;
    let c = row / kk;
    let ky = (row % kk) / g.kernel;
    let kx = row % g.kernel;
    let e = col / plane;
    let q = col % plane;
    let iy = i32((q / g.out_w) * g.stride + ky) - i32(g.pad);
    let ix = i32((q % g.out_w) * g.stride + kx) - i32(g.pad);
    var v = 0.0;
    if iy >= 0 && ix >= 0 && iy < i32(g.in_h) && ix < i32(g.in_w) {
        v = b1[p.a.y + ((e * g.in_c + c) * g.in_h + u32(iy)) * g.in_w + u32(ix)];
    }
    b2[p.a.z + row * columns + col] = v;
}

// input_grad (b2) = adjoint of im2col applied to cols (b1); one invocation per input
// value of the batch.
@compute @workgroup_size(256)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_id(gid, groups);
    if id >= p.a.x { return; }
    let g = conv_params();
    let in_plane = g.in_h * g.in_w;
    let e = id / (g.in_c * in_plane);
    let c = (id / in_plane) % g.in_c;
    let y = (id % in_plane) / g.in_w;
    let x = id % g.in_w;
    let plane = g.out_h * g.out_w;
    let columns = plane * p.a.w;
    let col0 = e * plane;
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
            total += b1[p.a.y + row * columns + col0 + oy * g.out_w + ox];
        }
    }
    b2[p.a.z + id] = total;
}

// dst (b2)[ch, e, q] = src (b1)[e, ch, q]: a batch of feature maps as one matrix with a
// row per channel. a = (len, src, dst, plane), b = (channels, batch).
@compute @workgroup_size(256)
fn to_channel_major(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_id(gid, groups);
    if id >= p.a.x { return; }
    let plane = p.a.w;
    let row = plane * p.b.y;
    let ch = id / row;
    let e = (id % row) / plane;
    let q = id % plane;
    b2[p.a.z + id] = b1[p.a.y + (e * p.b.x + ch) * plane + q];
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
