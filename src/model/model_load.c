/* Model loading: architecture hyper-parameters from GGUF metadata and weight binding with shape
 * and type checks. Weights stay in the read-only mapping of the file (no copy). */
#include "model/model_impl.h"

#include "gguf/gguf.h"
#include "krserve.h"
#include "util/alloc.h"
#include "util/log.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

/* Reads "<arch>.<suffix>" as u32; a missing key gives `def` unless def < 0 (required). */
static int arch_u32(const struct gguf_file *f, const char *arch, const char *suffix, long def,
                    int *out, char *err, size_t errlen)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    uint32_t v;
    int rc = gguf_get_u32(f, key, &v);
    if (rc == KRS_ERR_NOT_FOUND && def >= 0) {
        *out = (int)def;
        return KRS_OK;
    }
    if (rc) return fail(err, errlen, KRS_ERR_FORMAT, "metadata %s: %s", key, krs_status_str(rc));
    if (v > (1u << 30))
        return fail(err, errlen, KRS_ERR_FORMAT, "metadata %s: %u out of range", key, v);
    *out = (int)v;
    return KRS_OK;
}

static int arch_f32(const struct gguf_file *f, const char *arch, const char *suffix, double def,
                    float *out, char *err, size_t errlen)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_f32(f, key, out);
    if (rc == KRS_ERR_NOT_FOUND && !isnan(def)) {
        *out = (float)def;
        return KRS_OK;
    }
    if (rc) return fail(err, errlen, KRS_ERR_FORMAT, "metadata %s: %s", key, krs_status_str(rc));
    return KRS_OK;
}

/* Binds tensor `name` as a matrix [n_out, n_in] (GGUF ne = [n_in, n_out]). */
static int bind_matrix(const struct gguf_file *f, const char *name, int64_t n_in, int64_t n_out,
                       int optional, struct quant_matrix *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    const struct gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        if (optional) return KRS_OK;
        return fail(err, errlen, KRS_ERR_FORMAT, "missing tensor %s", name);
    }
    if (t->ne[0] != n_in || t->ne[1] != n_out || t->ne[2] != 1 || t->ne[3] != 1)
        return fail(err, errlen, KRS_ERR_FORMAT,
                    "tensor %s has shape [%lld, %lld], expected [%lld, %lld]", name,
                    (long long)t->ne[0], (long long)t->ne[1], (long long)n_in, (long long)n_out);
    if (!quant_type_supported(t->type))
        return fail(err, errlen, KRS_ERR_UNSUPPORTED, "tensor %s: unsupported type %s (%u)", name,
                    quant_type_name(t->type), t->type);
    out->type = t->type;
    out->n_in = n_in;
    out->n_out = n_out;
    out->data = t->data;
    out->row_bytes = quant_row_bytes(t->type, n_in);
    return KRS_OK;
}

/* Binds a 1-D F32 vector of n elements. */
static int bind_vector(const struct gguf_file *f, const char *name, int64_t n, int optional,
                       const float **out, char *err, size_t errlen)
{
    *out = NULL;
    const struct gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        if (optional) return KRS_OK;
        return fail(err, errlen, KRS_ERR_FORMAT, "missing tensor %s", name);
    }
    if (t->type != QUANT_F32 || t->ne[0] != n || t->ne[1] != 1 || t->ne[2] != 1 || t->ne[3] != 1)
        return fail(err, errlen, KRS_ERR_FORMAT, "tensor %s: expected F32 [%lld]", name,
                    (long long)n);
    *out = t->data;
    return KRS_OK;
}

