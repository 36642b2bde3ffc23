/* sampler/: per-sequence token sampling and stop strings (stop.h).
 *
 * The engine thread calls sampler_sample once per running sequence per step on that sequence's
 * logits row. A `struct sampler` (params + RNG) is embedded in the request and owns no heap; a
 * `struct sampler_scratch` (work buffers sized for n_vocab) is created once per engine thread
 * and reused for every call, so sampling never allocates.
 *
 * Pipeline (on a private copy of the logits; the caller's row is never modified):
 *   1. logit bias: l[t] += bias (OpenAI: additive; -100 effectively bans, +100 forces;
 *      a token listed twice gets both biases).
 *   2. repetition penalty (llama.cpp/HF): for each distinct token in the last
 *      `penalty_last_n` tokens of prompt ++ generated (-1: the whole history, 0: off),
 *      l > 0 ? l / r : l * r.
 *   3. presence/frequency penalty (OpenAI): over ALL generated tokens (not the prompt, not
 *      windowed), l[t] -= presence * (c[t] > 0) + frequency * c[t].
 *   The result is the "adjusted" distribution; out->logprob and out->top are log-softmax over
 *   the full vocab of these adjusted logits, before temperature and truncation (what OpenAI and
 *   vLLM report: the model's distribution, here including the request's own bias/penalties).
 *   4. temperature == 0: greedy argmax of the adjusted logits, ties -> lowest id.
 *      Otherwise p ~ exp((l - max) / T), then
 *   5. top-k (k > 0 and k < n_vocab): the k largest (ties -> lower id first),
 *   6. top-p (< 1): the smallest prefix of the sorted survivors whose mass, normalised over the
 *      survivors, reaches top_p (always >= 1 token),
 *   7. min-p (> 0): drop tokens with p < min_p * p_max,
 *   8. one draw u in [0,1) from the RNG, inverse CDF over the renormalised survivors.
 *
 * Exactness and speed (n_vocab 262144): nothing is dropped on a heuristic bound; every shortcut
 * is checked and falls back. top-k and dense top-p first try a prefilter: a threshold from a
 * strided sample of the row, one vector compare pass gathering everything above it; when the
 * gathered set provably holds the answer (>= k tokens, or >= top_p of the mass, and everything
 * outside is below everything inside) only that small set is sorted. Otherwise a histogram of
 * (max - l) in 1/64-logit buckets finds the bucket where the count (or mass) crosses; buckets
 * above it are taken whole and only the crossing bucket is sorted. Degenerate rows (huge ties,
 * top_k near n_vocab) stay exact but sort more. exp over the vocab is a vectorised kernel
 * (AVX2 when the CPU has it), about 1 ulp. Timings: bench/results/sampler.md.
 *
 * Determinism: the RNG (xoshiro256**, seeded from `seed` by splitmix64) is per sequence and
 * advanced exactly once per sampler_sample call, greedy included. Nothing depends on the batch:
 * the same seed, logits and history give the same token alone or in any batch (on one machine:
 * the AVX2 and generic kernels may differ in the last bit of a weight).
 *
 * Threads: a sampler is used by one thread at a time; a scratch by one thread at a time. */
#ifndef KRS_SAMPLER_H
#define KRS_SAMPLER_H

#include <stdint.h>

#include "sampler/stop.h"

#define SAMPLER_MAX_TOP_LOGPROBS       20
#define SAMPLER_DEFAULT_PENALTY_LAST_N 64

struct sampler_logit_bias {
    int32_t token;
    float bias;
};

struct sampler_params {
    float temperature;        /* 0 = greedy; >= 0, finite */
    int32_t top_k;            /* 0 = off; >= 0 */
    float top_p;              /* 1 = off; (0, 1] */
    float min_p;              /* 0 = off; [0, 1] */
    float repetition_penalty; /* 1 = off; > 0 */
    int32_t penalty_last_n;   /* repetition window over prompt ++ generated; -1 all, 0 off */
    float presence_penalty;   /* 0 = off; finite */
    float frequency_penalty;  /* 0 = off; finite */
    /* Not owned: must stay valid and unchanged as long as the sampler is used. */
    const struct sampler_logit_bias *logit_bias;
    int32_t n_logit_bias;
    uint64_t seed;
    int32_t n_top_logprobs; /* 0..SAMPLER_MAX_TOP_LOGPROBS */
    /* 1: do not compute out->logprob (left NaN; n_top_logprobs must be 0). Saves one exp pass
     * over the vocab (about half the time of a greedy or top-k call). 0 (default): compute. */
    int32_t skip_logprob;
};

