/* Ops to kernels: cuda_op_exec enqueues one recorded op (struct cuda_op) through the launchers
 * of cuda_quant.cu, cuda_attn.cu and cuda_ops.cu; cuda_fuse_push holds up to CUDA_FUSE_WINDOW
 * ops back and enqueues runs of them as one kernel where a pattern fits:
 *   - 2..3 matvecs of one input (q, k, v; gate and up), with the GLU that follows gate and up;
 *   - per-head rmsnorm of q and k, rope of both and the KV store (the attention prologue);
 *   - [rmsnorm in place,] residual add, rmsnorm of the sum (the residual step between blocks),
 *     and that step after the matvec that produces its input (o and down projections at small
 *     batch): the matvec's last block runs it, which saves a launch and a dependency wait.
 * A fused kernel computes every element with the same arithmetic as the ops it replaces, so the
 * results are bit-identical to the unfused ones (KRS_CUDA_FUSE=0 runs the ops one by one).
 * Patterns check every condition the fusion relies on (same input, distinct outputs, in-place
 * norms, shapes that match the step); anything else runs op by op. Ops held back are enqueued
 * by cuda_fuse_drain, which cuda_flush (cuda_graph.cu) calls before anything else is enqueued.
 *
 * The deferred unscale: an F16 GEMM's output rows carry the power-of-two scales its input
 * conversion applied (cuda_quant.cu); with fusion on, the kernel that reads them next applies
 * them (the attention prologue to q, k, v; the residual step to o and down; the GLU to gate and
 * up) instead of a k_unscale_rows launch after every GEMM (7 a layer at 16+ rows). Every
 * other reader runs the pending unscales first (cuda_defer_flush), and so does the drain. A
 * power-of-two scale is exact, so the results are still bit-identical to the unfused ops. */
#include "backend/cuda/cuda_impl.h"

#include <string.h>

static float *fp(const struct backend_tensor *t)
{
    return t ? (float *)t->dev : NULL;
}

int cuda_op_exec(struct backend_cuda *c, const struct cuda_op *o)
{
    const struct cuda_step *st = &c->step;
    if (o->kind != CUDA_OP_MATMUL) c->x_half_src = NULL; /* it may write that input */
    /* Deferred unscales (struct cuda_defer): a GLU applies those of gate and up itself; a
     * matmul needs its input and output free of them; any other op, all of them done. */
    const float *inv_g = NULL, *inv_u = NULL;
    int64_t width = 0;
    int rc = KRS_OK;
    if (o->kind == CUDA_OP_GLU) {
        inv_g = cuda_defer_take(c, fp(o->t[0]), &width);
        inv_u = cuda_defer_take(c, fp(o->t[1]), &width);
        rc = cuda_defer_flush(c);
    } else if (o->kind == CUDA_OP_MATMUL) {
        rc = cuda_defer_flush_if(c, fp(o->t[1]));
        if (!rc) rc = cuda_defer_flush_if(c, fp(o->t[2]));
    } else {
        rc = cuda_defer_flush(c);
    }
    if (rc) return rc;
    switch (o->kind) {
    case CUDA_OP_EMBED:
        return cuda_embed(c, o->t[0], st->d_tokens, st->n_tokens, o->f[0], fp(o->t[1]));
    case CUDA_OP_MATMUL: {
        c->x_half_op = 1;
        c->defer_ok = c->fuse && c->defer_on; /* (unfused: every op as it is, the reference) */
        rc = cuda_matmul(c, o->t[0], fp(o->t[1]), o->i[0], fp(o->t[2]));
        c->x_half_op = c->defer_ok = 0;
        if (rc || c->x_half_src == fp(o->t[2])) c->x_half_src = NULL;
        return rc;
    }
    case CUDA_OP_RMSNORM:
        return cuda_rmsnorm(c, fp(o->t[0]), fp(o->t[1]), o->i[0], o->i[1], o->f[0], fp(o->t[2]));
    case CUDA_OP_ADD_BIAS:
        return cuda_add_bias(c, fp(o->t[0]), fp(o->t[1]), o->i[0], o->i[1]);
    case CUDA_OP_ADD:
        return cuda_add(c, fp(o->t[0]), fp(o->t[1]), o->n);
    case CUDA_OP_SOFTCAP:
        return cuda_softcap(c, fp(o->t[0]), o->n, o->f[0]);
    case CUDA_OP_GLU:
        return cuda_glu(c, fp(o->t[0]), fp(o->t[1]), o->n, o->i[0], inv_g, inv_u, width);
    case CUDA_OP_ROPE:
        return cuda_rope(c, fp(o->t[0]), o->i[0], o->i[1], o->i[2], o->f[0], o->f[1], fp(o->t[1]),
                         o->i[3]);
    case CUDA_OP_KV_STORE:
        return cuda_kv_store(c, o->i[0], fp(o->t[0]), fp(o->t[1]));
    case CUDA_OP_ATTENTION: {
        struct backend_attn_args a;
        memset(&a, 0, sizeof a);
        a.q = o->t[0];
        a.out = (struct backend_tensor *)o->t[1];
        a.layer = o->i[0];
        a.n_head = o->i[1];
        a.n_head_kv = o->i[2];
        a.head_dim = o->i[3];
        a.n_swa = o->i[4];
        a.scale = o->f[0];
        return cuda_attention(c, &a, fp(o->t[0]), fp(o->t[1]));
    }
    case CUDA_OP_GET_ROWS:
        return cuda_get_rows(c, fp(o->t[0]), o->i[0], st->d_logit_rows, st->n_logits, fp(o->t[1]));
    default:
        return KRS_ERR_INTERNAL;
    }
}

