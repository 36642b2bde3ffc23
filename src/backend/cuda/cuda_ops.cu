/* CUDA elementwise and row ops: rmsnorm, bias, residual add, softcap, GLU, rotary embedding.
 *
 * Each follows the CPU backend's arithmetic: rmsnorm sums squares in double, rope computes its
 * angles in double (pos * base^(-2i/n_rot) * freq_scale / ff[i]) and rounds cos/sin to float,
 * the activations use tanhf/expf. Launchers only enqueue on the backend's stream. */
#include "backend/cuda/cuda_impl.h"

#define OPS_THREADS 256

static unsigned blocks_for(int64_t n)
{
    int64_t g = (n + OPS_THREADS - 1) / OPS_THREADS;
    if (g > 65535ll * 32) g = 65535ll * 32; /* grid-stride loops cover the rest */
    return (unsigned)(g > 0 ? g : 1);
}

#define GRID_STRIDE(i, n)                                                                          \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                      \
         i += (int64_t)gridDim.x * blockDim.x)

/* One block of CUDA_NORM_THREADS per row. */
__global__ void k_rmsnorm(const float *x, const float *__restrict__ w, int n, float eps, float *y)
{
    cuda_pdl_enter();
    __shared__ double part[CUDA_NORM_THREADS / 32];
    const float *xr = x + (int64_t)blockIdx.x * n;
    float *yr = y + (int64_t)blockIdx.x * n;
    const float scale = cuda_rms_scale(xr, n, eps, part);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = __fmul_rn(xr[i] * scale, w[i]);
}

__global__ void __launch_bounds__(CUDA_NORM_THREADS)
    k_rmsnorm_reg(const float *x, const float *__restrict__ w, int n, float eps, float *y)
{
    cuda_pdl_enter();
    __shared__ double part[CUDA_NORM_THREADS / 32];
    const float *xr = x + (int64_t)blockIdx.x * n;
    float *yr = y + (int64_t)blockIdx.x * n;
    float v[CUDA_NORM_REG], wv[CUDA_NORM_REG];
#pragma unroll
    for (int j = 0; j < CUDA_NORM_REG; j++) {
        const int i = threadIdx.x + j * CUDA_NORM_THREADS;
        v[j] = i < n ? xr[i] : 0.0f;
        wv[j] = i < n ? w[i] : 0.0f;
    }
    const float scale = cuda_reg_rms(v, n, eps, part);
#pragma unroll
    for (int j = 0; j < CUDA_NORM_REG; j++) {
        const int i = threadIdx.x + j * CUDA_NORM_THREADS;
        if (i < n) yr[i] = __fmul_rn(v[j] * scale, wv[j]);
    }
}

/* Fused residual step, one block per row: tm = rmsnorm(tm) * wp (if wp); x += tm;
 * xn = rmsnorm(x) * wn. Each thread touches the same elements in every phase, so only the
 * reductions need barriers; the arithmetic is that of k_rmsnorm and k_add. */
__global__ void k_norm_add_norm(float *tm, const float *__restrict__ inv,
                                const float *__restrict__ wp, float eps_p, float *x,
                                const float *__restrict__ wn, float eps_n, float *xn, int n)
{
    cuda_pdl_enter();
    __shared__ double part[CUDA_NORM_THREADS / 32];
    const int64_t off = (int64_t)blockIdx.x * n;
    float *tr = tm + off, *xr = x + off, *yr = xn + off;
    if (inv) /* the deferred unscale (each thread then reads back only what it wrote) */
        for (int i = threadIdx.x; i < n; i += blockDim.x) tr[i] *= inv[blockIdx.x];
    if (wp) {
        const float sp = cuda_rms_scale(tr, n, eps_p, part);
        for (int i = threadIdx.x; i < n; i += blockDim.x) tr[i] = __fmul_rn(tr[i] * sp, wp[i]);
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] += tr[i];
    const float sn = cuda_rms_scale(xr, n, eps_n, part);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = __fmul_rn(xr[i] * sn, wn[i]);
}

__global__ void __launch_bounds__(CUDA_NORM_THREADS)
    k_norm_add_norm_reg(float *tm, const float *__restrict__ inv, const float *__restrict__ wp,
                        float eps_p, float *x, const float *__restrict__ wn, float eps_n, float *xn,
                        int n)
{
    cuda_pdl_enter();
    __shared__ double part[CUDA_NORM_THREADS / 32];
    const int64_t off = (int64_t)blockIdx.x * n;
    cuda_norm_add_norm_row(tm + off, inv ? inv + blockIdx.x : NULL, wp, eps_p, x + off, wn, eps_n,
                           xn + off, n, part);
}

__global__ void k_add_bias(float *y, const float *__restrict__ b, int64_t total, int n)
{
    cuda_pdl_enter();
    GRID_STRIDE(i, total) y[i] += b[i % n];
}

