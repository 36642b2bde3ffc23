/* The prefix cache: content-addressed KV blocks, shared by reference, evicted LRU.
 *
 * An entry names the content of one logical block: its tokens and, through its parent entry,
 * every token before it (a chain starting at the salt). Lookups go by the chain hash and are
 * confirmed by comparing the parent link (entry and generation) and the tokens, so a hash
 * collision can cost a bucket walk but never a wrong match. An entry points to at most one
 * physical block per pool (full and sliding layers); it lives while it has one.
 *
 * Blocks are published by the sequence that computed them (kv_seq_commit, once all their
 * positions are written) and are read-only from then on: a sequence writes only positions past
 * the prefix it attached, and those lie in blocks it allocated itself. When another sequence
 * has published the same content first, ours stays private (freed when released) unless the
 * entry lost a block to eviction, which ours then replaces.
 *
 * Eviction order: released blocks join the LRU list's tail, last logical block first
 * (kv.c release_range), so a chain is evicted from its end and its shared beginning survives
 * longest. An evicted block leaves its entry (and the entry goes when it has no block left);
 * later entries of that chain become unreachable by lookup and age out the same way.
 *
 * Nothing here allocates after kv_prefix_init. Owned by the engine thread like all of kv/. */
#include "kv/kv_impl.h"

#include "krserve.h"
#include "util/alloc.h"

#include <string.h>

/* ---- LRU list of cached blocks that no table holds ------------------------------------ */

static void lru_remove(struct kv_group *g, int32_t b)
{
    int32_t p = g->lru_prev[b], n = g->lru_next[b];
    if (p >= 0)
        g->lru_next[p] = n;
    else
        g->lru_head = n;
    if (n >= 0)
        g->lru_prev[n] = p;
    else
        g->lru_tail = p;
    g->lru_prev[b] = g->lru_next[b] = -1;
    g->n_lru--;
}

static void lru_push_tail(struct kv_group *g, int32_t b)
{
    g->lru_prev[b] = g->lru_tail;
    g->lru_next[b] = -1;
    if (g->lru_tail >= 0)
        g->lru_next[g->lru_tail] = b;
    else
        g->lru_head = b;
    g->lru_tail = b;
    g->n_lru++;
}

/* ---- entries ---------------------------------------------------------------------------- */

