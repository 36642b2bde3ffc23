/* The mask cache shared by every matcher of one vocabulary: masks by (grammar text, mask key).
 *
 * A mask key (grammar_match.c, "Mask keys") names grammar elements by rule id and terminal,
 * never by a matcher's state ids, so the same key in two matchers of grammars compiled from
 * the same text (rule ids follow the text) has the same mask over the same vocabulary. The
 * batch's rows of one schema, and the next request with that schema, then find the masks
 * another row computed. Each matcher keeps its own small cache in front of this one; this one
 * is asked only on a local miss and filled after a computed mask.
 *
 * Owns: a fixed table of GCACHE_SLOTS entries reserved at creation (masks, keys), a
 * reference on the grammar of each filled entry (dropped when the entry is replaced or the
 * cache freed), and a reader-writer lock: lookups copy a mask out under the read lock, fills
 * take the write lock. Keys longer than GCACHE_KEY_WORDS are not shared. Must not: allocate
 * after creation, or hand out pointers into the table (an entry may be replaced at once). */
#include "grammar/grammar_impl.h"

#include "krserve.h"
#include "util/alloc.h"

#include <pthread.h>
#include <string.h>

#define GCACHE_SLOTS     256
#define GCACHE_MAX_BYTES (8u << 20) /* masks: fewer slots for a large vocabulary */
#define GCACHE_KEY_WORDS 512
#define GCACHE_HASH      1024 /* power of two, >= 2 * GCACHE_SLOTS */

struct gcache_entry {
    struct grammar *g; /* NULL: empty; else one reference */
    uint64_t text_hash;
    uint32_t key_hash, key_len;
    int32_t n_allowed;
    uint8_t ref; /* clock bit */
};

struct grammar_mask_cache {
    pthread_rwlock_t lock;
    int32_t n_words, n_slots;
    struct gcache_entry *e; /* [n_slots] */
    uint32_t *keys;         /* [n_slots][GCACHE_KEY_WORDS] */
    uint32_t *masks;        /* [n_slots][n_words] */
    int16_t *hash;          /* [GCACHE_HASH] slot ids, -1 empty; rebuilt on replacement */
    int clock_hand;
};

int grammar_mask_cache_create(int32_t n_words, struct grammar_mask_cache **out)
{
    *out = NULL;
    struct grammar_mask_cache *c = alloc_calloc(1, sizeof *c);
    if (!c) return KRS_ERR_NOMEM;
    size_t per = (size_t)n_words * sizeof(uint32_t);
    c->n_words = n_words;
    c->n_slots = GCACHE_SLOTS;
    if ((size_t)c->n_slots * per > GCACHE_MAX_BYTES) c->n_slots = (int32_t)(GCACHE_MAX_BYTES / per);
    if (c->n_slots < 16) c->n_slots = 16;
    c->e = alloc_calloc((size_t)c->n_slots, sizeof *c->e);
    c->keys = alloc_malloc((size_t)c->n_slots * GCACHE_KEY_WORDS * sizeof *c->keys);
    c->masks = alloc_malloc((size_t)c->n_slots * per);
    c->hash = alloc_malloc(GCACHE_HASH * sizeof *c->hash);
    if (!c->e || !c->keys || !c->masks || !c->hash || pthread_rwlock_init(&c->lock, NULL)) {
        alloc_free(c->e);
        alloc_free(c->keys);
        alloc_free(c->masks);
        alloc_free(c->hash);
        alloc_free(c);
        return KRS_ERR_NOMEM;
    }
    memset(c->hash, 0xFF, GCACHE_HASH * sizeof *c->hash);
    *out = c;
    return KRS_OK;
}

void grammar_mask_cache_free(struct grammar_mask_cache *c)
{
    if (!c) return;
    for (int32_t i = 0; i < c->n_slots; i++) grammar_release(c->e[i].g);
    pthread_rwlock_destroy(&c->lock);
    alloc_free(c->e);
    alloc_free(c->keys);
    alloc_free(c->masks);
    alloc_free(c->hash);
    alloc_free(c);
}

