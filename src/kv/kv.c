/* Paged KV bookkeeping: two block pools (full and sliding-window layers), a free-list stack per
 * pool and a per-sequence table of logical block -> physical block (-1 = not held). Physical
 * blocks are reference-counted because the prefix cache (kv_prefix.c) lets several tables hold
 * one. The storage of the blocks is the backend's. */
#include "kv/kv_impl.h"

#include "krserve.h"
#include "util/alloc.h"

#include <string.h>

static int group_init(struct kv_cache *kv, struct kv_group *g, int n_layers, int64_t n_tokens)
{
    g->n_layers = n_layers;
    if (n_layers == 0) return KRS_OK;
    g->n_blocks = (n_tokens + kv->block_size - 1) / kv->block_size;
    if (g->n_blocks < 1 || g->n_blocks > INT32_MAX) return KRS_ERR_INVALID;
    g->free_stack = alloc_calloc((size_t)g->n_blocks, sizeof *g->free_stack);
    g->tables = alloc_calloc((size_t)kv->max_seqs * (size_t)kv->max_blocks, sizeof *g->tables);
    g->held = alloc_calloc((size_t)kv->max_seqs, sizeof *g->held);
    g->refs = alloc_calloc((size_t)g->n_blocks, sizeof *g->refs);
    g->owner = alloc_malloc((size_t)g->n_blocks * sizeof *g->owner);
    g->lru_prev = alloc_malloc((size_t)g->n_blocks * sizeof *g->lru_prev);
    g->lru_next = alloc_malloc((size_t)g->n_blocks * sizeof *g->lru_next);
    if (!g->free_stack || !g->tables || !g->held || !g->refs || !g->owner || !g->lru_prev ||
        !g->lru_next)
        return KRS_ERR_NOMEM;
    for (int64_t i = 0; i < g->n_blocks; i++) g->owner[i] = g->lru_prev[i] = g->lru_next[i] = -1;
    g->lru_head = g->lru_tail = -1;
    for (int64_t i = 0; i < g->n_blocks; i++) g->free_stack[i] = (int32_t)(g->n_blocks - 1 - i);
    g->n_free = g->n_blocks;
    for (size_t i = 0; i < (size_t)kv->max_seqs * (size_t)kv->max_blocks; i++) g->tables[i] = -1;
    return KRS_OK;
}

static void group_free(struct kv_group *g)
{
    alloc_free(g->free_stack);
    alloc_free(g->tables);
    alloc_free(g->held);
    alloc_free(g->refs);
    alloc_free(g->owner);
    alloc_free(g->lru_prev);
    alloc_free(g->lru_next);
}

int kv_create(const struct kv_config *cfg, struct kv_cache **out)
{
    *out = NULL;
    if (cfg->n_layers <= 0 || cfg->n_kv_heads <= 0 || cfg->head_dim <= 0 || cfg->block_size <= 0 ||
        cfg->n_tokens <= 0 || cfg->max_seqs <= 0 || cfg->max_ctx <= 0)
        return KRS_ERR_INVALID;
    struct kv_cache *kv = alloc_calloc(1, sizeof *kv);
    if (!kv) return KRS_ERR_NOMEM;
    int rc = KRS_ERR_NOMEM;
    kv->n_layers = cfg->n_layers;
    kv->n_swa = cfg->n_swa;
    kv->kv_dim = cfg->n_kv_heads * cfg->head_dim;
    kv->block_size = cfg->block_size;
    kv->elem_bytes = cfg->elem_bytes > 0 ? cfg->elem_bytes : 4;
    kv->max_seqs = cfg->max_seqs;
    kv->max_ctx = cfg->max_ctx;
    kv->max_blocks = (cfg->max_ctx + cfg->block_size - 1) / cfg->block_size;
    kv->is_swa = alloc_calloc((size_t)cfg->n_layers, 1);
    kv->group_layer = alloc_calloc((size_t)cfg->n_layers, sizeof *kv->group_layer);
    if (!kv->is_swa || !kv->group_layer) goto fail;
    int counts[2] = {0, 0};
    for (int l = 0; l < cfg->n_layers; l++) {
        kv->is_swa[l] = cfg->layer_is_swa && cfg->n_swa > 0 ? (cfg->layer_is_swa[l] != 0) : 0;
        kv->group_layer[l] = counts[kv->is_swa[l]]++;
    }
    int64_t swa_tokens = cfg->n_tokens_swa > 0 ? cfg->n_tokens_swa : cfg->n_tokens;
    if ((rc = group_init(kv, &kv->g[0], counts[0], cfg->n_tokens))) goto fail;
    if ((rc = group_init(kv, &kv->g[1], counts[1], swa_tokens))) goto fail;
    if ((rc = kv_prefix_init(kv, cfg))) goto fail;
    *out = kv;
    return KRS_OK;
fail:
    kv_free(kv);
    return rc;
}

