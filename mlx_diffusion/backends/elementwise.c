/* Elementwise activations on the CPU in float32, for large arrays: built by `backends/native.py` (-O3 -march=native
 * -fopenmp) and called through ctypes on evaluated MLX arrays; see `backends/cpu.py`'s `gelu_tanh` for when.
 *
 * Why: MLX's fused CPU kernels are scalar loops on one core; a FLUX MLP's GELU over 4608 x 12288 values took 148 ms
 * that way against torch's 73 ms on this project's 2-core test machine. Here the loop is vectorised and split across
 * the cores; each value depends only on its input, so results do not depend on the thread count or the batch.
 *
 * The formulas are `cpu.py`'s: torch's GELU(approximate="tanh") with Eigen's float tanh, x * P(x^2) / Q(x^2) on
 * [-c, c], P in Horner form, Q in Estrin form.
 */
#include <stdint.h>

/* Each product and sum rounded on its own, as MLX's kernel and torch do: fused multiply-adds would leave tanh a few ulp
 * short of +-1 at the clamp, and GELU's negative tail at -2e-6 instead of 0. */
#pragma GCC optimize("fp-contract=off")

#define TANH_CLAMP 7.90531110763549805f

void md_gelu_tanh(const float *x, float *y, int64_t n) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float u = v * (0.7978845608028654f + 0.035677408136300125f * (v * v));
        float c = u > TANH_CLAMP ? TANH_CLAMP : u;
        c = c < -TANH_CLAMP ? -TANH_CLAMP : c;
        float z = c * c;
        float p = -2.76076847742355e-16f;
        p = p * z + 2.00018790482477e-13f;
        p = p * z + -8.60467152213735e-11f;
        p = p * z + 5.12229709037114e-08f;
        p = p * z + 1.48572235717979e-05f;
        p = p * z + 6.37261928875436e-04f;
        p = p * z + 4.89352455891786e-03f;
        float den = (4.89352518554385e-03f + 2.26843463243900e-03f * z) +
                    (z * z) * (1.18534705686654e-04f + 1.19825839466702e-06f * z);
        float h = 0.5f * v;
        y[i] = h + h * (c * p / den);
    }
}
