// The one-token BinaryMoS product through 4-bit tables in shared memory (design: docs/KERNELS.md, session 20).
// CUDA C compiled at first use by NVRTC (binarymos/kernels/cuda_lut.py); no headers, so the 16-bit types are
// handled as raw bits.
//
// y = ((x * s_in) @ B.T) * s_out + bias for one token x (K,), B the packed signs (N, KB = ceil(K / 8)): input
// 8g + j at bit j of byte g, bit 1 = +1. Read as little-endian 32-bit words, bit i of word c is input 32c + i, so
// nibble n of word c holds inputs 4(8c + n) .. 4(8c + n) + 3.
//
// Block (row block b, split s) takes ROWS output rows (one a thread) and inputs s*CHUNK .. +CHUNK:
//   1. Each thread loads its row's CHUNK / 8 bytes of signs, every load in flight before anything else.
//   2. Gates G: softmax of the router logits x @ router.T, fp32.
//   3. Table: for each group q of 4 inputs of the chunk, T[q][v] = sum_j (bit j of v ? +xs : -xs)[4q + j], the 16
//      signed sums of xs = x * s_in (s_in = G @ scale_in and xs rounded to 16 bits as the reference rounds them).
//   4. Lookups: acc += T[8c + n][nibble n of word c] over the row's words, 4 signs a shared-memory load. The lanes
//      of a warp read the same group at once, whose 16 entries lie in 16 banks: no bank conflicts.
//   5. The splits' partial sums added in split order, times s_out = G @ scale_out (rounded to 16 bits), plus bias.
// Two ways to do 2 and 5 across the splits:
//   lut_gemv (any GPU from sm_80): a router launch first (lut_router: the partial logits of ROUTER_CHUNK inputs a
//     block), lut_gemv as its programmatic dependent (PDL, sm_90: launched at once, griddepcontrol.wait before it
//     reads the logits); each block writes fp32 partials, and the last block of a row block to arrive (a fenced
//     atomic count, reset to 0 for the next call or graph replay) sums them.
//   lut_gemv_cluster (sm_90, CLUSTER=1): one launch. The SPLITS blocks of a row block form a thread-block cluster;
//     each computes the router logits of its chunk, and they exchange those and the rows' partial sums through
//     distributed shared memory, with no global memory round trip and no atomics.
//
// Compile-time constants (-D): ROWS, CHUNK (a multiple of 32), VEC (bytes per weight load: 16, 8 or 4), EXPERTS,
// BF16 (0: fp16, 1: bf16), HAS_BIAS, PDL (1: lut_gemv is launched as the router's programmatic dependent),
// ROUTER_THREADS, ROUTER_CHUNK (a multiple of ROUTER_THREADS), CLUSTER (1: lut_gemv_cluster), SPLITS (its cluster
// size, a power of two dividing ROWS).

typedef unsigned short u16;
typedef unsigned int u32;

#define WORDS (CHUNK / 32)  // 32-bit words of signs a row holds in a chunk
#define GROUPS (CHUNK / 4)  // table groups of 4 inputs a chunk
static_assert(CHUNK % 32 == 0 && CHUNK / 8 % VEC == 0, "CHUNK: whole words of signs, and whole loads");

__device__ __forceinline__ float to_f32(u16 h) {
#if BF16
    return __uint_as_float(((u32)h) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 to_16(float f) {  // round to nearest even
    u16 h;
#if BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

__device__ __forceinline__ float round16(float f) { return to_f32(to_16(f)); }

__device__ __forceinline__ float load16(const u16* p) {  // read-only weights and inputs
    u16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return to_f32(v);
}

__device__ __forceinline__ float load_cg(const float* p) {  // from L2: written by another block or launch
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// 1. the row's signs of this chunk: volatile, so that they are issued first, before any wait
__device__ __forceinline__ void load_signs(u32* words, const unsigned char* w, int row, int k0, int N, int KB) {
    const unsigned char* src = w + (size_t)row * KB + k0 / 8;
    #pragma unroll
    for (int i = 0; i < CHUNK / 8 / VEC; ++i) {
        const bool inside = row < N && k0 / 8 + (i + 1) * VEC <= KB;  // KB % VEC == 0: a load is all in or all out
        const unsigned char* p = src + i * VEC;
#if VEC == 16
        u32 a = 0, b = 0, c = 0, d = 0;
        if (inside)
            asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p));
        words[4 * i] = a; words[4 * i + 1] = b; words[4 * i + 2] = c; words[4 * i + 3] = d;
#elif VEC == 8
        u32 a = 0, b = 0;
        if (inside) asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
        words[2 * i] = a; words[2 * i + 1] = b;
#else
        u32 a = 0;
        if (inside) asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(a) : "l"(p));
        words[i] = a;
#endif
    }
}

__device__ __forceinline__ void softmax(float* g) {
    float top = g[0];
    #pragma unroll
    for (int e = 1; e < EXPERTS; ++e) top = fmaxf(top, g[e]);
    float total = 0.0f;
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) {
        g[e] = expf(g[e] - top);
        total += g[e];
    }
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) g[e] /= total;
}

