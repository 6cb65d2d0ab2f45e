/* Dynamic-K activation on the CPU: the exact K largest votes W_cj x_j per (sample, class) for non-negative features,
 * their sum plus bias, and the backward pass through the selected connections only.
 *
 * Compiled on first use by models/dynk_kernel.py (plain C with GCC vector extensions and OpenMP; no torch headers)
 * and called through ctypes with the data pointers of contiguous float32 tensors.
 *
 * Forward, per sample:
 *   1. order the units by descending x_j: the non-zero ones by a two-pass radix sort on the top 16 bits of the float
 *      (for x >= 0 the bit pattern orders like the value), then the zeros. Units with equal keys stay unordered, so
 *      the bound on the units from position j on is the upper edge of the key at position j (exact, at most 2^-8
 *      above the largest of them);
 *   2. for LANES classes at a time (SIMD lanes), walk the units in that order, form the votes x_j W_cj, keep each
 *      lane's K largest and their units in registers (branch-free compare-exchange insertion), and stop once the
 *      K-th vote of every lane is >= bound * max(max_j W_cj, 0), which no later unit can beat; the last one or two
 *      unsettled lanes of a group finish in scalar code;
 *   3. units with x_j = 0 vote exactly 0: after the positive units, at most K of them are visited, and only by lanes
 *      whose K-th vote is still negative.
 * The selection is exact: ties aside, it returns the same units as the top-K of all D votes. */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8  /* 8 floats = one AVX register; measured faster than 16 (AVX-512) on AMD EPYC */
