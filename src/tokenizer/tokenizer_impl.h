/* Private layout of struct tokenizer, shared by tokenizer.c (load, specials, decode), spm.c,
 * bpe.c and chat.c. Not for other modules: they use tokenizer.h. */
#ifndef KRS_TOKENIZER_IMPL_H
#define KRS_TOKENIZER_IMPL_H

#include "tokenizer/tokenizer.h"

#include <stddef.h>
#include <stdint.h>

enum tok_kind { TOK_SPM = 1, TOK_BPE = 2 };
enum tok_pre { PRE_GPT2 = 0, PRE_LLAMA3 = 1, PRE_QWEN2 = 2 };

#define TOK_MAX_EOG 16

/* Open-addressing hash of a merge pair (left id, right id) -> rank and result id. */
struct tok_merge {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty slot */
    int32_t rank;
    int32_t result; /* id of left+right text, -1 if not in the vocabulary */
};

struct tok_slot {
    int32_t id;   /* -1: empty */
    uint32_t tag; /* high bits of the hash, compared before the text */
};

struct tok_inner {
    int32_t id;
    uint32_t at;
};

/* Byte trie over the special-token candidates (for finding which ones occur in a text). */
struct tok_trie_node {
    uint32_t child;   /* first child node index, 0 = none */
    uint32_t sibling; /* next sibling, 0 = none */
    int32_t cand;     /* candidate index ending here, -1 = none */
    uint8_t byte;
};

struct tokenizer {
    enum tok_kind kind;
    enum tok_pre pre;
    uint32_t n_vocab;

    char *text;     /* all token texts back to back, each followed by a NUL */
    uint32_t *off;  /* [n_vocab] offset of token i in text */
    uint32_t *len;  /* [n_vocab] its length */
    float *scores;  /* [n_vocab] SPM merge priority (0 when absent) */
    uint8_t *types; /* [n_vocab] TOKEN_TYPE_* */

    struct tok_slot *map; /* text -> id hash (open addressing, id -1 empty), map_mask + 1 slots */
    uint32_t map_mask;

    /* SPM: tokens with U+2581 past their first byte, as (id, byte offset of that U+2581) pairs.
     * A pair can only join symbols across an escaped space if one of these matches there, which
     * lets spm.c merge the text between such spaces independently (small, cache-warm heaps).
     * spm_split = 0 when there are too many of them to check. */
    struct tok_inner *inner;
    uint32_t n_inner;
    int spm_split;

    int32_t bos, eos, unk, eot, eom;
    int add_bos, add_eos, add_space_prefix, ignore_merges;
    int32_t eog[TOK_MAX_EOG];
    size_t n_eog;

    int32_t byte_tok[256];      /* SPM: id of <0xHH> (or of the 1-byte text, or unk, or -1);
                                   BPE: id of the byte's bytes_to_unicode character (or -1) */
    int16_t bpe_cp_byte[0x144]; /* BPE decode: code point -> byte (-1: not in the alphabet) */
    uint16_t bpe_byte_cp[256];  /* BPE: byte -> code point */

    /* Special-token candidates (CONTROL, USER_DEFINED, UNKNOWN) by length desc, id asc. */
    int32_t *cand;
    uint32_t n_cand;
    struct tok_trie_node *trie; /* node 0 is the root */
    uint32_t n_trie;
    uint32_t root[256]; /* root's child for each first byte, 0 = none */

    struct tok_merge *merges;
    uint32_t merges_mask; /* 0 when there are no merges */

    size_t max_piece;
    char *chat_template; /* NUL-terminated copy of tokenizer.chat_template, or NULL */
};

/* Ids are appended through a sink that counts past its capacity. */
struct tok_sink {
    int32_t *ids;
    size_t cap;
    size_t n;
};

static inline void tok_sink_push(struct tok_sink *s, int32_t id)
{
    if (s->n < s->cap) s->ids[s->n] = id;
    s->n++;
}

uint64_t tok_hash(const char *s, size_t len);
int32_t tok_lookup(const struct tokenizer *tok, const char *s, size_t len);

/* Encode one raw-text fragment (no special tokens in it). Return KRS_OK or KRS_ERR_NOMEM. */
int tok_spm_encode(const struct tokenizer *tok, const char *text, size_t len, int prefix_space,
                   struct tok_sink *out);
int tok_bpe_encode(const struct tokenizer *tok, const char *text, size_t len, struct tok_sink *out);

/* Fills cp_byte / byte_cp with GPT-2's bytes_to_unicode tables. */
void tok_bpe_tables(int16_t cp_byte[0x144], uint16_t byte_cp[256]);

#endif
