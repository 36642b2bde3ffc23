/* Private structures of kv/: the two block pools, the per-sequence tables and the prefix
 * cache's entries. Shared by kv.c (allocator, tables) and kv_prefix.c (content addressing). */
#ifndef KRS_KV_IMPL_H
#define KRS_KV_IMPL_H

#include "kv/kv.h"

struct kv_group {
    int n_layers;
    int64_t n_blocks;
    int64_t n_free;
    int32_t *free_stack; /* [n_blocks] physical blocks no table holds and no entry caches */
    int32_t *tables;     /* [max_seqs][max_blocks_per_seq] */
    int64_t *held;       /* [max_seqs] blocks held */
    /* Per physical block: tables holding it, and the cache entry it belongs to (-1 = private
     * to its one holder). A cached block that no table holds sits on the LRU list (evictable);
     * the allocator takes the list's head when the free stack is empty. */
    int32_t *refs;     /* [n_blocks] */
    int32_t *owner;    /* [n_blocks] entry, -1 = none */
    int32_t *lru_prev; /* [n_blocks] */
    int32_t *lru_next; /* [n_blocks] */
    int32_t lru_head, lru_tail;
    int64_t n_lru;
    int64_t n_cached; /* blocks with an owner entry, held or not */
    uint64_t evictions;
};

/* One content-addressed logical block: the KV of `block_size` tokens at positions
 * [depth*bs, (depth+1)*bs) given every token before them. Identified by (parent entry, parent
 * generation, its tokens); the chain hash only speeds the lookup. */
struct kv_entry {
    uint64_t hash;
    int32_t parent; /* entry of the previous block, -1 for block 0 */
    uint32_t parent_gen;
    uint32_t gen;    /* bumped when the entry is freed, so stale children never match */
    int32_t phys[2]; /* physical block per group, -1 = none (evicted or never had one) */
    int32_t next;    /* hash-bucket chain, or free-list link */
    int32_t in_use;
};

struct kv_prefix {
    int enabled;
    uint64_t salt;
    int64_t max_unheld;       /* most evictable blocks kept per group (0 = no cap) */
    struct kv_entry *entries; /* [n_entries] */
    int32_t *tokens;          /* [n_entries][block_size] */
    int32_t n_entries, free_entry;
    int32_t *buckets; /* [n_buckets], -1 = empty */
    uint32_t bucket_mask;
    /* Per sequence: how far its blocks are published, and the chain state at that point. */
    int64_t *pub_blocks; /* [max_seqs] */
    int32_t *pub_entry;  /* [max_seqs] */
    uint64_t *pub_hash;  /* [max_seqs] */
    int32_t *match;      /* [max_blocks] lookup scratch */
    uint64_t lookups, lookup_tokens, hit_tokens, hits;
};

struct kv_cache {
    int n_layers;
    uint8_t *is_swa;  /* [n_layers] */
    int *group_layer; /* [n_layers] index within its group */
    int n_swa;
    int kv_dim;
    int block_size;
    int elem_bytes;
    int max_seqs;
    int max_ctx;
    int max_blocks;       /* per sequence */
    struct kv_group g[2]; /* 0 = full, 1 = sliding */
    struct kv_prefix px;
};

/* kv_prefix.c, for kv.c: */
int kv_prefix_init(struct kv_cache *kv, const struct kv_config *cfg);
void kv_prefix_free(struct kv_cache *kv);
/* Physical block `b` of group gi is no longer held by any table: cache it (LRU) or free it. */
void kv_block_unheld(struct kv_cache *kv, int gi, int32_t b);
/* A block for a table: the free stack first, else the least recently used cached block. */
int32_t kv_block_take(struct kv_cache *kv, int gi);
/* Forgets seq's publishing state (its table is empty again). */
void kv_prefix_seq_reset(struct kv_cache *kv, int seq);

#endif
