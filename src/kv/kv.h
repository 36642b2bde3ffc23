/* Paged KV cache bookkeeping: the block allocator and per-sequence block tables. The blocks'
 * storage lives in the compute backend (backend.h kv_reserve / kv_store / attention), which reads
 * the tables this module keeps; kv/ never touches K or V values.
 *
 * Layers are split into two groups that own separate pools: "full" layers (attend to every
 * earlier position) and sliding-window layers (attend to the last n_swa positions only). A
 * sequence holds full-group blocks for its whole history, but sliding-group blocks only for the
 * positions its window can still see: kv_seq_trim returns the older ones to the pool, so a long
 * Gemma 3 conversation costs its sliding layers a bounded number of blocks. Architectures without
 * sliding layers use only the full group.
 *
 * Logical block b of a sequence holds positions [b*block_size, (b+1)*block_size) for every layer
 * of its group; its table entry names the physical block (0 .. blocks_total-1) in the backend's
 * pool of that group.
 *
 * Running out of blocks is a status (KRS_ERR_AGAIN) that the scheduler acts on (wait, preempt);
 * kv_seq_reserve is all-or-nothing so a failed reserve changes nothing.
 *
 * Prefix cache (kv_prefix.c, when kv_config.prefix_cache is set): once every position of a
 * logical block has been computed (kv_seq_commit), the block is published under its content:
 * the chain hash of its tokens and of every token before it, seeded with prefix_salt (the
 * model's identity and whatever else changes KV). A new sequence maps the longest published
 * prefix of its tokens onto its table (kv_seq_attach_prefix) instead of recomputing it; the
 * physical blocks are then shared, reference-counted, and never written again (a sequence only
 * writes positions past what it attached, in blocks of its own; a partial last block is never
 * published, it is recomputed). Blocks no table holds stay cached on an LRU list and are
 * evicted, least recently used first, when a reserve needs memory or the size cap is exceeded.
 * Sliding-window layers: an attach needs only the sliding blocks its window still sees, and a
 * trimmed sliding block stays cached for later sequences whose window needs it.
 *
 * Threading: owned by the engine thread. */
#ifndef KRS_KV_H
#define KRS_KV_H

#include <stddef.h>
#include <stdint.h>

struct kv_config {
    int n_layers;
    const uint8_t *layer_is_swa; /* [n_layers], 1 = sliding-window layer; NULL = none; copied */
    int n_swa;                   /* window in positions (query p sees keys p-n_swa+1 .. p) */
    int n_kv_heads;
    int head_dim;         /* K and V row width per head */
    int block_size;       /* positions per block, e.g. 16 */
    int64_t n_tokens;     /* capacity of the full-layer pool, in positions */
    int64_t n_tokens_swa; /* capacity of the sliding pool (0 = same as n_tokens) */
    int max_seqs;         /* sequence slots 0 .. max_seqs-1 */
    int max_ctx;          /* longest sequence, in positions */
    int elem_bytes;       /* bytes per stored K or V element in the backend (for stats); 0 = 4 */
    int prefix_cache;     /* 1: publish computed blocks for reuse by later sequences */
    uint64_t prefix_salt; /* identity of what the KV depends on besides the tokens (model) */
    int64_t prefix_max_tokens; /* most positions per pool kept cached while no sequence holds
                                * them; 0 = as many as the pool has room for */
};

struct kv_group_stats {
    int n_layers;
    int64_t blocks_total;
    int64_t blocks_free;      /* available to a reserve: unused + evictable cached blocks */
    int64_t blocks_cached;    /* published blocks, held by a sequence or not */
    int64_t blocks_evictable; /* published blocks no sequence holds (part of blocks_free) */
    uint64_t evictions;       /* cached blocks dropped to make room (or over the size cap) */
};

struct kv_prefix_stats {
    int enabled;
    uint64_t lookups;       /* kv_seq_attach_prefix calls */
    uint64_t hits;          /* ... that attached at least one block */
    uint64_t lookup_tokens; /* tokens they were asked about */
    uint64_t hit_tokens;    /* tokens they attached */
};

struct kv_stats {
    struct kv_group_stats full;
    struct kv_group_stats swa;
    int block_size;
    uint64_t bytes; /* K+V storage the backend reserves for these pools */
    struct kv_prefix_stats prefix;
};

struct kv_cache;

/* Reserves every pool up front. The caller owns *out (kv_free). */
int kv_create(const struct kv_config *cfg, struct kv_cache **out);
void kv_free(struct kv_cache *kv);

/* Makes sure seq can write and attend positions [pos_begin, pos_end): allocates its missing
 * full-group blocks up to pos_end and sliding-group blocks from pos_begin - n_swa + 1. All or
 * nothing: KRS_ERR_AGAIN (nothing changed) when a pool lacks free blocks; KRS_ERR_INVALID for a
 * bad slot or pos_end > max_ctx. */
int kv_seq_reserve(struct kv_cache *kv, int seq, int64_t pos_begin, int64_t pos_end);
/* Blocks kv_seq_reserve would take from each pool right now (for admission decisions). */
void kv_seq_blocks_needed(const struct kv_cache *kv, int seq, int64_t pos_begin, int64_t pos_end,
                          int64_t *full, int64_t *swa);
/* Returns sliding-group blocks that no query at position >= next_pos can see. */
void kv_seq_trim(struct kv_cache *kv, int seq, int64_t next_pos);
/* Prefix cache: maps onto seq (which must hold nothing) the longest published prefix of
 * tokens[0..n_tokens) whose blocks are all present, leaving at least one token to compute
 * (so the caller gets logits). *n_cached gets the positions attached (a multiple of the block
 * size, 0 on a miss or with the cache off); the caller computes from there. KRS_ERR_INVALID
 * for a bad slot or a sequence that already holds blocks. tokens are read, not kept. */
int kv_seq_attach_prefix(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_tokens,
                         int64_t *n_cached);
/* After a step: positions [0, n_done) of seq hold the KV of tokens[0..n_done). Publishes the
 * blocks that became complete (prefix cache on), then trims like kv_seq_trim(n_done). */
void kv_seq_commit(struct kv_cache *kv, int seq, const int32_t *tokens, int64_t n_done);
/* Returns every block of seq to the pools (published ones stay cached). Idempotent. */
void kv_seq_release(struct kv_cache *kv, int seq);

/* Physical blocks in group g's pool (0 when the group has no layers). */
int64_t kv_group_blocks(const struct kv_cache *kv, int g);
/* Entries of a sequence's block table (max_ctx / block_size rounded up). */
int kv_max_blocks(const struct kv_cache *kv);
/* seq's block table in group g: kv_max_blocks entries, -1 = not held. Owned by kv, valid until
 * the next reserve / trim / release of that sequence. NULL for a group without layers. */
const int32_t *kv_seq_table(const struct kv_cache *kv, int g, int seq);
/* 1 when (seq, pos) has a block in the group of `layer`, else 0 (bad arguments give 0). */
int kv_seq_holds(const struct kv_cache *kv, int layer, int seq, int64_t pos);

int kv_block_size(const struct kv_cache *kv);
void kv_get_stats(const struct kv_cache *kv, struct kv_stats *out);
/* Blocks held by seq in each group (for tests and the registry). */
void kv_seq_blocks_held(const struct kv_cache *kv, int seq, int64_t *full, int64_t *swa);

#endif
