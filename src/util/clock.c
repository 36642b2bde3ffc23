/* Monotonic clock helpers. */
#include "util/clock.h"

#include <errno.h>
#include <time.h>

uint64_t clock_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void clock_sleep_us(uint64_t us)
{
    struct timespec req = {(time_t)(us / 1000000u), (long)(us % 1000000u) * 1000L}, rem;
    while (nanosleep(&req, &rem) != 0 && errno == EINTR) req = rem;
}
