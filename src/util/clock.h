/* Monotonic time. All latencies in kr-serve are measured with these (never wall time). */
#ifndef KRS_UTIL_CLOCK_H
#define KRS_UTIL_CLOCK_H

#include <stdint.h>

/* Nanoseconds on CLOCK_MONOTONIC since an arbitrary origin. */
uint64_t clock_now_ns(void);
static inline uint64_t clock_now_us(void)
{
    return clock_now_ns() / 1000u;
}
static inline double clock_ns_to_ms(uint64_t ns)
{
    return (double)ns / 1e6;
}
/* Sleeps for `us` microseconds (restarts on EINTR). */
void clock_sleep_us(uint64_t us);

#endif
