/* Softmax attention on the CPU in float32, for long sequences: built by `backends/native.py` with the machine's C
 * compiler (-O3 -march=native -fopenmp -fno-trapping-math) and called through ctypes on evaluated MLX arrays; see
 * `backends/cpu.py`'s `attention` for when and why.
 *
 * The work is split into tasks of (sample, head, `rows` query rows), taken by every core in turn (OpenMP). A task
 * runs whole on one core, so its scores stay in that core's cache: S = scale * Q K^T by the process's BLAS (called
 * single-threaded: the caller sets OpenBLAS to one thread around the call), each row of S turned in place into
 * e^(s - max) with its sum, O = E V by BLAS again, written straight into the merged (B, L, H*D) output, and each
 * output row divided by its sum. A task's numbers depend only on its rows, not on the thread count or on which
 * core ran it, and a sample's tasks not on the batch.
 *
 * The exponential is Cephes' expf (range reduction by ln 2 in two parts, degree-7 polynomial, ~1 ulp), written
 * without calls or branches so that the compiler vectorises it; the comparison in its clamp needs
 * -fno-trapping-math for that.
 */
#include <stdint.h>
#include <stdlib.h>

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                         int lda, const float *b, int ldb, float beta, float *c, int ldc);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* e^(s[j] - m) for j < n, in place; returns their sum. Inputs below m - 87 give ~e^-87 instead of less: weights
 * under 1e-38 of the row's largest, which no float32 sum can see. */
static float exp_shifted(float *s, int n, float m) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        float t = s[j] - m;
        t = t > -87.0f ? t : -87.0f;
        /* k = round(t / ln 2) by the 1.5 * 2^23 trick: k lands in the float's low mantissa bits */
        union { float f; int32_t i; } big = {t * 1.44269504088896341f + 12582912.0f}, p;
        float k = big.f - 12582912.0f;
        float r = t - k * 0.693359375f;
        r = r - k * -2.12194440e-4f;
        float c = 1.9875691500e-4f;
        c = c * r + 1.3981999507e-3f;
        c = c * r + 8.3334519073e-3f;
        c = c * r + 4.1665795894e-2f;
        c = c * r + 1.6666665459e-1f;
        c = c * r + 5.0000001201e-1f;
        p.f = c * r * r + r + 1.0f;
        p.i += (int32_t)((uint32_t)(big.i - 0x4B400000) << 23);
        s[j] = p.f;
        sum += p.f;
    }
    return sum;
}

static float row_max(const float *s, int n) {
    float m = s[0];
#pragma omp simd reduction(max : m)
    for (int j = 0; j < n; j++)
        m = s[j] > m ? s[j] : m;
    return m;
}

/* softmax(scale * q k^T) v for q (B, H, L, D), k and v (B, H, S, D), into o (B, H, L, D): any strides in floats
 * (0 for a broadcast axis) except the last axis, which is contiguous; o is usually a (B, L, H * D) array's view.
 * `sgemm` is cblas_sgemm. Each thread holds rows * S scores of scratch. Returns 0, or 1 when that scratch could not
 * be allocated (o is then incomplete). */
int md_attention(const float *q, const float *k, const float *v, float *o, int B, int H, int L, int S, int D,
                 const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                 const int64_t *o_strides, float scale, int rows, sgemm_fn sgemm) {
    int chunks = (L + rows - 1) / rows;
    int64_t tasks = (int64_t)B * H * chunks;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * ((size_t)rows * S + rows));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t t = 0; t < tasks; t++) {
            if (!scores)
                continue;
            float *inv = scores + (size_t)rows * S;
            int b = (int)(t / ((int64_t)H * chunks)), h = (int)(t / chunks % H), r0 = (int)(t % chunks) * rows;
            int R = L - r0 < rows ? L - r0 : rows;
            const float *qh = q + b * q_strides[0] + h * q_strides[1] + r0 * q_strides[2];
            const float *kh = k + b * k_strides[0] + h * k_strides[1];
            const float *vh = v + b * v_strides[0] + h * v_strides[1];
            float *oh = o + b * o_strides[0] + h * o_strides[1] + r0 * o_strides[2];
            sgemm(ROW_MAJOR, NO_TRANS, TRANS, R, S, D, scale, qh, (int)q_strides[2], kh, (int)k_strides[2], 0.0f,
                  scores, S);
            for (int i = 0; i < R; i++) {
                float *si = scores + (int64_t)i * S;
                inv[i] = 1.0f / exp_shifted(si, S, row_max(si, S));
            }
            sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, R, D, S, 1.0f, scores, S, vh, (int)v_strides[2], 0.0f, oh,
                  (int)o_strides[2]);
            for (int i = 0; i < R; i++) {
                float *oi = oh + i * o_strides[2];
                float f = inv[i];
#pragma omp simd
                for (int d = 0; d < D; d++)
                    oi[d] *= f;
            }
        }
        free(scores);
    }
    return failed;
}
