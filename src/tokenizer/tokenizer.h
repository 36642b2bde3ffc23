/* Tokenizers that reproduce llama.cpp's (and Hugging Face's) token ids, incremental UTF-8-safe
 * detokenization, and chat templates.
 *
 * Two vocabularies (tokenizer.ggml.model in the GGUF):
 *   "llama" -> SentencePiece BPE (Gemma 3, Llama 2): score-ordered bigram merges over UTF-8
 *              characters, ' ' -> U+2581, <0xHH> byte fallback, optional add_space_prefix.
 *   "gpt2"  -> byte-level BPE (Llama 3, Qwen2): regex pre-tokenizer chosen by tokenizer.ggml.pre
 *              ("llama-bpe"/"llama3"/..., "qwen2"/..., anything else: GPT-2's regex), GPT-2
 *              bytes_to_unicode mapping, merges by rank.
 * Special tokens: CONTROL and UNKNOWN tokens are recognised in text only when the caller passes
 * parse_special; USER_DEFINED tokens (e.g. Gemma's "\n\n", "<table>") are always recognised, as in
 * llama.cpp. User content must therefore be tokenized with parse_special = 0.
 *
 * Where this differs from llama.cpp or Hugging Face (all tested in tests/tokenizer/):
 *   - invalid UTF-8 becomes byte tokens byte by byte, so decode(encode(x)) == x for any bytes
 *     (llama.cpp groups by lead byte / turns BPE input into U+FFFD); valid UTF-8 is unaffected;
 *   - a literal U+2581 in SPM input is kept apart from escaped spaces (as llama.cpp does; HF
 *     treats it as a space) and decodes to ' ';
 *   - Gemma: runs of more than 31 spaces are cut longest-first by the USER_DEFINED space tokens
 *     (llama.cpp); HF's GGUF conversion merges them by BPE rank instead;
 *   - BPE tokenizer.ggml.pre "default" (or absent) uses GPT-2's regex, as HF does (llama.cpp has
 *     an odd multi-regex set for it); unknown pre names are KRS_ERR_UNSUPPORTED;
 *   - a BPE merge whose halves are not both tokens is ignored (it can never apply to token ids).
 *
 * Thread safety: a loaded tokenizer is immutable; every function below may be called from many
 * threads at once on the same tokenizer (encode allocates its scratch per call).
 *
 * Ownership: tokenizer_load copies everything it needs (token texts, scores, types, merges, the
 * chat template) out of the gguf_file, so the file may be closed right after loading. */
#ifndef KRS_TOKENIZER_H
#define KRS_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

struct gguf_file;
struct tokenizer;

enum tokenizer_token_type {
    TOKEN_TYPE_UNDEFINED = 0,
    TOKEN_TYPE_NORMAL = 1,
    TOKEN_TYPE_UNKNOWN = 2,
    TOKEN_TYPE_CONTROL = 3,
    TOKEN_TYPE_USER_DEFINED = 4,
    TOKEN_TYPE_UNUSED = 5,
    TOKEN_TYPE_BYTE = 6,
};

/* Builds a tokenizer from the tokenizer.* keys of an open GGUF. Returns KRS_ERR_FORMAT for
 * missing/ill-typed keys, KRS_ERR_UNSUPPORTED for another tokenizer.ggml.model, KRS_ERR_NOMEM;
 * writes a one-line reason into err (may be NULL). The caller owns *out (tokenizer_free). */
int tokenizer_load(const struct gguf_file *f, struct tokenizer **out, char *err, size_t errlen);
void tokenizer_free(struct tokenizer *tok);

/* Text to ids. add_special: add BOS/EOS as the vocabulary asks (tokenizer.ggml.add_bos_token /
 * add_eos_token). parse_special: turn the text of CONTROL tokens (e.g. "<start_of_turn>") into
 * those tokens; never set it for untrusted user text. Any bytes are accepted (invalid UTF-8
 * falls back to byte tokens). Writes at most cap ids; *n_out is always the number of ids the
 * text needs: KRS_ERR_FULL when that exceeds cap (call again with a bigger buffer).
 * KRS_ERR_NOMEM when scratch memory cannot be had. */
int tokenizer_encode(const struct tokenizer *tok, const char *text, size_t len, int add_special,
                     int parse_special, int32_t *ids, size_t cap, size_t *n_out);

uint32_t tokenizer_n_vocab(const struct tokenizer *tok);
/* -1 when the vocabulary has none. */
int32_t tokenizer_bos(const struct tokenizer *tok);
int32_t tokenizer_eos(const struct tokenizer *tok);
/* 1 when id ends generation: eos, eot, eom, and every token whose text is one of <end_of_turn>,
 * <|eot_id|>, <|im_end|>, <|endoftext|>, <|end_of_text|>, <|eom_id|>, <|end|> (looked up by text
 * at load, never by hard-coded id). */