/* ---- patterns: each returns the ops it consumed (0: no match) or a negative status ---- */

static int as_consumed(int rc, int k)
{
    return rc ? -rc : k; /* KRS statuses are positive */
}

static int mv_ok(const struct backend_tensor *w)
{
    int is_float = w->type == QUANT_F32 || w->type == QUANT_F16 || w->type == QUANT_BF16;
    return !is_float || w->n_in % 8 == 0;
}

/* matmul x 2..3 of one input [+ glu of the first two] */
static int match_matvec(struct backend_cuda *c, const struct cuda_op *q, int n)
{
    const int rows = q[0].i[0];
    const struct backend_tensor *x = q[0].t[1];
    if (rows < 1 || rows > cuda_matvec_rows(c, q[0].t[0]) || rows > CUDA_MV_MAX_ROWS ||
        !mv_ok(q[0].t[0]))
        return 0;
    int m = 1;
    while (m < 3 && m < n && q[m].kind == CUDA_OP_MATMUL && q[m].t[1] == x && q[m].i[0] == rows &&
           q[m].t[0]->n_in == q[0].t[0]->n_in && mv_ok(q[m].t[0])) {
        int distinct = 1;
        for (int j = 0; j < m; j++) distinct &= q[m].t[2] != q[j].t[2];
        if (!distinct) break;
        m++;
    }
    if (m < 2) return 0;
    const struct backend_tensor *w[3] = {q[0].t[0], q[1].t[0], m > 2 ? q[2].t[0] : NULL};
    float *y[3] = {fp(q[0].t[2]), fp(q[1].t[2]), m > 2 ? fp(q[2].t[2]) : NULL};
    if (m == 2 && n > 2 && q[2].kind == CUDA_OP_GLU && q[2].t[0] == q[0].t[2] &&
        q[2].t[1] == q[1].t[2] && w[0]->type == w[1]->type && w[0]->n_out == w[1]->n_out &&
        q[2].n == (int64_t)rows * w[0]->n_out)
        return as_consumed(cuda_matvec_multi(c, 2, w, fp(x), rows, y, q[2].i[0]), 3);
    return as_consumed(cuda_matvec_multi(c, m, w, fp(x), rows, y, -1), m);
}

static int same_rope(const struct cuda_op *a, const struct cuda_op *b)
{
    return a->t[1] == b->t[1] && a->i[1] == b->i[1] && a->i[2] == b->i[2] && a->i[3] == b->i[3] &&
           !memcmp(a->f, b->f, sizeof a->f);
}

/* a per-head rmsnorm in place on the rope's rows */
static int head_norm_of(const struct backend_cuda *c, const struct cuda_op *nm,
                        const struct cuda_op *r)
{
    return nm->kind == CUDA_OP_RMSNORM && nm->t[0] == r->t[0] && nm->t[2] == r->t[0] &&
           nm->i[1] == r->i[1] && (int64_t)nm->i[0] == (int64_t)c->step.n_tokens * r->i[0];
}