static uint64_t hash_block(uint64_t h, const int32_t *tok, int n)
{
    for (int i = 0; i < n; i++) {
        h ^= (uint32_t)tok[i];
        h *= 0x100000001b3ull;
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static int32_t *entry_tokens(struct kv_cache *kv, int32_t e)
{
    return kv->px.tokens + (size_t)e * (size_t)kv->block_size;
}

static int32_t lookup(struct kv_cache *kv, int32_t parent, uint64_t hash, const int32_t *tok)
{
    struct kv_prefix *px = &kv->px;
    uint32_t parent_gen = parent >= 0 ? px->entries[parent].gen : 0;
    for (int32_t e = px->buckets[hash & px->bucket_mask]; e >= 0; e = px->entries[e].next) {
        const struct kv_entry *x = &px->entries[e];
        if (x->hash == hash && x->parent == parent && x->parent_gen == parent_gen &&
            !memcmp(entry_tokens(kv, e), tok, (size_t)kv->block_size * sizeof *tok))
            return e;
    }
    return -1;
}

static int32_t entry_new(struct kv_cache *kv, int32_t parent, uint64_t hash, const int32_t *tok)
{
    struct kv_prefix *px = &kv->px;
    int32_t e = px->free_entry;
    if (e < 0) return -1; /* cannot happen: every live entry owns a block */
    struct kv_entry *x = &px->entries[e];
    px->free_entry = x->next;
    x->hash = hash;
    x->parent = parent;
    x->parent_gen = parent >= 0 ? px->entries[parent].gen : 0;
    x->phys[0] = x->phys[1] = -1;
    x->in_use = 1;
    memcpy(entry_tokens(kv, e), tok, (size_t)kv->block_size * sizeof *tok);
    int32_t *head = &px->buckets[hash & px->bucket_mask];
    x->next = *head;
    *head = e;
    return e;
}

static void entry_free(struct kv_cache *kv, int32_t e)
{
    struct kv_prefix *px = &kv->px;
    struct kv_entry *x = &px->entries[e];
    int32_t *pp = &px->buckets[x->hash & px->bucket_mask];
    while (*pp != e) pp = &px->entries[*pp].next;
    *pp = x->next;
    x->gen++;
    x->in_use = 0;
    x->next = px->free_entry;
    px->free_entry = e;
}

/* Drops the least recently used unheld cached block of group gi from the cache and returns it
 * (no longer on any list). The LRU list must not be empty. */
static int32_t evict_one(struct kv_cache *kv, int gi)
{
    struct kv_group *g = &kv->g[gi];
    int32_t b = g->lru_head;
    lru_remove(g, b);
    int32_t e = g->owner[b];
    struct kv_entry *x = &kv->px.entries[e];
    x->phys[gi] = -1;
    g->owner[b] = -1;
    g->n_cached--;
    g->evictions++;
    if (x->phys[0] < 0 && x->phys[1] < 0) entry_free(kv, e);
    return b;
}

static void attach_block(struct kv_group *g, int32_t e, int32_t b)
{
    g->owner[b] = e;
    g->n_cached++;
}

/* ---- kv.c hooks ------------------------------------------------------------------------- */

int32_t kv_block_take(struct kv_cache *kv, int gi)
{
    struct kv_group *g = &kv->g[gi];
    if (g->n_free > 0) return g->free_stack[--g->n_free];
    return evict_one(kv, gi);
}

void kv_block_unheld(struct kv_cache *kv, int gi, int32_t b)
{
    struct kv_group *g = &kv->g[gi];
    if (g->owner[b] < 0) {
        g->free_stack[g->n_free++] = b;
        return;
    }
    lru_push_tail(g, b);
    if (kv->px.max_unheld > 0 && g->n_lru > kv->px.max_unheld)
        g->free_stack[g->n_free++] = evict_one(kv, gi);
}

void kv_prefix_seq_reset(struct kv_cache *kv, int seq)
{
    struct kv_prefix *px = &kv->px;
    if (!px->enabled) return;
    px->pub_blocks[seq] = 0;
    px->pub_entry[seq] = -1;
    px->pub_hash[seq] = px->salt;
}

int kv_prefix_init(struct kv_cache *kv, const struct kv_config *cfg)
{
    struct kv_prefix *px = &kv->px;
    if (!cfg->prefix_cache) return KRS_OK;
    if (cfg->prefix_max_tokens < 0) return KRS_ERR_INVALID;
    px->enabled = 1;
    px->salt = cfg->prefix_salt ^ 0x6b727370726566ull; /* "krspref" */
    px->max_unheld = (cfg->prefix_max_tokens + kv->block_size - 1) / kv->block_size;
    int64_t n = kv->g[0].n_blocks + kv->g[1].n_blocks;
    uint32_t nb = 1;
    while (nb < 2 * n) nb <<= 1;
    px->n_entries = (int32_t)n;
    px->bucket_mask = nb - 1;
    px->entries = alloc_calloc((size_t)n, sizeof *px->entries);
    px->tokens = alloc_malloc((size_t)n * (size_t)kv->block_size * sizeof *px->tokens);
    px->buckets = alloc_malloc((size_t)nb * sizeof *px->buckets);
    px->pub_blocks = alloc_calloc((size_t)kv->max_seqs, sizeof *px->pub_blocks);
    px->pub_entry = alloc_malloc((size_t)kv->max_seqs * sizeof *px->pub_entry);
    px->pub_hash = alloc_malloc((size_t)kv->max_seqs * sizeof *px->pub_hash);
    px->match = alloc_malloc((size_t)kv->max_blocks * sizeof *px->match);
    if (!px->entries || !px->tokens || !px->buckets || !px->pub_blocks || !px->pub_entry ||
        !px->pub_hash || !px->match)
        return KRS_ERR_NOMEM;
    for (uint32_t i = 0; i < nb; i++) px->buckets[i] = -1;
    for (int32_t e = 0; e < px->n_entries; e++)
        px->entries[e].next = e + 1 < px->n_entries ? e + 1 : -1;
    px->free_entry = 0;
    for (int s = 0; s < kv->max_seqs; s++) kv_prefix_seq_reset(kv, s);
    return KRS_OK;
}

void kv_prefix_free(struct kv_cache *kv)
{
    struct kv_prefix *px = &kv->px;
    alloc_free(px->entries);
    alloc_free(px->tokens);
    alloc_free(px->buckets);
    alloc_free(px->pub_blocks);
    alloc_free(px->pub_entry);
    alloc_free(px->pub_hash);
    alloc_free(px->match);
}

/* ---- public ------------------------------------------------------------------------------ */

/* 1 when a sequence at position k*bs finds every block it needs in the entries m[0..k): all
 * full-layer blocks, and the sliding blocks its window still sees. */
static int prefix_usable(const struct kv_cache *kv, const int32_t *m, int64_t k)
{
    const struct kv_entry *e = kv->px.entries;
    int64_t lo = 0;
    if (kv->g[1].n_layers) {
        int64_t first = k * kv->block_size - kv->n_swa + 1;
        lo = first > 0 ? first / kv->block_size : 0;
    }
    for (int64_t j = 0; j < k; j++) {
        if (kv->g[0].n_layers && e[m[j]].phys[0] < 0) return 0;
        if (kv->g[1].n_layers && j >= lo && e[m[j]].phys[1] < 0) return 0;
    }
    return 1;
}

int kv_seq_attach_prefix(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_tokens,
                         int64_t *n_cached)
{
    *n_cached = 0;
    if (seq < 0 || seq >= kv->max_seqs || n_tokens < 0) return KRS_ERR_INVALID;
    for (int gi = 0; gi < 2; gi++)
        if (kv->g[gi].n_layers && kv->g[gi].held[seq]) return KRS_ERR_INVALID;
    struct kv_prefix *px = &kv->px;
    if (!px->enabled) return KRS_OK;
    const int bs = kv->block_size;
    int64_t limit = n_tokens > 0 ? (n_tokens - 1) / bs : 0;
    if (limit > kv->max_blocks) limit = kv->max_blocks;
    px->lookups++;
    px->lookup_tokens += (uint64_t)n_tokens;
    /* The chain of published entries along tokens, then the longest usable part of it. */
    int64_t k = 0;
    uint64_t h = px->salt;
    int32_t parent = -1;
    for (; k < limit; k++) {
        const int32_t *t = tokens + k * bs;
        uint64_t hk = hash_block(h, t, bs);
        int32_t e = lookup(kv, parent, hk, t);
        if (e < 0) break;
        px->match[k] = e;
        parent = e;
        h = hk;
    }
    while (k > 0 && !prefix_usable(kv, px->match, k)) k--;
    if (k == 0) return KRS_OK;
    int64_t lo = 0;
    if (kv->g[1].n_layers) {
        int64_t first = k * bs - kv->n_swa + 1;
        lo = first > 0 ? first / bs : 0;
    }
    for (int gi = 0; gi < 2; gi++) {
        struct kv_group *g = &kv->g[gi];
        if (!g->n_layers) continue;
        int32_t *t = g->tables + (size_t)seq * (size_t)kv->max_blocks;
        for (int64_t j = gi ? lo : 0; j < k; j++) {
            int32_t b = px->entries[px->match[j]].phys[gi];
            if (g->refs[b]++ == 0) lru_remove(g, b);
            t[j] = b;
            g->held[seq]++;
        }
    }
    px->pub_blocks[seq] = k;
    px->pub_entry[seq] = px->match[k - 1];
    px->pub_hash[seq] = px->entries[px->match[k - 1]].hash;
    px->hits++;
    px->hit_tokens += (uint64_t)(k * bs);
    *n_cached = k * bs;
    return KRS_OK;
}

/* Publishes seq's blocks that are complete below n_done. */
static void publish(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_done)
{
    struct kv_prefix *px = &kv->px;
    const int bs = kv->block_size;
    for (int64_t b = px->pub_blocks[seq]; (b + 1) * bs <= n_done && b < kv->max_blocks; b++) {
        const int32_t *t = tokens + b * bs;
        uint64_t h = hash_block(px->pub_hash[seq], t, bs);
        int32_t e = lookup(kv, px->pub_entry[seq], h, t);
        for (int gi = 0; gi < 2; gi++) {
            struct kv_group *g = &kv->g[gi];
            if (!g->n_layers) continue;
            int32_t phys = g->tables[(size_t)seq * (size_t)kv->max_blocks + (size_t)b];
            if (phys < 0 || g->owner[phys] >= 0) continue;
            if (e < 0 && (e = entry_new(kv, px->pub_entry[seq], h, t)) < 0) return;
            if (px->entries[e].phys[gi] >= 0) continue; /* published by someone else first */
            px->entries[e].phys[gi] = phys;
            attach_block(g, e, phys);
        }
        if (e < 0) return; /* nothing to publish it with: the chain stops here for seq */
        px->pub_blocks[seq] = b + 1;
        px->pub_entry[seq] = e;
        px->pub_hash[seq] = h;
    }
}

void kv_seq_commit(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_done)
{
    if (seq < 0 || seq >= kv->max_seqs) return;
    if (kv->px.enabled && tokens) publish(kv, seq, tokens, n_done);
    kv_seq_trim(kv, seq, n_done);
}