int tokenizer_is_eog(const struct tokenizer *tok, int32_t id);
/* The end-of-generation ids (for samplers that need the set); *n gets the count. */
const int32_t *tokenizer_eog_ids(const struct tokenizer *tok, size_t *n);
/* Id of the token whose text is exactly s[0..len), or -1. */
int32_t tokenizer_find(const struct tokenizer *tok, const char *s, size_t len);
/* The raw vocabulary text of id (as stored in the GGUF: SPM with U+2581, BPE in the byte
 * alphabet), not NUL-terminated; valid for the tokenizer's lifetime. NULL for a bad id. */
const char *tokenizer_token_text(const struct tokenizer *tok, int32_t id, size_t *len);
/* TOKEN_TYPE_* of id (TOKEN_TYPE_UNDEFINED for a bad id). */
int tokenizer_token_type(const struct tokenizer *tok, int32_t id);

/* The bytes one token stands for: NORMAL tokens decoded (U+2581 -> ' ' for SPM, byte alphabet ->
 * bytes for BPE), BYTE tokens as their byte, USER_DEFINED verbatim, CONTROL/UNKNOWN only when
 * render_special (else empty), UNUSED/UNDEFINED empty. Writes at most cap bytes and sets *n_out
 * to the piece length; KRS_ERR_FULL when it does not fit. KRS_ERR_INVALID for a bad id. */
int tokenizer_token_piece(const struct tokenizer *tok, int32_t id, int render_special, char *buf,
                          size_t cap, size_t *n_out);

/* Whole-sequence decode: concatenation of pieces; when the vocabulary has add_space_prefix, one
 * leading space of the first token after an optional leading BOS is dropped (so decode(encode(x))
 * == x for text without special tokens). Writes at most cap bytes; *n_out = bytes needed;
 * KRS_ERR_FULL when cap is too small. Bad ids are KRS_ERR_INVALID. */
int tokenizer_decode(const struct tokenizer *tok, const int32_t *ids, size_t n, int render_special,
                     char *buf, size_t cap, size_t *n_out);

/* Incremental detokenizer for streaming: embed one per sequence (no allocation), zero it with
 * tokenizer_detok_init, push ids as they are sampled. Each push writes the newly completed bytes:
 * a trailing UTF-8 sequence that is still incomplete is held back (at most 3 bytes) until a
 * later token completes it or tokenizer_detok_flush gives it up; bytes that can never form valid
 * UTF-8 are passed through as they are. Concatenating every push and the flush gives exactly
 * tokenizer_decode of the same ids. */
struct detok_state {
    uint8_t pending[4];
    uint8_t n_pending;
    uint8_t render_special;
    uint8_t n_seen; /* tokens pushed so far, saturating at 2 (for the leading-space rule) */
    uint8_t strip_done;
};
void tokenizer_detok_init(struct detok_state *st, int render_special);
/* Writes the new bytes into buf (cap >= piece length + 3 is always enough; a piece is at most
 * tokenizer_max_piece bytes). KRS_ERR_FULL (state unchanged) when cap is too small; *n_out is then
 * the size needed. */
int tokenizer_detok_push(const struct tokenizer *tok, struct detok_state *st, int32_t id, char *buf,
                         size_t cap, size_t *n_out);
/* Writes the held-back bytes (at most 3) and resets the pending buffer. */
int tokenizer_detok_flush(struct detok_state *st, char *buf, size_t cap, size_t *n_out);
/* Longest piece of any token, in bytes (for sizing detok buffers). */
size_t tokenizer_max_piece(const struct tokenizer *tok);

/* ---- Chat templates ------------------------------------------------------------------------ */

/* One OpenAI-style message; both strings NUL-terminated, borrowed for the call. */
struct chat_message {
    const char *role; /* "system", "user", "assistant" (others pass through where the format
                         allows them) */
    const char *content;
};

/* Template families this module renders byte-identically to the reference Jinja templates:
 * "gemma" (Gemma 3), "llama3" (Llama 3 Instruct), "chatml" (plain ChatML), "qwen2" (ChatML with
 * Qwen2's default system message), "llama2" (Llama 2 chat with <<SYS>>). Aliases: "llama-3",
 * "llama-2", "qwen". The family comes from template_name when given, else from distinctive text
 * of tokenizer.chat_template, else (no template in the file) from the vocabulary's special
 * tokens (<start_of_turn> gemma, <|im_start|> chatml, <|start_header_id|> llama3, [INST] llama2).
 * No recognisable family: KRS_ERR_UNSUPPORTED.
 *
 * The rendered text contains the template's own BOS text where the reference template writes
 * it (gemma "<bos>", llama3 "<|begin_of_text|>", llama2 "<s>"): tokenize it with add_special = 0
 * and parse_special = 1. Validation errors (e.g. gemma/llama2 roles not alternating
 * user/assistant, no messages, NULL strings) are KRS_ERR_INVALID with the reason in err.
 * On success *out_text is a NUL-terminated string the caller frees with alloc_free. */
int chat_apply(const struct tokenizer *tok, const char *template_name,
               const struct chat_message *msgs, size_t n, int add_generation_prompt,
               char **out_text, size_t *out_len, char *err, size_t errlen);

/* The family chat_apply would use (static string), or NULL with KRS_ERR_UNSUPPORTED. */
int chat_template_family(const struct tokenizer *tok, const char *template_name,
                         const char **family);

#endif