static int read_hparams(struct model *m, char *err, size_t errlen)
{
    const struct gguf_file *f = m->gguf;
    struct model_hparams *hp = &m->hp;
    const char *arch;
    size_t arch_len;
    if (gguf_get_str(f, "general.architecture", &arch, &arch_len))
        return fail(err, errlen, KRS_ERR_FORMAT, "missing general.architecture");
    if (arch_len >= sizeof hp->arch_name)
        return fail(err, errlen, KRS_ERR_UNSUPPORTED, "unsupported architecture");
    memcpy(hp->arch_name, arch, arch_len);
    hp->arch_name[arch_len] = '\0';
    const char *a = hp->arch_name;
    if (!strcmp(a, "llama"))
        hp->arch = MODEL_ARCH_LLAMA;
    else if (!strcmp(a, "qwen2"))
        hp->arch = MODEL_ARCH_QWEN2;
    else if (!strcmp(a, "gemma3"))
        hp->arch = MODEL_ARCH_GEMMA3;
    else
        return fail(err, errlen, KRS_ERR_UNSUPPORTED,
                    "unsupported architecture '%s' (supported: gemma3, llama, qwen2)", a);

    int rc;
    if ((rc = arch_u32(f, a, "embedding_length", -1, &hp->n_embd, err, errlen))) return rc;
    if ((rc = arch_u32(f, a, "block_count", -1, &hp->n_layer, err, errlen))) return rc;
    if ((rc = arch_u32(f, a, "feed_forward_length", -1, &hp->n_ff, err, errlen))) return rc;
    if ((rc = arch_u32(f, a, "attention.head_count", -1, &hp->n_head, err, errlen))) return rc;
    if ((rc = arch_u32(f, a, "attention.head_count_kv", hp->n_head, &hp->n_head_kv, err, errlen)))
        return rc;
    if ((rc = arch_u32(f, a, "context_length", 2048, &hp->n_ctx_train, err, errlen))) return rc;
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 ||
        hp->n_ff <= 0 || hp->n_head % hp->n_head_kv)
        return fail(err, errlen, KRS_ERR_FORMAT, "inconsistent hyper-parameters");
    int head_dim_v;
    if ((rc = arch_u32(f, a, "attention.key_length", hp->n_embd / hp->n_head, &hp->head_dim, err,
                       errlen)))
        return rc;
    if ((rc = arch_u32(f, a, "attention.value_length", hp->head_dim, &head_dim_v, err, errlen)))
        return rc;
    if (head_dim_v != hp->head_dim || hp->head_dim <= 0 || hp->head_dim % 2)
        return fail(err, errlen, KRS_ERR_UNSUPPORTED, "key_length %d != value_length %d",
                    hp->head_dim, head_dim_v);
    if ((rc = arch_u32(f, a, "rope.dimension_count", hp->head_dim, &hp->n_rot, err, errlen)))
        return rc;
    if (hp->n_rot > hp->head_dim || hp->n_rot % 2)
        return fail(err, errlen, KRS_ERR_FORMAT, "rope.dimension_count %d invalid", hp->n_rot);
    if ((rc = arch_f32(f, a, "attention.layer_norm_rms_epsilon", NAN, &hp->rms_eps, err, errlen)))
        return rc;
    if ((rc = arch_f32(f, a, "rope.freq_base", 10000.0, &hp->rope_base, err, errlen))) return rc;
    if ((rc = arch_f32(f, a, "rope.freq_base_swa", 10000.0, &hp->rope_base_swa, err, errlen)))
        return rc;
    float factor;
    if ((rc = arch_f32(f, a, "rope.scaling.factor", 0.0, &factor, err, errlen))) return rc;
    hp->rope_freq_scale = factor > 0 ? 1.0f / factor : 1.0f;
    if ((rc = arch_f32(f, a, "final_logit_softcapping", 0.0, &hp->final_softcap, err, errlen)))
        return rc;

    hp->rope_neox = hp->arch != MODEL_ARCH_LLAMA;
    hp->embed_scale = 1.0f;
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    hp->n_swa = 0;
    hp->swa_period = 0;
    if (hp->arch == MODEL_ARCH_GEMMA3) {
        if ((rc = arch_u32(f, a, "attention.sliding_window", 0, &hp->n_swa, err, errlen)))
            return rc;
        if ((rc = arch_u32(f, a, "attention.sliding_window_pattern", 6, &hp->swa_period, err,
                           errlen)))
            return rc;
        if (hp->swa_period <= 0) hp->n_swa = 0;
        hp->embed_scale = sqrtf((float)hp->n_embd);
        /* 27B scales queries by n_embd/n_head instead of head_dim (MODEL-FORMATS 4.4). */
        if (hp->n_layer == 62) hp->attn_scale = 1.0f / sqrtf((float)hp->n_embd / hp->n_head);
    }
    return KRS_OK;
}

