/* libFuzzer target: arbitrary bytes as a /v1/completions or /v1/chat/completions body through
 * the pure request parser (server_parse_gen). The first byte picks the API. Checks that the
 * parser never crashes or leaks, and that an accepted request satisfies the invariants the
 * server relies on. */
#include "server/server.h"

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    enum server_api api = (data[0] & 1) ? SERVER_API_CHAT : SERVER_API_COMPLETIONS;
    struct server_gen_request r;
    struct server_error err;
    int rc = server_parse_gen((const char *)data + 1, size - 1, api, &r, &err);
    if (rc == 0) {
        assert(r.gen.max_tokens == -1 || r.gen.max_tokens >= 1);
        assert(r.gen.n_stop >= 0 && r.gen.n_stop <= SCHED_MAX_STOP);
        for (int i = 0; i < r.gen.n_stop; i++) {
            size_t n = strlen(r.gen.stop[i]);
            assert(n >= 1 && n <= SCHED_MAX_STOP_LEN && utf8_valid(r.gen.stop[i], n));
        }
        if (api == SERVER_API_CHAT) {
            assert(r.n_msgs > 0);
            for (int i = 0; i < r.n_msgs; i++)
                assert(utf8_valid(r.msgs[i].content, strlen(r.msgs[i].content)));
        } else {
            assert(r.prompt_ids ? r.n_prompt_ids > 0
                                : (r.prompt && utf8_valid(r.prompt, r.prompt_len)));
        }
        assert(r.gen.sampling.temperature >= 0 && r.gen.sampling.temperature <= 2);
        assert(r.gen.sampling.top_p > 0 && r.gen.sampling.top_p <= 1);
        server_gen_request_free(&r);
    } else {
        assert((err.status == 400 || err.status == 500) && err.message[0]);
    }
    return 0;
}