#define KMAX 64
typedef int16_t unit_t;  /* selected unit indices: half the memory traffic of int32 */
#define UNIT_MAX 32767
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf fblend(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }  /* m ? a : b */
#if defined(__AVX__)
#include <immintrin.h>
static inline unsigned mask_bits(vi m) { return (unsigned)_mm256_movemask_ps((__m256)m); }
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
#else
static inline vf vmax(vf a, vf b) { return fblend(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return fblend(a < b, a, b); }
static inline unsigned mask_bits(vi m) {
    unsigned r = 0;
    for (int i = 0; i < LANES; i++) r |= (m[i] != 0) << i;
    return r;
}
#endif
static inline vf vsplat(float a) { const vf zero = {0}; return zero + a; }  /* broadcast */
static inline vi isplat(int32_t a) { const vi zero = {0}; return zero + a; }
static inline vi iblend(vi m, vi a, vi b) { return (a & m) | (b & ~m); }
static inline int any(vi m) { return mask_bits(m) != 0; }
#define INLINE static inline __attribute__((always_inline))
/* the K values compiled with a constant K (unrolled list updates, lists in registers); others take the generic code */
#define CONSTANT_KS(CASE) CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(8) CASE(10)

/* upper edge of the key bucket of the unit at position j: no unit at position >= j has a larger x */
static inline float key_edge(uint16_t key) {
    uint32_t e = ((uint32_t)(0xFFFFu - key) + 1u) << 15; float f; memcpy(&f, &e, 4);
    return f < 3.4028235e38f ? f : 3.4028235e38f;  /* the top bucket's edge is +inf: keep inf * 0 from giving NaN */
}

/* Descending order of the units of one sample (x >= 0, finite) by the top 16 bits of x: the non-zero units first,
 * sorted by a two-pass radix sort of their keys (both histograms counted in the first pass), then the zero units.
 * Fills order[D], xs[j] = x[order[j]] and edge[j] = a bound on x at positions >= j (0 from the zeros on); returns
 * the number of non-zero units. tmp/tkey: scratch of D entries. */
static int order_units(const float *x, int D, int32_t *order, float *xs, float *edge, int32_t *tmp, uint16_t *key,
                       uint16_t *tkey) {
    int lo[256], hi[256], nz = 0, z = D;
    memset(lo, 0, sizeof lo); memset(hi, 0, sizeof hi);
    for (int d = 0; d < D; d++) {
        uint32_t bits; memcpy(&bits, x + d, 4);
        bits &= 0x7FFFFFFFu;  /* -0.0 is a zero unit too */
        const uint16_t k = (uint16_t)(0xFFFFu - (bits >> 15));
        /* branch-free: write to both ends, advance one */
        const int pos = bits != 0;
        tmp[nz] = d; tkey[nz] = k; order[z - 1] = d;
        lo[k & 0xFF] += pos; hi[k >> 8] += pos;
        nz += pos; z -= !pos;
    }
    for (int i = 0, s = 0, t = 0; i < 256; i++) { int c = lo[i]; lo[i] = s; s += c; c = hi[i]; hi[i] = t; t += c; }
    for (int p = 0; p < nz; p++) { const int q = lo[tkey[p] & 0xFF]++; order[q] = tmp[p]; key[q] = tkey[p]; }
    for (int p = 0; p < nz; p++) {  /* stable by the high byte, straight into the outputs */
        const int q = hi[key[p] >> 8]++;
        tmp[q] = order[p]; xs[q] = x[order[p]]; edge[q] = key_edge(key[p]);
    }
    memcpy(order, tmp, sizeof(int32_t) * nz);
    edge[nz] = 0.0f;  /* after the positive units come the zeros */
    return nz;
}

/* insert the vote v of unit vix into each lane's descending K-list (values t, units ti): compare-exchange down the
 * list, branch-free */
INLINE void insert(vf *t, vi *ti, int K, vf v, vi vix) {
    for (int i = 0; i < K; i++) {
        const vi m = v > t[i];
        const vf tv = t[i]; const vi tu = ti[i];
        t[i] = fblend(m, v, tv); ti[i] = iblend(m, vix, tu);
        v = fblend(m, tv, v); vix = iblend(m, tu, vix);
    }
}

/* insert vote v of unit d into one lane's descending K-list t[i * LANES], ti[i * LANES] (the lane's column of the
 * group's [K][LANES] arrays); v beats the K-th */
INLINE void lane_insert(float *t, int32_t *ti, int K, float v, int32_t d) {
    int i = K - 1;
    for (; i > 0 && v > t[(i - 1) * LANES]; i--) {
        t[i * LANES] = t[(i - 1) * LANES];
        ti[i * LANES] = ti[(i - 1) * LANES];
    }
    t[i * LANES] = v; ti[i * LANES] = d;
}

/* One lane's scan, continued in scalar code from position j (its K-list t/ti already full): a vote enters only if it
 * beats the K-th, which late in the scan is rare, so the insertion branch is cheap. */
INLINE void lane_finish(const float *wt, float wp, int D, int Cp, int K, const int32_t *order, const float *xs,
                        const float *edge, int nz, int j, float *t, int32_t *ti) {
    for (; j < nz && t[(K - 1) * LANES] < edge[j] * wp; j++) {
        const float v = xs[j] * wt[(size_t)order[j] * Cp];
        if (v > t[(K - 1) * LANES]) lane_insert(t, ti, K, v, order[j]);
    }
    if (j >= nz)  /* zero units vote 0 (or -0): they enter only below a negative K-th vote */
        for (int z = nz; z < D && z < nz + K && t[(K - 1) * LANES] < 0.0f; z++)
            lane_insert(t, ti, K, 0.0f * wt[(size_t)order[z] * Cp], order[z]);
}

/* One group of LANES classes of one sample: the K largest votes of each lane and the units that cast them. Units are
 * visited in descending x order (xs: their values, edge[j]: a bound on x at positions >= j); the K-lists live in
 * registers (K is a constant after inlining). Every STEP units the scan checks which lanes the bound has settled (no
 * later unit can enter their lists); once at most STRAGGLERS lanes are left, those finish in scalar code. */
#define STEP 8
#define STRAGGLERS 2
INLINE void group_topk(const float *wt, const float *wpos, int D, int Cp, int K, const int32_t *order,
                       const float *xs, const float *edge, int nz, float *out_top, int32_t *out_tix) {
    vf top[KMAX]; vi tix[KMAX];
    for (int i = 0; i < K; i++) { top[i] = vsplat(-INFINITY); tix[i] = isplat(0); }
    const vf wp = vload(wpos);
    unsigned open = (1u << LANES) - 1;  /* lanes not yet settled */
    int j = 0;
    for (; j < nz; ) {  /* the positive units */
        const int stop = j + STEP < nz ? j + STEP : nz;
        for (; j < stop; j++)
            insert(top, tix, K, vsplat(xs[j]) * vload(wt + (size_t)order[j] * Cp), isplat(order[j]));
        if (j < K) continue;
        /* every later unit has x < edge[j]: its vote is below edge[j] * max(max_j W_cj, 0) */
        open = mask_bits(top[K - 1] < vsplat(edge[j]) * wp);
        if (__builtin_popcount(open) <= STRAGGLERS) break;
    }
    if (j >= nz) {  /* zero units vote 0: only lanes whose K-th vote is still below 0 take some (at most K) */
        for (int z = nz; z < D && z < nz + K && any(top[K - 1] < vsplat(0.0f)); z++)
            insert(top, tix, K, vsplat(0.0f) * vload(wt + (size_t)order[z] * Cp), isplat(order[z]));
        open = 0;
    }
    for (int i = 0; i < K; i++) {  /* [K][LANES] */
        memcpy(out_top + i * LANES, &top[i], sizeof(vf));
        memcpy(out_tix + i * LANES, &tix[i], sizeof(vi));
    }
    while (open) {
        const int l = __builtin_ctz(open); open &= open - 1;
        lane_finish(wt + l, wpos[l], D, Cp, K, order, xs, edge, nz, j, out_top + l, out_tix + l);
    }
}

INLINE void sample_topk(const float *wt, const float *wpos, const float *bias, int D, int C, int Cp, int K,
                        const int32_t *order, const float *xs, const float *edge, int nz, float *out, unit_t *idx) {
    float top[KMAX * LANES] __attribute__((aligned(32))); int32_t tix[KMAX * LANES] __attribute__((aligned(32)));
    for (int g = 0; g < Cp; g += LANES) {
        group_topk(wt + g, wpos + g, D, Cp, K, order, xs, edge, nz, top, tix);
        const int lanes = C - g < LANES ? C - g : LANES;
        vf s = vload(top);  /* z = the K largest votes, summed in descending order, + bias */
        for (int i = 1; i < K; i++) s += vload(top + i * LANES);
        s += vload(bias + g);
        memcpy(out + g, &s, sizeof(float) * lanes);
        unit_t *ix = idx + (size_t)g * K;  /* the group's [lanes][K] block of unit indices */
        for (int l = 0; l < lanes; l++)
            for (int i = 0; i < K; i++) ix[l * K + i] = (unit_t)tix[i * LANES + l];
    }
}

/* x [B, D]; w [C, D]; bias [C]; wt: scratch of D * Cp floats (Cp = C rounded up to a multiple of LANES); wpos:
 * scratch of 2 * Cp floats (the bound's weights, then the bias padded to Cp). Writes out [B, C] = sum of the K
 * largest votes + bias, and idx [B, C, K] = their units.
 * Returns 0, 1 for bad sizes, 2 if x has a negative or non-finite entry (the bound needs x >= 0) or W a NaN: use
 * another path.
 * Work is shared among `threads` OpenMP threads: in a process that has imported torch this is torch's own pool (the
 * same libgomp.so.1), so the kernel does not compete with torch's spinning workers. */
int dynk_forward(const float *x, const float *w, const float *bias, float *wt, float *wpos, float *out, unit_t *idx,
                 int B, int D, int C, int Cp, int K, int threads) {
    if (K < 1 || K > KMAX || K > D || D > UNIT_MAX || Cp % LANES || Cp < C) return 1;
    int bad = 0;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        #pragma omp for schedule(static) reduction(|:bad) nowait
        for (long i = 0; i < (long)B * D; i++) {  /* negative (not -0.0), inf or NaN */
            uint32_t bits; memcpy(&bits, x + i, 4);
            bad |= (bits > 0x80000000u) | ((bits & 0x7F800000u) == 0x7F800000u);
        }
        /* W^T [D, Cp] (one unit's weights for all classes contiguous), padded with empty classes */
        #pragma omp for schedule(static)
        for (int d0 = 0; d0 < D; d0 += 16)
            for (int c = 0; c < Cp; c++)
                for (int d = d0; d < d0 + 16 && d < D; d++)
                    wt[(size_t)d * Cp + c] = c < C ? w[(size_t)c * D + d] : 0.0f;
        /* the bound's largest weight per class, max(max_j W_cj, 0) (0 for the padding), LANES classes at a time */
        #pragma omp for schedule(static) reduction(|:bad)
        for (int g = 0; g < Cp; g += LANES) {
            vf m = vsplat(0.0f);
            vi nan = isplat(0);
            for (int d = 0; d < D; d++) { const vf v = vload(wt + (size_t)d * Cp + g); nan |= v != v; m = vmax(m, v); }
            memcpy(wpos + g, &m, sizeof m);
            bad |= any(nan);  /* a NaN weight: let the caller's path propagate it */
        }
    }
    if (bad) return 2;
    float *bpad = wpos + Cp;
    for (int c = 0; c < Cp; c++) bpad[c] = c < C ? bias[c] : 0.0f;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        int32_t *order = malloc(sizeof(int32_t) * 2 * D);
        uint16_t *key = malloc(sizeof(uint16_t) * 2 * D);
        float *xs = malloc(sizeof(float) * (2 * D + 1)), *edge = xs + D;
        #pragma omp for schedule(dynamic, 4)
        for (int b = 0; b < B; b++) {
            const float *xb = x + (size_t)b * D;
            const int nz = order_units(xb, D, order, xs, edge, order + D, key, key + D);
            float *ob = out + (size_t)b * C;
            unit_t *ib = idx + (size_t)b * C * K;
            switch (K) {
#define CASE(k) case k: sample_topk(wt, wpos, bpad, D, C, Cp, k, order, xs, edge, nz, ob, ib); break;
                CONSTANT_KS(CASE)
#undef CASE
                default: sample_topk(wt, wpos, bpad, D, C, Cp, K, order, xs, edge, nz, ob, ib);
            }
        }
        free(order); free(key); free(xs);
    }
    return 0;
}