void kv_free(struct kv_cache *kv)
{
    if (!kv) return;
    kv_prefix_free(kv);
    group_free(&kv->g[0]);
    group_free(&kv->g[1]);
    alloc_free(kv->is_swa);
    alloc_free(kv->group_layer);
    alloc_free(kv);
}

static int32_t *seq_table(const struct kv_cache *kv, const struct kv_group *g, int seq)
{
    return g->tables + (size_t)seq * (size_t)kv->max_blocks;
}

/* Logical block range [b0, b1) that group gi needs for positions [pos_begin, pos_end). */
static void needed_range(const struct kv_cache *kv, int gi, int64_t pos_begin, int64_t pos_end,
                         int64_t *b0, int64_t *b1)
{
    int64_t lo = 0;
    if (gi == 1) {
        lo = pos_begin - kv->n_swa + 1;
        if (lo < 0) lo = 0;
    }
    *b0 = lo / kv->block_size;
    *b1 = pos_end > 0 ? (pos_end - 1) / kv->block_size + 1 : 0;
}

static int64_t count_missing(const struct kv_cache *kv, int gi, int seq, int64_t pos_begin,
                             int64_t pos_end)
{
    const struct kv_group *g = &kv->g[gi];
    if (!g->n_layers) return 0;
    int64_t b0, b1, n = 0;
    needed_range(kv, gi, pos_begin, pos_end, &b0, &b1);
    const int32_t *t = seq_table(kv, g, seq);
    for (int64_t b = b0; b < b1; b++) n += t[b] < 0;
    return n;
}

void kv_seq_blocks_needed(const struct kv_cache *kv, int seq, int64_t pos_begin, int64_t pos_end,
                          int64_t *full, int64_t *swa)
{
    *full = count_missing(kv, 0, seq, pos_begin, pos_end);
    *swa = count_missing(kv, 1, seq, pos_begin, pos_end);
}

int kv_seq_reserve(struct kv_cache *kv, int seq, int64_t pos_begin, int64_t pos_end)
{
    if (seq < 0 || seq >= kv->max_seqs || pos_begin < 0 || pos_end < pos_begin ||
        pos_end > kv->max_ctx)
        return KRS_ERR_INVALID;
    int64_t need[2];
    kv_seq_blocks_needed(kv, seq, pos_begin, pos_end, &need[0], &need[1]);
    for (int gi = 0; gi < 2; gi++)
        if (need[gi] > kv->g[gi].n_free + kv->g[gi].n_lru) return KRS_ERR_AGAIN;
    for (int gi = 0; gi < 2; gi++) {
        struct kv_group *g = &kv->g[gi];
        if (!g->n_layers || !need[gi]) continue;
        int64_t b0, b1;
        needed_range(kv, gi, pos_begin, pos_end, &b0, &b1);
        int32_t *t = seq_table(kv, g, seq);
        for (int64_t b = b0; b < b1; b++) {
            if (t[b] >= 0) continue;
            t[b] = kv_block_take(kv, gi);
            g->refs[t[b]] = 1;
            g->held[seq]++;
        }
    }
    return KRS_OK;
}