__global__ void k_add(float *y, const float *x, int64_t n)
{
    cuda_pdl_enter();
    GRID_STRIDE(i, n) y[i] += x[i];
}

__global__ void k_softcap(float *x, int64_t n, float cap)
{
    cuda_pdl_enter();
    GRID_STRIDE(i, n) x[i] = cap * tanhf(x[i] / cap);
}

__global__ void k_glu(float *gate, float *up, int64_t n, int gelu, const float *inv_g,
                      const float *inv_u, int64_t width)
{
    cuda_pdl_enter();
    GRID_STRIDE(i, n)
    {
        float g = gate[i], u = up[i];
        if (inv_g) g *= inv_g[i / width]; /* deferred unscales (k_unscale_rows' arithmetic) */
        if (inv_u) up[i] = u *= inv_u[i / width];
        gate[i] = cuda_glu1(g, u, gelu);
    }
}

/* One thread per (token, rotating pair); the angle is shared by every head of the token. */
__global__ void k_rope(float *x, const int32_t *__restrict__ pos, int T, int n_heads, int head_dim,
                       int n_rot, float base, float freq_scale, const float *__restrict__ ff,
                       int neox)
{
    cuda_pdl_enter();
    const int half = n_rot / 2;
    GRID_STRIDE(k, (int64_t)T * half)
    {
        const int t = (int)(k / half), i = (int)(k % half);
        float c, s;
        cuda_rope_cs(pos[t], i, n_rot, base, freq_scale, ff, &c, &s);
        const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((int64_t)t * n_heads + h) * head_dim;
            cuda_rope_pair(v + i0, v + i1, c, s);
        }
    }
}

int cuda_rmsnorm(struct backend_cuda *c, const float *x, const float *w, int rows, int n, float eps,
                 float *y)
{
    if (rows <= 0) return KRS_OK;
    if (n <= CUDA_NORM_REG_MAX)
        cuda_launch(c, k_rmsnorm_reg, rows, CUDA_NORM_THREADS, x, w, n, eps, y);
    else
        cuda_launch(c, k_rmsnorm, rows, CUDA_NORM_THREADS, x, w, n, eps, y);
    return CUDA_LAUNCHED("rmsnorm");
}

int cuda_norm_add_norm(struct backend_cuda *c, float *tm, const float *inv_tm, const float *wp,
                       float eps_p, float *x, const float *wn, float eps_n, float *xn, int rows,
                       int n)
{
    if (rows <= 0) return KRS_OK;
    if (n <= CUDA_NORM_REG_MAX)
        cuda_launch(c, k_norm_add_norm_reg, rows, CUDA_NORM_THREADS, tm, inv_tm, wp, eps_p, x, wn,
                    eps_n, xn, n);
    else
        cuda_launch(c, k_norm_add_norm, rows, CUDA_NORM_THREADS, tm, inv_tm, wp, eps_p, x, wn,
                    eps_n, xn, n);
    return CUDA_LAUNCHED("norm_add_norm");
}

int cuda_add_bias(struct backend_cuda *c, float *y, const float *bias, int rows, int n)
{
    int64_t total = (int64_t)rows * n;
    if (total <= 0) return KRS_OK;
    cuda_launch(c, k_add_bias, blocks_for(total), OPS_THREADS, y, bias, total, n);
    return CUDA_LAUNCHED("add_bias");
}

int cuda_add(struct backend_cuda *c, float *y, const float *x, int64_t n)
{
    if (n <= 0) return KRS_OK;
    cuda_launch(c, k_add, blocks_for(n), OPS_THREADS, y, x, n);
    return CUDA_LAUNCHED("add");
}

int cuda_softcap(struct backend_cuda *c, float *x, int64_t n, float cap)
{
    if (n <= 0) return KRS_OK;
    cuda_launch(c, k_softcap, blocks_for(n), OPS_THREADS, x, n, cap);
    return CUDA_LAUNCHED("softcap");
}

int cuda_glu(struct backend_cuda *c, float *gate, float *up, int64_t n, int gelu,
             const float *inv_g, const float *inv_u, int64_t width)
{
    if (n <= 0) return KRS_OK;
    cuda_launch(c, k_glu, blocks_for(n), OPS_THREADS, gate, up, n, gelu, inv_g, inv_u,
                width > 0 ? width : n);
    return CUDA_LAUNCHED("glu");
}

int cuda_rope(struct backend_cuda *c, float *x, int n_heads, int head_dim, int n_rot, float base,
              float freq_scale, const float *freq_factors, int neox)
{
    const int T = c->step.n_tokens;
    int64_t total = (int64_t)T * (n_rot / 2);
    if (total <= 0) return KRS_OK;
    cuda_launch(c, k_rope, blocks_for(total), OPS_THREADS, x, c->step.d_pos, T, n_heads, head_dim,
                n_rot, base, freq_scale, freq_factors, neox);
    return CUDA_LAUNCHED("rope");
}