/* Backward: the gradients through the selected connections only. */
#define ACC 4
INLINE void grad_x(const float *g, const float *w, const unit_t *idx, float *gx, float *acc, int b, int D, int C,
                   int K) {
    memset(acc, 0, sizeof(float) * ACC * D);
    const unit_t *ix = idx + (size_t)b * C * K;
    const float *gb = g + (size_t)b * C;
    for (int c = 0; c < C; c++, ix += K) {
        const float gg = gb[c];
        const float *wc = w + (size_t)c * D;
        float *a = acc + (c % ACC) * D;
        for (int i = 0; i < K; i++) a[ix[i]] += gg * wc[ix[i]];
    }
    float *gxb = gx + (size_t)b * D;
    for (int d = 0; d < D; d++) gxb[d] = (acc[d] + acc[D + d]) + (acc[2 * D + d] + acc[3 * D + d]);
}

INLINE void grad_w(const float *g, const float *x, const unit_t *idx, float *gw, int b, int lo, int hi, int D,
                   int C, int K) {
    const float *xb = x + (size_t)b * D, *gb = g + (size_t)b * C;
    const unit_t *ix = idx + ((size_t)b * C + lo) * K;
    for (int c = lo; c < hi; c++, ix += K) {
        const float gg = gb[c];
        float *gwc = gw + (size_t)c * D;
        for (int i = 0; i < K; i++) gwc[ix[i]] += gg * xb[ix[i]];
    }
}