/* Last block first: a released chain then leaves the LRU list from its tail end, so what
 * stays cached longest is the part other prompts share (the beginning). */
static void release_range(struct kv_cache *kv, int gi, int seq, int64_t b0, int64_t b1)
{
    struct kv_group *g = &kv->g[gi];
    int32_t *t = seq_table(kv, g, seq);
    for (int64_t b = b1 - 1; b >= b0; b--) {
        if (t[b] < 0) continue;
        if (--g->refs[t[b]] == 0) kv_block_unheld(kv, gi, t[b]);
        t[b] = -1;
        g->held[seq]--;
    }
}

void kv_seq_trim(struct kv_cache *kv, int seq, int64_t next_pos)
{
    struct kv_group *g = &kv->g[1];
    if (!g->n_layers || seq < 0 || seq >= kv->max_seqs) return;
    int64_t first_visible = next_pos - kv->n_swa + 1;
    if (first_visible <= 0) return;
    release_range(kv, 1, seq, 0, first_visible / kv->block_size);
}

void kv_seq_release(struct kv_cache *kv, int seq)
{
    if (seq < 0 || seq >= kv->max_seqs) return;
    for (int gi = 0; gi < 2; gi++)
        if (kv->g[gi].n_layers) release_range(kv, gi, seq, 0, kv->max_blocks);
    kv_prefix_seq_reset(kv, seq);
}

int64_t kv_group_blocks(const struct kv_cache *kv, int g)
{
    return kv->g[g].n_layers ? kv->g[g].n_blocks : 0;
}

int kv_max_blocks(const struct kv_cache *kv)
{
    return kv->max_blocks;
}

const int32_t *kv_seq_table(const struct kv_cache *kv, int g, int seq)
{
    if (!kv->g[g].n_layers || seq < 0 || seq >= kv->max_seqs) return NULL;
    return seq_table(kv, &kv->g[g], seq);
}

int kv_seq_holds(const struct kv_cache *kv, int layer, int seq, int64_t pos)
{
    if (layer < 0 || layer >= kv->n_layers || seq < 0 || seq >= kv->max_seqs || pos < 0) return 0;
    int64_t lb = pos / kv->block_size;
    if (lb >= kv->max_blocks) return 0;
    return seq_table(kv, &kv->g[kv->is_swa[layer]], seq)[lb] >= 0;
}

int kv_block_size(const struct kv_cache *kv)
{
    return kv->block_size;
}

void kv_get_stats(const struct kv_cache *kv, struct kv_stats *out)
{
    memset(out, 0, sizeof *out);
    struct kv_group_stats *s[2] = {&out->full, &out->swa};
    for (int gi = 0; gi < 2; gi++) {
        const struct kv_group *g = &kv->g[gi];
        s[gi]->n_layers = g->n_layers;
        s[gi]->blocks_total = g->n_blocks;
        s[gi]->blocks_free = g->n_free + g->n_lru;
        s[gi]->blocks_cached = g->n_cached;
        s[gi]->blocks_evictable = g->n_lru;
        s[gi]->evictions = g->evictions;
        out->bytes += 2u * (uint64_t)g->n_layers * (uint64_t)g->n_blocks *
                      (uint64_t)kv->block_size * (uint64_t)kv->kv_dim * (uint64_t)kv->elem_bytes;
    }
    out->block_size = kv->block_size;
    out->prefix = (struct kv_prefix_stats){kv->px.enabled, kv->px.lookups, kv->px.hits,
                                           kv->px.lookup_tokens, kv->px.hit_tokens};
}

void kv_seq_blocks_held(const struct kv_cache *kv, int seq, int64_t *full, int64_t *swa)
{
    *full = kv->g[0].n_layers ? kv->g[0].held[seq] : 0;
    *swa = kv->g[1].n_layers ? kv->g[1].held[seq] : 0;
}