// 3. one table group: the 16 signed sums of xs[0..3]
__device__ __forceinline__ void table_group(float* table, int q, const float* xs) {
    // v = 4 hi + lo: bits 0, 1 of v sign inputs 0, 1 (lo); bits 2, 3 inputs 2, 3 (hi)
    const float lo[4] = {-xs[0] - xs[1], xs[0] - xs[1], xs[1] - xs[0], xs[0] + xs[1]};
    const float hi[4] = {-xs[2] - xs[3], xs[2] - xs[3], xs[3] - xs[2], xs[2] + xs[3]};
    #pragma unroll
    for (int h = 0; h < 4; ++h) {
        float4 sums;
        sums.x = lo[0] + hi[h]; sums.y = lo[1] + hi[h]; sums.z = lo[2] + hi[h]; sums.w = lo[3] + hi[h];
        reinterpret_cast<float4*>(table + 16 * q)[h] = sums;
    }
}

// x and the experts' scale_in of group q (zero past K), as floats
__device__ __forceinline__ void group_inputs(const u16* x, const u16* scale_in, int q, int k0, int K, float* xv,
                                             float (*sv)[4]) {
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int k = k0 + 4 * q + j;
        const bool inside = q < GROUPS && k < K;
        xv[j] = inside ? load16(x + k) : 0.0f;
        #pragma unroll
        for (int e = 0; e < EXPERTS; ++e) sv[e][j] = inside ? load16(scale_in + (size_t)e * K + k) : 0.0f;
    }
}

// xs = x * s_in with s_in = G @ scale_in, each rounded to 16 bits as the reference rounds them
__device__ __forceinline__ void group_xs(const float* g, const float* xv, float (*sv)[4], float* xs) {
    #pragma unroll
    for (int j = 0; j < 4; ++j) {
        float s = 0.0f;
        #pragma unroll
        for (int e = 0; e < EXPERTS; ++e) s += g[e] * sv[e][j];
        xs[j] = round16(xv[j] * round16(s));
    }
}

// the table groups q = first, first + ROWS, ... of the chunk starting at k0
__device__ __forceinline__ void build_table(float* table, const u16* x, const u16* scale_in, const float* g,
                                            int first, int k0, int K) {
    for (int q = first; q < GROUPS; q += ROWS) {
        float xv[4], sv[EXPERTS][4], xs[4];
        group_inputs(x, scale_in, q, k0, K, xv, sv);
        group_xs(g, xv, sv, xs);
        table_group(table, q, xs);
    }
}

// 4. eight running sums, one per nibble position, so that the adds do not wait on each other
__device__ __forceinline__ float lookups(const float* table, const u32* words) {
    float acc[8];
    #pragma unroll
    for (int n = 0; n < 8; ++n) acc[n] = table[n * 16 + (words[0] >> (4 * n) & 15)];
    #pragma unroll
    for (int c = 1; c < WORDS; ++c) {
        #pragma unroll
        for (int n = 0; n < 8; ++n) acc[n] += table[(8 * c + n) * 16 + ((words[c] >> (4 * n)) & 15)];
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// s_out = G @ scale_out rounded to 16 bits; y = acc * s_out + bias. so: the experts' scale_out of the row
__device__ __forceinline__ void store_scaled(u16* y, const float* so, float bias, const float* g, int row, float acc) {
    float s = 0.0f;
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) s += g[e] * so[e];
    y[row] = to_16(acc * round16(s) + bias);
}

__device__ __forceinline__ void row_scales(const u16* scale_out, const u16* bias, int row, int N, float* so,
                                           float* b) {
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) so[e] = row < N ? load16(scale_out + (size_t)e * N + row) : 0.0f;
#if HAS_BIAS
    *b = row < N ? load16(bias + row) : 0.0f;
#else
    *b = 0.0f;
#endif
}