/* Per-sequence state, embedded by the caller; no heap. */
struct sampler {
    struct sampler_params params;
    int32_t n_vocab;
    uint64_t rng[4]; /* xoshiro256** state */
};

struct sampler_token_logprob {
    int32_t token;
    float logprob;
};

struct sampler_result {
    int32_t token;
    float logprob; /* log-softmax of the adjusted logits (see top of file); NaN if skipped */
    int32_t n_top; /* = min(n_top_logprobs, n_vocab) */
    struct sampler_token_logprob top[SAMPLER_MAX_TOP_LOGPROBS]; /* logprob desc, ties id asc */
};

/* Opaque per-thread work buffers (25 bytes per vocab entry: 6.5 MB for 262144). */
struct sampler_scratch;

/* Fills `p` with the defaults: temperature 1, everything else off, penalty_last_n 64, seed 0. */
void sampler_params_default(struct sampler_params *p);

/* Validates `p` against n_vocab (bias tokens in range, values finite, ranges above), copies it
 * into `s` and seeds the RNG. Returns KRS_OK or KRS_ERR_INVALID. */
int sampler_init(struct sampler *s, const struct sampler_params *p, int32_t n_vocab);

/* Creates work buffers for vocabularies up to n_vocab. Caller owns *out and frees it with
 * sampler_scratch_free. Returns KRS_OK, KRS_ERR_INVALID or KRS_ERR_NOMEM. */
int sampler_scratch_create(int32_t n_vocab, struct sampler_scratch **out);
void sampler_scratch_free(struct sampler_scratch *scratch); /* NULL is a no-op */

/* Samples the next token. logits: [n_vocab], read only, finite or -inf (at least one finite);
 * n_vocab must equal the sampler's and be <= the scratch's. prompt[n_prompt] and
 * generated[n_generated] are the sequence so far (read only; token ids in range). Advances the
 * RNG once. Returns KRS_OK, or KRS_ERR_INVALID (bad arguments, token out of range, NaN/+inf
 * logits) with the RNG and scratch unchanged in effect. Allocates nothing. */
int sampler_sample(struct sampler *s, struct sampler_scratch *scratch, const float *logits,
                   int32_t n_vocab, const int32_t *prompt, int32_t n_prompt,
                   const int32_t *generated, int32_t n_generated, struct sampler_result *out);

/* sampler_sample with an allowed-token mask (constrained decoding, grammar/): bit t of
 * allow[t / 32] clear = token t is removed (its adjusted logit becomes -inf) after step 3 and
 * before temperature and truncation, so logprobs are those of the masked distribution. allow
 * NULL = sampler_sample. At least one allowed token must have a finite logit
 * (KRS_ERR_INVALID otherwise). A mask of at most 4096 tokens (without top logprobs) is sampled
 * on those tokens alone: the same distribution, without passes over the vocabulary. */
int sampler_sample_masked(struct sampler *s, struct sampler_scratch *scratch, const float *logits,
                          int32_t n_vocab, const uint32_t *allow, const int32_t *prompt,
                          int32_t n_prompt, const int32_t *generated, int32_t n_generated,
                          struct sampler_result *out);

/* Inputs for sampling on a compute device (backend.h's sample op), which runs steps 1-8 above
 * on the device so that only token ids come back. The host keeps the RNG and the history:
 *
 * sampler_edits writes the per-token logit edits of steps 1-3 for this history, one entry per
 * token touched (tokens ascending is not promised), such that
 *   adjusted[t] = rep(l[t] + pre_add) + post_add, rep(x) = x > 0 ? x / r : x * r,
 * equals what sampler_sample computes. out has room for cap entries: KRS_ERR_FULL (nothing
 * usable written) when more are needed; KRS_ERR_INVALID for tokens out of range. Uses the
 * scratch's counters (left zeroed). */
struct sampler_edit {
    int32_t token;
    float pre_add;  /* logit bias */
    float rep;      /* repetition penalty, 1 = none */
    float post_add; /* -(presence + frequency * count) */
};
int sampler_edits(const struct sampler *s, struct sampler_scratch *scratch, const int32_t *prompt,
                  int32_t n_prompt, const int32_t *generated, int32_t n_generated,
                  struct sampler_edit *out, int32_t cap, int32_t *n_out);
/* The draw sampler_sample would make now, in [0, 1); advances the RNG exactly once, as one
 * sampler_sample call does, so a request's n-th token uses its n-th number on any device. */
double sampler_next_uniform(struct sampler *s);

#endif