/* [rmsnorm q, rmsnorm k,] rope q, rope k [, kv_store k v] */
static int match_qk(struct backend_cuda *c, const struct cuda_op *q, int n)
{
    int k = q[0].kind == CUDA_OP_RMSNORM ? 2 : 0;
    if (n < k + 2 || q[k].kind != CUDA_OP_ROPE || q[k + 1].kind != CUDA_OP_ROPE) return 0;
    const struct cuda_op *rq = &q[k], *rk = &q[k + 1];
    if (rq->t[0] == rk->t[0] || !same_rope(rq, rk) || rq->i[1] > CUDA_QK_MAX_HD) return 0;
    if (k && (!head_norm_of(c, &q[0], rq) || !head_norm_of(c, &q[1], rk))) return 0;
    struct cuda_qk_args a;
    memset(&a, 0, sizeof a);
    a.q = fp(rq->t[0]);
    a.k = fp(rk->t[0]);
    a.wq = k ? fp(q[0].t[1]) : NULL;
    a.wk = k ? fp(q[1].t[1]) : NULL;
    a.eps_q = k ? q[0].f[0] : 0.0f;
    a.eps_k = k ? q[1].f[0] : 0.0f;
    a.n_head = rq->i[0];
    a.n_head_kv = rk->i[0];
    a.head_dim = rq->i[1];
    a.n_rot = rq->i[2];
    a.neox = rq->i[3];
    a.base = rq->f[0];
    a.freq_scale = rq->f[1];
    a.freq_factors = fp(rq->t[1]);
    a.layer = -1;
    int used = k + 2;
    const struct cuda_op *s = n > used ? &q[used] : NULL;
    if (s && s->kind == CUDA_OP_KV_STORE && s->t[0] == rk->t[0] && s->t[1] != rk->t[0] &&
        s->t[1] != rq->t[0] && (int64_t)rk->i[0] * rk->i[1] == c->kv.kv_dim) {
        a.layer = s->i[0];
        a.v = fp(s->t[1]);
        used++;
    }
    if (!k && a.layer < 0) return 0; /* two ropes alone: not worth a special case */
    a.inv_q = cuda_defer_take(c, a.q, NULL);
    a.inv_k = cuda_defer_take(c, a.k, NULL);
    a.inv_v = a.layer >= 0 ? cuda_defer_take(c, a.v, NULL) : NULL;
    int rc = cuda_defer_flush(c); /* (what else is pending, before the kernel reads anything) */
    return as_consumed(rc ? rc : cuda_qk_rope_store(c, &a), used);
}

/* The residual step at q: [rmsnorm tm in place,] x += tm, xn = rmsnorm(x). */
struct residual {
    int ops; /* ops it spans; 0: no match */
    const struct backend_tensor *tm, *x, *xn;
    const float *wp, *wn; /* wp NULL: no norm of tm */
    float eps_p, eps_n;
    int rows, width;
};

static struct residual residual_at(const struct cuda_op *q, int n)
{
    struct residual r;
    memset(&r, 0, sizeof r);
    int k = n > 0 && q[0].kind == CUDA_OP_RMSNORM ? 1 : 0;
    if (n < k + 2 || q[k].kind != CUDA_OP_ADD || q[k + 1].kind != CUDA_OP_RMSNORM) return r;
    const struct cuda_op *ad = &q[k], *nn = &q[k + 1], *pn = k ? &q[0] : NULL;
    const struct backend_tensor *x = ad->t[0], *tm = ad->t[1], *xn = nn->t[2];
    const int rows = nn->i[0], width = nn->i[1];
    if (x == tm || nn->t[0] != x || xn == x || xn == tm || ad->n != (int64_t)rows * width) return r;
    if (pn && (pn->t[0] != tm || pn->t[2] != tm || pn->i[0] != rows || pn->i[1] != width)) return r;
    r.ops = k + 2;
    r.tm = tm;
    r.x = x;
    r.xn = xn;
    r.wp = pn ? fp(pn->t[1]) : NULL;
    r.eps_p = pn ? pn->f[0] : 0.0f;
    r.wn = fp(nn->t[1]);
    r.eps_n = nn->f[0];
    r.rows = rows;
    r.width = width;
    return r;
}