__device__ __forceinline__ void store_row(u16* y, const u16* scale_out, const u16* bias, const float* g, int row,
                                          int N, float acc) {
    float so[EXPERTS], b;
    row_scales(scale_out, bias, row, N, so, &b);
    store_scaled(y, so, b, g, row, acc);
}

extern "C" __global__ void __launch_bounds__(ROWS)
lut_gemv(const u16* __restrict__ x, const unsigned char* __restrict__ w, const float* __restrict__ logits,
         int n_partials, const u16* __restrict__ scale_in, const u16* __restrict__ scale_out,
         const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ partial, int* __restrict__ counts,
         int N, int K, int KB) {
    extern __shared__ float table[];  // GROUPS x 16 fp32
    __shared__ int arrived_last;
    const int t = threadIdx.x;
    const int row = blockIdx.x * ROWS + t;
    const int split = blockIdx.y, splits = gridDim.y;
    const int k0 = split * CHUNK;
    u32 words[WORDS];
    load_signs(words, w, row, k0, N, KB);

#if PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");  // the router launch's logits are complete after it
#endif
    float g[EXPERTS];
#if EXPERTS == 1
    g[0] = 1.0f;
#else
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) g[e] = 0.0f;
    for (int c0 = 0; c0 < n_partials; c0 += 8) {  // 8 partials' loads in flight at once, added in order
        float part[8][EXPERTS];
        #pragma unroll
        for (int c = 0; c < 8; ++c) {
            #pragma unroll
            for (int e = 0; e < EXPERTS; ++e)
                part[c][e] = c0 + c < n_partials ? load_cg(logits + (c0 + c) * EXPERTS + e) : 0.0f;
        }
        #pragma unroll
        for (int c = 0; c < 8; ++c) {
            #pragma unroll
            for (int e = 0; e < EXPERTS; ++e) g[e] += part[c][e];
        }
    }
    softmax(g);
#endif
    build_table(table, x, scale_in, g, t, k0, K);
    __syncthreads();
    const float sum = lookups(table, words);

    if (splits == 1) {
        if (row < N) store_row(y, scale_out, bias, g, row, N, sum);
        return;
    }
    if (row < N) partial[(size_t)split * N + row] = sum;
    __threadfence();
    __syncthreads();
    if (t == 0) arrived_last = atomicAdd(counts + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!arrived_last) return;
    __threadfence();
    if (row < N) {
        float total = 0.0f;
        for (int s0 = 0; s0 < splits; s0 += 8) {  // 8 loads in flight at once, added in split order
            float part[8];
            #pragma unroll
            for (int s = 0; s < 8; ++s) part[s] = s0 + s < splits ? load_cg(partial + (size_t)(s0 + s) * N + row) : 0.0f;
            #pragma unroll
            for (int s = 0; s < 8; ++s) total += part[s];
        }
        store_row(y, scale_out, bias, g, row, N, total);
    }
    if (t == 0) counts[blockIdx.x] = 0;
}

// partial router logits: logits[c * EXPERTS + e] = sum over chunk c of x[k] * router[e, k], fp32
extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
lut_router(const u16* __restrict__ x, const u16* __restrict__ router, float* __restrict__ logits, int K) {
#if PDL
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    __shared__ float warp_sums[ROUTER_THREADS / 32][EXPERTS];
    const int t = threadIdx.x;
    float part[EXPERTS];
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) part[e] = 0.0f;
    #pragma unroll
    for (int i = 0; i < ROUTER_CHUNK / ROUTER_THREADS; ++i) {
        const int k = blockIdx.x * ROUTER_CHUNK + i * ROUTER_THREADS + t;
        if (k < K) {
            const float xk = load16(x + k);
            #pragma unroll
            for (int e = 0; e < EXPERTS; ++e) part[e] += xk * load16(router + (size_t)e * K + k);
        }
    }
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) {
        float v = part[e];
        #pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (t % 32 == 0) warp_sums[t / 32][e] = v;
    }
    __syncthreads();
    if (t < EXPERTS) {
        float v = 0.0f;
        #pragma unroll
        for (int i = 0; i < ROUTER_THREADS / 32; ++i) v += warp_sums[i][t];
        logits[blockIdx.x * EXPERTS + t] = v;
    }
}