static int bind_weights(struct model *m, char *err, size_t errlen)
{
    const struct gguf_file *f = m->gguf;
    const struct model_hparams *hp = &m->hp;
    int rc;
    const struct gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (!emb) return fail(err, errlen, KRS_ERR_FORMAT, "missing tensor token_embd.weight");
    m->hp.n_vocab = (int)emb->ne[1];
    if ((rc = bind_matrix(f, "token_embd.weight", hp->n_embd, hp->n_vocab, 0, &m->tok_embd, err,
                          errlen)))
        return rc;
    if ((rc = bind_matrix(f, "output.weight", hp->n_embd, hp->n_vocab, 1, &m->output, err, errlen)))
        return rc;
    if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */
    if ((rc = bind_vector(f, "output_norm.weight", hp->n_embd, 0, &m->output_norm, err, errlen)))
        return rc;
    if ((rc = bind_vector(f, "output.bias", hp->n_vocab, 1, &m->output_bias, err, errlen)))
        return rc;
    if ((rc = bind_vector(f, "rope_freqs.weight", hp->n_rot / 2, 1, &m->rope_freqs, err, errlen)))
        return rc;

    m->layers = alloc_calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return KRS_ERR_NOMEM;
    const int64_t q_dim = (int64_t)hp->n_head * hp->head_dim;
    const int64_t kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    const int gemma = hp->arch == MODEL_ARCH_GEMMA3;
    for (int il = 0; il < hp->n_layer; il++) {
        struct model_layer *L = &m->layers[il];
        char n[96];
#define NAME(s) (snprintf(n, sizeof n, "blk.%d." s, il), n)
        if ((rc = bind_vector(f, NAME("attn_norm.weight"), hp->n_embd, 0, &L->attn_norm, err,
                              errlen)) ||
            (rc = bind_matrix(f, NAME("attn_q.weight"), hp->n_embd, q_dim, 0, &L->wq, err,
                              errlen)) ||
            (rc = bind_matrix(f, NAME("attn_k.weight"), hp->n_embd, kv_dim, 0, &L->wk, err,
                              errlen)) ||
            (rc = bind_matrix(f, NAME("attn_v.weight"), hp->n_embd, kv_dim, 0, &L->wv, err,
                              errlen)) ||
            (rc = bind_matrix(f, NAME("attn_output.weight"), q_dim, hp->n_embd, 0, &L->wo, err,
                              errlen)) ||
            (rc = bind_vector(f, NAME("attn_q.bias"), q_dim, 1, &L->bq, err, errlen)) ||
            (rc = bind_vector(f, NAME("attn_k.bias"), kv_dim, 1, &L->bk, err, errlen)) ||
            (rc = bind_vector(f, NAME("attn_v.bias"), kv_dim, 1, &L->bv, err, errlen)) ||
            (rc = bind_vector(f, NAME("attn_q_norm.weight"), hp->head_dim, !gemma, &L->q_norm, err,
                              errlen)) ||
            (rc = bind_vector(f, NAME("attn_k_norm.weight"), hp->head_dim, !gemma, &L->k_norm, err,
                              errlen)) ||
            (rc = bind_vector(f, NAME("post_attention_norm.weight"), hp->n_embd, !gemma,
                              &L->post_attn_norm, err, errlen)) ||
            (rc = bind_vector(f, NAME("ffn_norm.weight"), hp->n_embd, 0, &L->ffn_norm, err,
                              errlen)) ||
            (rc = bind_matrix(f, NAME("ffn_gate.weight"), hp->n_embd, hp->n_ff, 0, &L->w_gate, err,
                              errlen)) ||
            (rc = bind_matrix(f, NAME("ffn_up.weight"), hp->n_embd, hp->n_ff, 0, &L->w_up, err,
                              errlen)) ||
            (rc = bind_matrix(f, NAME("ffn_down.weight"), hp->n_ff, hp->n_embd, 0, &L->w_down, err,
                              errlen)) ||
            (rc = bind_vector(f, NAME("post_ffw_norm.weight"), hp->n_embd, !gemma,
                              &L->post_ffw_norm, err, errlen)))
            return rc;
#undef NAME
        L->is_swa = hp->n_swa > 0 && (il % hp->swa_period) < hp->swa_period - 1;
    }
    return KRS_OK;
}

int model_load(const char *path, struct model **out, char *err, size_t errlen)
{
    *out = NULL;
    struct model *m = alloc_calloc(1, sizeof *m);
    if (!m) return KRS_ERR_NOMEM;
    int rc = gguf_open(path, &m->gguf, err, errlen);
    if (rc) goto out;
    if ((rc = read_hparams(m, err, errlen))) goto out;
    if ((rc = bind_weights(m, err, errlen))) goto out;
    KRS_LOG_INFOF("model %s: %s, %d layers, n_embd %d, %d heads (%d kv), head_dim %d, vocab %d",
                  path, m->hp.arch_name, m->hp.n_layer, m->hp.n_embd, m->hp.n_head, m->hp.n_head_kv,
                  m->hp.head_dim, m->hp.n_vocab);
    *out = m;
    m = NULL;
out:
    model_free(m);
    return rc;
}

void model_free(struct model *m)
{
    if (!m) return;
    alloc_free(m->layers);
    gguf_close(m->gguf);
    alloc_free(m);
}

const struct model_hparams *model_hparams(const struct model *m)
{
    return &m->hp;
}

const struct gguf_file *model_gguf(const struct model *m)
{
    return m->gguf;
}

int model_layer_is_swa(const struct model *m, int layer)
{
    return m->layers[layer].is_swa;
}

static uint64_t matrix_bytes(const struct quant_matrix *w)
{
    return w->row_bytes * (uint64_t)w->n_out;
}

uint64_t model_weight_bytes(const struct model *m)
{
    uint64_t total = matrix_bytes(&m->output);
    for (int il = 0; il < m->hp.n_layer; il++) {
        const struct model_layer *L = &m->layers[il];
        total += matrix_bytes(&L->wq) + matrix_bytes(&L->wk) + matrix_bytes(&L->wv) +
                 matrix_bytes(&L->wo) + matrix_bytes(&L->w_gate) + matrix_bytes(&L->w_up) +
                 matrix_bytes(&L->w_down);
    }
    return total;
}