/* g [B, C], x [B, D], w [C, D], idx [B, C, K] -> gx [B, D] (if not NULL), gw [C, D] (if not NULL), overwritten.
 * Race-free without atomics: gx rows are split by sample, gw rows by class. In gx a unit chosen by many classes is
 * updated many times in a row: ACC rotating accumulator rows keep those read-modify-writes from waiting on one
 * another (summed at the end). In gw each thread walks all samples for its range of classes, so repeats of a
 * (class, unit) pair are a sample apart. */
int dynk_backward(const float *g, const float *x, const float *w, const unit_t *idx, float *gx, float *gw,
                  int B, int D, int C, int K, int threads) {
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        if (gx) {
            float *acc = malloc(sizeof(float) * ACC * D);
            #pragma omp for schedule(static) nowait
            for (int b = 0; b < B; b++)
                switch (K) {
#define CASE(k) case k: grad_x(g, w, idx, gx, acc, b, D, C, k); break;
                    CONSTANT_KS(CASE)
#undef CASE
                    default: grad_x(g, w, idx, gx, acc, b, D, C, K);
                }
            free(acc);
        }
        if (gw) {
            const int nt = omp_get_num_threads(), t = omp_get_thread_num();
            const int lo = (int)((long)C * t / nt), hi = (int)((long)C * (t + 1) / nt);
            memset(gw + (size_t)lo * D, 0, sizeof(float) * (size_t)(hi - lo) * D);
            for (int b = 0; b < B; b++)
                switch (K) {
#define CASE(k) case k: grad_w(g, x, idx, gw, b, lo, hi, D, C, k); break;
                    CONSTANT_KS(CASE)
#undef CASE
                    default: grad_w(g, x, idx, gw, b, lo, hi, D, C, K);
                }
        }
    }
    return 0;
}

int dynk_kmax(void) { return KMAX; }
int dynk_lanes(void) { return LANES; }
int dynk_unit_max(void) { return UNIT_MAX; }
