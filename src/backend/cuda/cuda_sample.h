/* Device sampler of the CUDA backend (cuda_sample.cu): backend.h's optional ops `sample` and
 * `step_end_sampled`, so a decode step copies back token ids and logprobs instead of
 * [rows, n_vocab] floats.
 *
 * The backend owns one `struct cuda_sampler` (created with the backend, destroyed with it): the
 * pinned staging of a call's rows and edits, its device twin, and the pinned and device result
 * buffers, all reserved once. The two ops reach it through struct backend_cuda's `sampler`
 * and use the backend's stream, step state and device error flags (cuda_impl.h);
 * step_end_sampled is the step's one synchronisation, reads the error flags like step_end, and
 * ends the step.
 *
 * Wiring in backend_cuda.cu / cuda_impl.h:
 *   struct backend_cuda { ... struct cuda_sampler *sampler; };
 *   create:  cuda_sampler_create(p->max_tokens, p->max_sample_edits, p->max_mask_rows,
 *                                p->mask_vocab, &c->sampler)
 *            (after cudaSetDevice; max_edits 0 = 256 per row)
 *   destroy: cuda_sampler_destroy(c->sampler) (after the stream is synchronised)
 *   ops:     .sample = cuda_op_sample, .step_end_sampled = cuda_op_step_end_sampled */
#ifndef KRS_BACKEND_CUDA_SAMPLE_H
#define KRS_BACKEND_CUDA_SAMPLE_H

#include <stdint.h>

extern "C" {
#include "backend/backend.h"
}

struct cuda_sampler;

/* Reserves buffers for calls of up to max_rows rows and max_edits edits (0: 256 per row), of
 * which up to max_mask_rows carry a token mask over mask_vocab tokens (0: no masks).
 * Returns KRS_OK, KRS_ERR_INVALID or a mapped CUDA error (KRS_ERR_NOMEM). */
int cuda_sampler_create(int max_rows, int max_edits, int max_mask_rows, int mask_vocab,
                        struct cuda_sampler **out);
void cuda_sampler_destroy(struct cuda_sampler *s); /* NULL is a no-op */

/* The ops (backend.h): KRS_ERR_STATE outside a step, KRS_ERR_INVALID for bad arguments (rows
 * beyond max_rows, parameters out of range, edit tokens out of range), KRS_ERR_FULL for more
 * than max_edits edits, KRS_ERR_UNSUPPORTED when the backend has no sampler; step_end_sampled
 * returns KRS_ERR_INVALID when a row's edited logits hold NaN or +inf or are all -inf (its id
 * is then -1), or when the step touched an unheld KV block. */
int cuda_op_sample(struct backend *b, const struct backend_tensor *logits, int rows, int n_vocab,
                   const struct backend_sample_row *r, const struct backend_logit_edit *edits,
                   int n_edits, const uint32_t *const *masks);
int cuda_op_step_end_sampled(struct backend *b, int rows, const int32_t **ids,
                             const float **logprobs);

#endif
