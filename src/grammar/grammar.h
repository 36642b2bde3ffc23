/* grammar/: constrained decoding. A request's output format (a JSON Schema, "any JSON object",
 * or a GBNF grammar) is compiled once into a context-free grammar; a per-sequence matcher then
 * follows the generated tokens and, before each sampling step, gives the set of tokens that
 * keep the output inside the grammar as a bitmask over the vocabulary.
 *
 * Pieces:
 *   grammar_compile_gbnf        GBNF text (llama.cpp's dialect, docs/api.md) -> grammar
 *   grammar_compile_json_schema JSON Schema (the subset in grammar_schema.c) -> GBNF -> grammar
 *   grammar_vocab               every token's bytes, sorted (one per model, built at load)
 *   grammar_matcher             one per constrained sequence: the position in the grammar, a
 *                               lazily built byte-level automaton over the grammar's states and
 *                               a cache of token masks per state (grammar_match.c)
 *
 * Masks: bit t of word t/32 set = token t allowed. Tokens whose text is empty (control and
 * unused tokens) are never allowed; the end-of-generation tokens are allowed exactly when the
 * text so far is a complete sentence of the grammar. The matcher sees each token's bytes as the
 * tokenizer renders them (tokenizer_token_piece without specials).
 *
 * Masks are cached under a key that ignores what no token can reach: a length or item counter
 * further from its bound than the longest token (the few longest tokens, checked one by one,
 * aside), and the part of the document below that many code points. Two states with one key
 * have byte-identical masks.
 *
 * Memory: a matcher reserves its automaton and mask cache at creation (about 7 MB) and never
 * allocates afterwards; when the automaton outgrows them it is flushed and rebuilt from the
 * current state (only speed is lost).
 *
 * Threads: grammars and vocabularies are immutable after creation and may be shared; a
 * grammar is reference-counted (grammar_retain / grammar_release, atomic). A matcher is used by
 * one thread at a time. The one mutable part of a vocabulary is the mask cache its matchers
 * share (masks by grammar text and mask key, about 8 MB, reserved at creation), internally
 * locked: matchers on different threads use it at once. */
#ifndef KRS_GRAMMAR_H
#define KRS_GRAMMAR_H

#include <stddef.h>
#include <stdint.h>

struct tokenizer;
struct grammar;
struct grammar_vocab;
struct grammar_matcher;

/* Compiles GBNF text whose start rule is "root". KRS_ERR_INVALID with a one-line reason in err
 * (syntax, undefined rule, left recursion, a rule that derives no finite text). The caller owns
 * *out (one reference). */
int grammar_compile_gbnf(const char *text, size_t len, struct grammar **out, char *err,
                         size_t errlen);

/* Compiles a JSON Schema given as JSON text. Unsupported keywords are KRS_ERR_UNSUPPORTED with
 * err naming the keyword; malformed schemas KRS_ERR_INVALID. schema NULL: any JSON object
 * (response_format json_object). The GBNF text it compiled is kept (grammar_text). */
int grammar_compile_json_schema(const char *schema, size_t len, struct grammar **out, char *err,
                                size_t errlen);

/* Writes the GBNF that the JSON Schema compiles to into a new NUL-terminated string (alloc_free).
 * Same errors as grammar_compile_json_schema. For tests, docs and debugging. */
int grammar_schema_to_gbnf(const char *schema, size_t len, char **out, char *err, size_t errlen);

/* The grammar a request asks for, shared by the front ends (OpenAI and JSON-RPC): rf is the
 * request's "response_format" (absent/null or {"type":"text"}: none; {"type":"json_object"};
 * {"type":"json_schema","json_schema":{"schema":{...}}}), gbnf its "grammar" (a GBNF string);
 * both given is an error. KRS_OK with *out NULL when the output is unconstrained. Errors:
 * KRS_ERR_INVALID or KRS_ERR_UNSUPPORTED with *param the request field to blame and err the
 * reason (naming the unsupported keyword). The caller owns *out. */
struct cJSON;
int grammar_from_request(const struct cJSON *rf, const struct cJSON *gbnf, struct grammar **out,
                         const char **param, char *err, size_t errlen);

struct grammar *grammar_retain(struct grammar *g);
/* The GBNF text g was compiled from (a JSON Schema's compiled GBNF); owned by g. Two grammars
 * with the same text constrain the same way (the scheduler's dedup compares them so). */
const char *grammar_source(const struct grammar *g);
void grammar_release(struct grammar *g); /* NULL is a no-op; frees at the last reference */

/* Every token's text for the matchers of one model. The caller owns *out. */
int grammar_vocab_create(const struct tokenizer *tok, struct grammar_vocab **out);
void grammar_vocab_free(struct grammar_vocab *v);
int32_t grammar_vocab_size(const struct grammar_vocab *v);

/* A matcher at the start of g over vocab v (both borrowed: g is retained until the matcher is
 * freed; v must outlive it). */
int grammar_matcher_create(struct grammar *g, const struct grammar_vocab *v,
                           struct grammar_matcher **out);
void grammar_matcher_free(struct grammar_matcher *m);

/* The allowed-token mask for the next token: *mask points at n_vocab bits (ceil(n_vocab/32)
 * words) owned by the matcher, valid until the next call on m. *n_allowed: number of allowed
 * tokens (0: the grammar cannot go on with this vocabulary). KRS_ERR_INTERNAL when the grammar
 * is too complex for the matcher's reserved memory. */
int grammar_matcher_mask(struct grammar_matcher *m, const uint32_t **mask, int32_t *n_allowed);

/* Advances over token t. KRS_ERR_INVALID (state unchanged) when t is not allowed here. */
int grammar_matcher_accept(struct grammar_matcher *m, int32_t token);

/* 1 when the text so far is a complete sentence of the grammar that no token can extend
 * (generation should stop), else 0. */
int grammar_matcher_done(const struct grammar_matcher *m);
/* 1 when the text so far is a complete sentence (an end-of-generation token is allowed). */
int grammar_matcher_accepting(const struct grammar_matcher *m);

/* Statistics of one matcher (for the bench and tests). */
struct grammar_matcher_stats {
    uint64_t masks, mask_hits; /* mask calls, and those answered from the cache */
    uint64_t mask_same;        /* hits that were the previous call's mask */
    uint64_t mask_shared;      /* local misses copied from the vocabulary's shared cache */
    uint64_t mask_keys;        /* distinct mask keys (grammar_match.c) built */
    uint64_t states, flushes;  /* automaton states built, and times it was rebuilt */
    uint64_t mask_ns;          /* time spent computing masks (misses) */
};
void grammar_matcher_get_stats(const struct grammar_matcher *m, struct grammar_matcher_stats *out);

#endif