#if CLUSTER
__device__ __forceinline__ void cluster_sync() {  // every block's shared-memory writes visible cluster-wide after it
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ float load_remote(const float* p, u32 rank) {  // *p in block `rank` of the cluster
    u32 local, remote;
    float v;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(local) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote));
    return v;
}

static_assert(ROWS % SPLITS == 0 && SPLITS <= 32, "SPLITS: a power of two dividing ROWS");

extern "C" __global__ void __cluster_dims__(1, SPLITS, 1) __launch_bounds__(ROWS)
lut_gemv_cluster(const u16* __restrict__ x, const unsigned char* __restrict__ w, const u16* __restrict__ router,
                 const u16* __restrict__ scale_in, const u16* __restrict__ scale_out, const u16* __restrict__ bias,
                 u16* __restrict__ y, int N, int K, int KB) {
    extern __shared__ float table[];  // GROUPS x 16 fp32
    __shared__ float warp_logits[ROWS / 32][EXPERTS], block_logits[EXPERTS], cluster_logits[SPLITS][EXPERTS];
    __shared__ float row_sums[ROWS];
    const int t = threadIdx.x;
    const int row = blockIdx.x * ROWS + t;
    u32 rank;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    const int k0 = rank * CHUNK;
    u32 words[WORDS];
    load_signs(words, w, row, k0, N, KB);
    // what the table's first group and the output row need, loaded with the signs (the cluster barrier's fence
    // waits for every load in flight anyway)
    float xv[4], sv[EXPERTS][4], so[EXPERTS], b;
    group_inputs(x, scale_in, t, k0, K, xv, sv);
    const int local = rank * (ROWS / SPLITS) + t / SPLITS;  // the row this thread helps finish (step 5)
    const int out_row = blockIdx.x * ROWS + local;
    row_scales(scale_out, bias, out_row, N, so, &b);

    float g[EXPERTS];
#if EXPERTS == 1
    g[0] = 1.0f;
#else
    // this block's share of the logits, then every block's through distributed shared memory
    float part[EXPERTS];
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) part[e] = 0.0f;
    #pragma unroll
    for (int i = 0; i < (CHUNK + ROWS - 1) / ROWS; ++i) {
        const int k = k0 + i * ROWS + t;
        if (i * ROWS + t < CHUNK && k < K) {
            const float xk = load16(x + k);
            #pragma unroll
            for (int e = 0; e < EXPERTS; ++e) part[e] += xk * load16(router + (size_t)e * K + k);
        }
    }
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) {
        float v = part[e];
        #pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (t % 32 == 0) warp_logits[t / 32][e] = v;
    }
    __syncthreads();
    if (t < EXPERTS) {
        float v = 0.0f;
        #pragma unroll
        for (int i = 0; i < ROWS / 32; ++i) v += warp_logits[i][t];
        block_logits[t] = v;
    }
    cluster_sync();
    for (int i = t; i < SPLITS * EXPERTS; i += ROWS) cluster_logits[i / EXPERTS][i % EXPERTS] =
        load_remote(block_logits + i % EXPERTS, i / EXPERTS);
    __syncthreads();
    #pragma unroll
    for (int e = 0; e < EXPERTS; ++e) {
        g[e] = 0.0f;
        #pragma unroll
        for (int r = 0; r < SPLITS; ++r) g[e] += cluster_logits[r][e];  // the same order in every block
    }
    softmax(g);
#endif
    if (t < GROUPS) {
        float xs[4];
        group_xs(g, xv, sv, xs);
        table_group(table, t, xs);
    }
    build_table(table, x, scale_in, g, t + ROWS, k0, K);  // groups past the first of each thread, if any
    __syncthreads();
    row_sums[t] = lookups(table, words);
    cluster_sync();

    // block `rank` finishes rows rank * ROWS / SPLITS ..: thread t adds row_sums of block t % SPLITS, and SPLITS
    // neighbouring lanes sum those (a fixed shuffle tree: every call adds in the same order)
    float v = load_remote(row_sums + local, t % SPLITS);
    #pragma unroll
    for (int offset = 1; offset < SPLITS; offset <<= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (t % SPLITS == 0 && out_row < N) store_scaled(y, so, b, g, out_row, v);
    cluster_sync();  // no block leaves while another still reads its shared memory
}
#endif
