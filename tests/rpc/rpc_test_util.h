/* A capturing JSON-RPC sink for the tests that drive rpc/ (test_rpc.c, the fault injection of
 * tests/engine): every message the sink receives is copied, in order, up to CAP_MAX_MSGS.
 * Header-only (static functions) so each test stays one file. */
#ifndef KRS_TESTS_RPC_TEST_UTIL_H
#define KRS_TESTS_RPC_TEST_UTIL_H

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define CAP_MAX_MSGS 512

struct capture {
    pthread_mutex_t lock;
    char *msgs[CAP_MAX_MSGS];
    int n;
};

/* The sink's write: user is a struct capture. */
static inline void cap_write(void *user, const char *json, size_t len)
{
    struct capture *c = user;
    pthread_mutex_lock(&c->lock);
    if (c->n < CAP_MAX_MSGS) {
        c->msgs[c->n] = malloc(len + 1);
        if (c->msgs[c->n]) {
            memcpy(c->msgs[c->n], json, len);
            c->msgs[c->n][len] = '\0';
            c->n++;
        }
    }
    pthread_mutex_unlock(&c->lock);
}

/* Frees the captured messages. */
static inline void cap_reset(struct capture *c)
{
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n; i++) free(c->msgs[i]);
    c->n = 0;
    pthread_mutex_unlock(&c->lock);
}

#endif