static int same_grammar(const struct gcache_entry *e, const struct grammar *g)
{
    return e->g == g || (e->text_hash == g->text_hash && !strcmp(e->g->text, g->text));
}

/* The slot holding (g, key), or -1. Under either lock. */
static int find(const struct grammar_mask_cache *c, const struct grammar *g, const uint32_t *key,
                uint32_t len, uint32_t h)
{
    for (uint32_t i = h & (GCACHE_HASH - 1); c->hash[i] >= 0; i = (i + 1) & (GCACHE_HASH - 1)) {
        const struct gcache_entry *e = &c->e[c->hash[i]];
        if (e->key_hash == h && e->key_len == len && same_grammar(e, g) &&
            !memcmp(c->keys + (size_t)c->hash[i] * GCACHE_KEY_WORDS, key, len * sizeof *key))
            return c->hash[i];
    }
    return -1;
}

int grammar_mask_cache_get(struct grammar_mask_cache *c, const struct grammar *g,
                           const uint32_t *key, uint32_t len, uint32_t h, uint32_t *mask,
                           int32_t *n_allowed)
{
    if (len > GCACHE_KEY_WORDS) return 0;
    pthread_rwlock_rdlock(&c->lock);
    int slot = find(c, g, key, len, h);
    if (slot >= 0) {
        memcpy(mask, c->masks + (size_t)slot * (size_t)c->n_words,
               (size_t)c->n_words * sizeof *mask);
        *n_allowed = c->e[slot].n_allowed;
        /* a benign race between readers: every writer stores 1 */
        __atomic_store_n(&c->e[slot].ref, 1, __ATOMIC_RELAXED);
    }
    pthread_rwlock_unlock(&c->lock);
    return slot >= 0;
}

void grammar_mask_cache_put(struct grammar_mask_cache *c, struct grammar *g, const uint32_t *key,
                            uint32_t len, uint32_t h, const uint32_t *mask, int32_t n_allowed)
{
    if (len > GCACHE_KEY_WORDS) return;
    struct grammar *old = NULL;
    pthread_rwlock_wrlock(&c->lock);
    if (find(c, g, key, len, h) < 0) { /* another row may have put it meanwhile */
        int slot;
        for (;;) { /* clock eviction */
            slot = c->clock_hand;
            c->clock_hand = (c->clock_hand + 1) % c->n_slots;
            if (!c->e[slot].ref) break;
            c->e[slot].ref = 0;
        }
        struct gcache_entry *e = &c->e[slot];
        old = e->g;
        *e = (struct gcache_entry){grammar_retain(g), g->text_hash, h, len, n_allowed, 1};
        memcpy(c->keys + (size_t)slot * GCACHE_KEY_WORDS, key, len * sizeof *key);
        memcpy(c->masks + (size_t)slot * (size_t)c->n_words, mask,
               (size_t)c->n_words * sizeof *mask);
        /* open addressing without tombstones: rebuild the small index */
        memset(c->hash, 0xFF, GCACHE_HASH * sizeof *c->hash);
        for (int32_t i = 0; i < c->n_slots; i++) {
            if (!c->e[i].g) continue;
            uint32_t j = c->e[i].key_hash & (GCACHE_HASH - 1);
            while (c->hash[j] >= 0) j = (j + 1) & (GCACHE_HASH - 1);
            c->hash[j] = (int16_t)i;
        }
    }
    pthread_rwlock_unlock(&c->lock);
    grammar_release(old); /* outside the lock: it may free the grammar */
}

void grammar_mask_cache_clear(struct grammar_mask_cache *c)
{
    pthread_rwlock_wrlock(&c->lock);
    for (int32_t i = 0; i < c->n_slots; i++) {
        grammar_release(c->e[i].g);
        c->e[i] = (struct gcache_entry){0};
    }
    memset(c->hash, 0xFF, GCACHE_HASH * sizeof *c->hash);
    c->clock_hand = 0;
    pthread_rwlock_unlock(&c->lock);
}