static int match_residual(struct backend_cuda *c, const struct cuda_op *q, int n)
{
    const struct residual r = residual_at(q, n);
    if (!r.ops) return 0;
    const float *inv = cuda_defer_take(c, fp(r.tm), NULL);
    int rc = cuda_defer_flush(c);
    if (!rc)
        rc = cuda_norm_add_norm(c, fp(r.tm), inv, r.wp, r.eps_p, fp(r.x), r.wn, r.eps_n, fp(r.xn),
                                r.rows, r.width);
    return as_consumed(rc, r.ops);
}

/* A one-row matvec into tm, then the residual step on tm. One token row only: the last block
 * runs the residual step, and at 8 rows that serial tail cost more than the launch it saves
 * (H200, default model's stand-in, batch 8: 6,445 -> 4,421 tok/s; batch 1: 1,325 -> 1,360,
 * 1B shape 791 -> 838). */
static int match_matvec_residual(struct backend_cuda *c, const struct cuda_op *q, int n)
{
    const struct backend_tensor *w = q[0].t[0], *in = q[0].t[1], *y = q[0].t[2];
    if (q[0].i[0] != 1 || cuda_matvec_rows(c, w) < 1 || !mv_ok(w) || w->n_out > CUDA_NORM_REG_MAX)
        return 0;
    const struct residual r = residual_at(q + 1, n - 1);
    if (!r.ops || r.tm != y || in == y || r.rows != 1 || r.width != w->n_out) return 0;
    return as_consumed(
        cuda_matvec_residual(c, w, fp(in), fp(y), r.wp, r.eps_p, fp(r.x), r.wn, r.eps_n, fp(r.xn)),
        1 + r.ops);
}

/* Enqueues the head of the queue: a fused run or one op. */
static int fuse_step(struct backend_cuda *c)
{
    struct cuda_opq *q = &c->opq;
    int k = 0;
    switch (q->op[0].kind) {
    case CUDA_OP_MATMUL:
        /* (the matvec patterns read and write without applying deferred unscales) */
        if (q->op[0].i[0] <= cuda_matvec_rows(c, q->op[0].t[0])) {
            int rc = cuda_defer_flush(c);
            if (rc) {
                q->n = 0;
                return rc;
            }
        }
        k = match_matvec(c, q->op, q->n);
        if (!k) k = match_matvec_residual(c, q->op, q->n);
        break;
    case CUDA_OP_RMSNORM:
        k = match_qk(c, q->op, q->n);
        if (!k) k = match_residual(c, q->op, q->n);
        break;
    case CUDA_OP_ROPE:
        k = match_qk(c, q->op, q->n);
        break;
    case CUDA_OP_ADD:
        k = match_residual(c, q->op, q->n);
        break;
    default:
        break;
    }
    if (k == 0) {
        int rc = cuda_op_exec(c, &q->op[0]);
        k = rc ? -rc : 1;
    } else {
        c->x_half_src = NULL; /* a fused kernel wrote what it wrote */
    }
    if (k < 0) {
        q->n = 0; /* the step is void */
        return -k;
    }
    memmove(q->op, q->op + k, (size_t)(q->n - k) * sizeof q->op[0]);
    q->n -= k;
    return KRS_OK;
}

int cuda_fuse_push(struct backend_cuda *c, const struct cuda_op *op)
{
    if (!c->fuse) return cuda_op_exec(c, op);
    struct cuda_opq *q = &c->opq;
    q->op[q->n++] = *op;
    int rc = KRS_OK;
    while (!rc && q->n >= CUDA_FUSE_WINDOW) rc = fuse_step(c);
    return rc;
}

int cuda_fuse_drain(struct backend_cuda *c)
{
    int rc = KRS_OK;
    while (!rc && c->opq.n > 0) rc = fuse_step(c);
    return rc ? rc : cuda_defer_flush(c); /* whoever reads the outputs now sees them unscaled */
}

void cuda_fuse_clear(struct backend_cuda *c)
{
    c->opq.n = 0;
    c->defer.n = 0;
}
