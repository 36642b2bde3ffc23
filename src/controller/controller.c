/* controller/: window P99, EMA, grow/shrink/hold decisions, degradation and recovery.
 *
 * Owns only the struct controller passed in; reads no clock, takes no lock, allocates nothing.
 * The rules are described in controller.h; this file must stay a pure function of the inputs. */
#include "controller/controller.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "krserve.h"

#define FIT_DECAY             0.9 /* per-window decay of the least-squares statistics */
#define FIT_MIN_VAR           0.2 /* batch-size variance needed before the fitted slope is trusted */
#define FIT_RESET_FRAC        0.1 /* residual (share of target) that restarts the fit... */
#define FIT_RESET_NOISE       3.0 /* ...and (times the noise level) on a noisy host */
#define DEGRADE_NOISE_K       4.0 /* a spike stands this many noise levels over the EMA */
#define GROW_NOISE_K          2.0 /* growth keeps this many mean deviations of headroom */
#define NS_PER_MS             1000000.0
#define UNMET_PROBE           1.5 /* EMA over this * target at the minimum limit: probe the slope */
#define PF_DECAY              0.8 /* per-sample decay of the prompt-token cost statistics */
#define PF_MIN_MS             0.01 /* floor of a measured prompt token's cost */
#define PREFILL_TARGET_SHARE  0.9  /* prompt chunks fill a step up to this share of target */
#define UNREACH_PREFILL_SHARE 0.5  /* target out of reach: prompts add up to this share */
#define LATE_PREFILL_SHARE    2.0  /* ...and while requests are late in the queue */
#define KNEE_ABOVE            0.25 /* a limit this share over the knee comes down to it... */
#define KNEE_DOWN_VAR         4.0  /* ...when the fit's batch sizes vary by this much (std 2) */

void controller_config_default(struct controller_config *cfg)
{
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->min_batch = 1;
    cfg->max_batch = 32;
    cfg->fixed_batch = 4;
    cfg->initial_batch = 0;
    cfg->ema_alpha = 0.3;
    cfg->interval = 10;
    cfg->p99_target_ms = 100.0;
    cfg->degrade_factor_target = 2.0;
    cfg->degrade_factor_ema = 1.5;
    cfg->calm_period_ms = 10000;
    cfg->grow_fraction = 0.12;
    cfg->max_shrink_fraction = 0.5;
    cfg->ceiling_windows = 50;
    cfg->ceiling_reset = 0.8;
    cfg->ttft_target_ms = 1000.0;
    cfg->knee_gain = 0.2;
    cfg->hold_band = 0.05;
    cfg->min_prefill_chunk = 8;
    cfg->late_wait_ms = 100.0;
    cfg->late_p99_factor = 2.0;
    cfg->enabled = true;
}

static uint32_t clamp_limit(const struct controller_config *cfg, uint32_t v)
{
    if (v < cfg->min_batch) return cfg->min_batch;
    if (v > cfg->max_batch) return cfg->max_batch;
    return v;
}

static uint32_t fallback_limit(const struct controller_config *cfg)
{
    return clamp_limit(cfg, cfg->fixed_batch ? cfg->fixed_batch : cfg->min_batch);
}

static void push_event(struct controller *c, uint64_t now_ns, enum controller_event_kind kind,
                       uint32_t old_limit, uint32_t new_limit, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

static void push_event(struct controller *c, uint64_t now_ns, enum controller_event_kind kind,
                       uint32_t old_limit, uint32_t new_limit, const char *fmt, ...)
{
    uint32_t idx = (c->ev_head + c->ev_count) % CONTROLLER_EVENTS;
    if (c->ev_count == CONTROLLER_EVENTS) {
        idx = c->ev_head;
        c->ev_head = (c->ev_head + 1) % CONTROLLER_EVENTS;
    } else {
        c->ev_count++;
    }
    struct controller_event *e = &c->events[idx];
    e->t_ns = now_ns;
    e->kind = kind;
    e->old_limit = old_limit;
    e->new_limit = new_limit;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->reason, sizeof e->reason, fmt, ap);
    va_end(ap);
}

int controller_init(struct controller *ctrl, const struct controller_config *cfg, uint64_t now_ns)
{
    if (!ctrl || !cfg) return KRS_ERR_INVALID;
    if (cfg->min_batch == 0 || cfg->max_batch < cfg->min_batch) return KRS_ERR_INVALID;
    if (cfg->interval == 0 || cfg->interval > CONTROLLER_MAX_INTERVAL) return KRS_ERR_INVALID;
    if (!(cfg->p99_target_ms > 0.0) || !(cfg->ema_alpha > 0.0) || cfg->ema_alpha > 1.0)
        return KRS_ERR_INVALID;
    if (!(cfg->degrade_factor_target >= 1.0) || !(cfg->degrade_factor_ema >= 1.0))
        return KRS_ERR_INVALID;
    if (!(cfg->grow_fraction >= 0.0) || cfg->grow_fraction > 1.0) return KRS_ERR_INVALID;
    if (!(cfg->max_shrink_fraction > 0.0) || cfg->max_shrink_fraction > 1.0) return KRS_ERR_INVALID;
    if (!(cfg->ceiling_reset >= 0.0) || cfg->ceiling_reset > 1.0) return KRS_ERR_INVALID;
    if (!(cfg->ttft_target_ms >= 0.0) || !(cfg->knee_gain > 0.0) || cfg->knee_gain >= 1.0)
        return KRS_ERR_INVALID;
    if (!(cfg->hold_band >= 0.0) || cfg->hold_band >= 1.0 || cfg->min_prefill_chunk == 0)
        return KRS_ERR_INVALID;
    if (!(cfg->late_wait_ms >= 0.0) || !(cfg->late_p99_factor >= 1.0)) return KRS_ERR_INVALID;

    memset(ctrl, 0, sizeof *ctrl);
    ctrl->cfg = *cfg;
    if (cfg->enabled) {
        ctrl->mode = CONTROLLER_MODE_TUNING;
        ctrl->limit = clamp_limit(cfg, cfg->initial_batch ? cfg->initial_batch : cfg->min_batch);
    } else {
        ctrl->mode = CONTROLLER_MODE_FIXED;
        ctrl->limit = fallback_limit(cfg);
    }
    ctrl->last_spike_ns = now_ns;
    return KRS_OK;
}

/* Nearest-rank quantile q (the ceil(q n)-th smallest) of the latencies among lat[0..n) that
 * are at most max_ns, in ms (max_ns when none is). */
static double quantile_ms(const uint64_t *lat, uint32_t n_all, uint64_t max_ns, double q)
{
    uint64_t v[CONTROLLER_MAX_INTERVAL];
    uint32_t n = 0;
    for (uint32_t i = 0; i < n_all; i++)
        if (lat[i] <= max_ns) v[n++] = lat[i];
    if (n == 0) return (double)max_ns / NS_PER_MS;
    for (uint32_t i = 1; i < n; i++) {
        uint64_t x = v[i];
        uint32_t j = i;
        while (j > 0 && v[j - 1] > x) {
            v[j] = v[j - 1];
            j--;
        }
        v[j] = x;
    }
    uint32_t rank = (uint32_t)ceil(q * (double)n);
    if (rank < 1) rank = 1;
    return (double)v[rank - 1] / NS_PER_MS;
}

static double p99_ms_upto(const uint64_t *lat, uint32_t n_all, uint64_t max_ns)
{
    return quantile_ms(lat, n_all, max_ns, 0.99);
}

/* The host's step-time noise: the larger of the fit's residual level and the EMA of the spread
 * within windows (P99 - P50), which a busy shared host shows from the first window on. */
static double noise_ms(const struct controller *c)
{
    return c->dev_ms > c->spread_ms ? c->dev_ms : c->spread_ms;
}

/* The slope is confirmed by the windows in the fit now (two batch sizes seen since the last
 * reset), not carried over from before. */
static double fit_var(const struct controller *c)
{
    if (c->sw <= 0.0) return 0.0;
    double mx = c->sx / c->sw;
    return c->sxx / c->sw - mx * mx;
}

static bool fit_fresh(const struct controller *c)
{
    return c->sw > 0.0 && fit_var(c) >= FIT_MIN_VAR;
}

/* A slope to predict with: confirmed, or carried over a reset. */
static bool have_fit(const struct controller *c)
{
    return c->sw > 0.0 && (fit_fresh(c) || c->slope > 0.0);
}

/* The fitted decode-step P99 at batch n. */
static double line_ms(const struct controller *c, double n)
{
    return c->sy / c->sw + c->slope * (n - c->sx / c->sw);
}

/* Folds a (non-spike) window P99 of all steps into the EMA that the shrink rule watches. */
static void fold_ema(struct controller *c, double p99_ms)
{
    double a = c->cfg.ema_alpha;
    c->ema_ms = c->have_ema ? a * p99_ms + (1.0 - a) * c->ema_ms : p99_ms;
    c->have_ema = true;
}

static uint32_t knee_limit(const struct controller *c);

/* Folds the window P99 of the decode-only steps (at mean batch `mean_batch`) into the
 * latency-vs-batch fit and the noise estimate. */
static void fold_decode(struct controller *c, double p99_ms, double mean_batch)
{
    double a = c->cfg.ema_alpha;
    /* (the noise before this window: a change of cost must stand out of it to reset the fit) */
    double noise = noise_ms(c);
    if (!c->have_dec) {
        c->dec_ema_ms = p99_ms;
        c->have_dec = true;
    } else {
        /* Noise is what the batch size does not explain: the residual from the fitted line
         * once there is one (a limit that just grew moves P99 away from the EMA by design). */
        double expect = have_fit(c) ? line_ms(c, mean_batch) : c->dec_ema_ms;
        c->dev_ms = a * fabs(p99_ms - expect) + (1.0 - a) * c->dev_ms;
        c->dec_ema_ms = a * p99_ms + (1.0 - a) * c->dec_ema_ms;
    }
    c->dec_last_ms = p99_ms;
    c->dec_last_batch = mean_batch;
    /* A window at the batch size the fit is centred on but far off the fitted line means the cost
     * model changed (another model load, thermal throttling, a busier host): start the fit
     * afresh. */
    if (c->sw > 0.0) {
        double mx = c->sx / c->sw;
        double expect = line_ms(c, mean_batch);
        /* (an unconfirmed slope is only trusted at the centre itself) */
        double near = fit_fresh(c) ? 1.0 : 0.5;
        if (!fit_fresh(c)) expect = c->sy / c->sw;
        double tol = FIT_RESET_FRAC * c->cfg.p99_target_ms;
        if (FIT_RESET_NOISE * noise > tol) tol = FIT_RESET_NOISE * noise;
        if (fabs(mean_batch - mx) < near && fabs(p99_ms - expect) > tol) {
            /* Until two batch sizes are seen again, assume the whole cost scaled (a slower or
             * faster host scales the fixed and the per-sequence part alike). */
            if (expect > 0.0 && c->slope > 0.0) c->slope *= p99_ms / expect;
            c->knee = 0;
            c->goodput_hold = false;
            c->unmet_probe = false;
            c->sw = c->sx = c->sy = c->sxx = c->sxy = 0.0;
        }
    }
    c->sw = FIT_DECAY * c->sw + 1.0;
    c->sx = FIT_DECAY * c->sx + mean_batch;
    c->sy = FIT_DECAY * c->sy + p99_ms;
    c->sxx = FIT_DECAY * c->sxx + mean_batch * mean_batch;
    c->sxy = FIT_DECAY * c->sxy + mean_batch * p99_ms;
    double mx = c->sx / c->sw, my = c->sy / c->sw;
    double var = c->sxx / c->sw - mx * mx;
    if (var >= FIT_MIN_VAR) {
        double cov = c->sxy / c->sw - mx * my;
        c->slope = cov / var > 0.0 ? cov / var : 0.0;
        c->knee = knee_limit(c);
        c->unmet_probe = false;
    }
}

/* The measured cost of a prompt token (0 = not measured; at least PF_MIN_MS once measured:
 * the estimate is a difference of noisy means and may come out at or under 0 when prompt
 * tokens are nearly free next to the decodes). */
static double prefill_ms_per_token(const struct controller *c)
{
    if (c->pf_tok <= 0.0) return 0.0;
    double v = c->pf_ms / c->pf_tok;
    return v > PF_MIN_MS ? v : PF_MIN_MS;
}

/* Time kept free for prompt chunks while prompts arrive (half a token a step or more): a whole
 * minimum chunk, since a step that carries one is what a stream's inter-token P99 sees, not
 * the average step. */
static double prefill_reserve_ms(const struct controller *c)
{
    return c->prefill_per_step >= 0.5 ? (double)c->cfg.min_prefill_chunk * prefill_ms_per_token(c)
                                      : 0.0;
}

/* Predicted P99 of a decode step at batch n (plus the prefill reserve), from the fresher of
 * the last decode window and its EMA (the EMA lags a limit that just grew). */
static double predict_ms(const struct controller *c, double n)
{
    double now_ms = c->dec_last_ms > c->dec_ema_ms ? c->dec_last_ms : c->dec_ema_ms;
    double slope = have_fit(c) ? c->slope : 0.0;
    return now_ms + slope * (n - c->dec_last_batch) + prefill_reserve_ms(c);
}

/* The most sequences whose predicted P99 plus noise headroom stays within bound_ms. */
static uint32_t capacity_within(const struct controller *c, double bound_ms)
{
    const struct controller_config *cfg = &c->cfg;
    double room = bound_ms - GROW_NOISE_K * c->dev_ms - predict_ms(c, c->dec_last_batch);
    if (room < 0.0) return clamp_limit(cfg, (uint32_t)floor(c->dec_last_batch));
    if (!have_fit(c) || c->slope <= 1e-9) return cfg->max_batch;
    double n = floor(c->dec_last_batch + room / c->slope);
    return n >= (double)cfg->max_batch ? cfg->max_batch : clamp_limit(cfg, (uint32_t)n);
}

/* The most sequences the P99 target allows. */
static uint32_t capacity_limit(const struct controller *c)
{
    return capacity_within(c, c->cfg.p99_target_ms);
}

/* The knee of throughput n / (a + b n): one more sequence adds a / (a + b n) of a sequence's
 * share; the knee is the largest n where that is still >= knee_gain. */
static uint32_t knee_limit(const struct controller *c)
{
    const struct controller_config *cfg = &c->cfg;
    if (!fit_fresh(c) || c->slope <= 1e-9) return cfg->max_batch;
    double a = line_ms(c, 0.0);
    if (a <= 0.0) return cfg->max_batch; /* no fixed cost in the fit: it is off, no knee known */
    double n = floor(a * (1.0 / cfg->knee_gain - 1.0) / c->slope + 1e-9) + 1.0;
    return n >= (double)cfg->max_batch ? cfg->max_batch : clamp_limit(cfg, (uint32_t)n);
}

/* The concurrency the fitted model wants now (rule 1): the knee, or the capacity when that is
 * lower or when queued requests missed the first-token target (goodput); *why says which and
 * *at_knee whether it is the knee. Only with a confirmed knee (c->knee != 0). */
static uint32_t wanted_limit(const struct controller *c, bool pressure, double wait_ms, char *why,
                             size_t why_len, bool *at_knee)
{
    const struct controller_config *cfg = &c->cfg;
    uint32_t knee = c->knee, cap = capacity_limit(c);
    bool late_now = pressure && cfg->ttft_target_ms > 0.0 && wait_ms > cfg->ttft_target_ms;
    bool late = late_now || c->goodput_hold;
    if (at_knee) *at_knee = !late && cap >= knee;
    if (why && late_now)
        snprintf(why, why_len, "queue wait %.0f ms > ttft target %.0f ms, capacity %u", wait_ms,
                 cfg->ttft_target_ms, cap);
    else if (why && late && c->late_last >= 0.5)
        snprintf(why, why_len, "late admissions ran (%.1f past the limit), capacity %u",
                 c->late_last, cap);
    else if (why && late)
        snprintf(why, why_len, "requests still queued after a late episode, capacity %u", cap);
    else if (why && cap < knee)
        snprintf(why, why_len, "capacity %u (knee %u)", cap, knee);
    else if (why)
        snprintf(why, why_len, "knee %u (capacity %u)", knee, cap);
    return late || cap < knee ? cap : knee;
}

/* With the target out of reach at any batch size every stream misses it whatever the limit:
 * run at the knee (throughput), and while queued requests miss the first-token target too,
 * everything that fits (max_batch): a request waiting in the queue loses more than the streams
 * that are late anyway lose by one more sequence. */
static bool unreach_late(const struct controller *c, bool pressure, double wait_ms)
{
    const struct controller_config *cfg = &c->cfg;
    return pressure && cfg->ttft_target_ms > 0.0 && wait_ms > cfg->ttft_target_ms;
}

static uint32_t unreach_limit(const struct controller *c, bool pressure, double wait_ms)
{
    bool late = unreach_late(c, pressure, wait_ms) || c->late_hold;
    return late ? c->cfg.max_batch : c->unreach_knee;
}

/* The decode concurrency of the last window, in [min_batch, max_batch]. */
static uint32_t ran_batch(const struct controller *c)
{
    return clamp_limit(&c->cfg, (uint32_t)floor(c->dec_last_batch + 0.5));
}

/* Without a slope: the most sequences within bound_ms if the whole decode step scaled with
 * the batch (the steepest line through what was measured), which errs on the side of it. */
static uint32_t proportional_within(const struct controller *c, double bound_ms)
{
    const struct controller_config *cfg = &c->cfg;
    double now_ms = predict_ms(c, c->dec_last_batch);
    double room = bound_ms - GROW_NOISE_K * c->dev_ms - prefill_reserve_ms(c);
    double n = now_ms > 0.0 ? floor(c->dec_last_batch * room / now_ms) : 0.0;
    return n >= (double)cfg->max_batch ? cfg->max_batch
           : n < 1.0                   ? cfg->min_batch
                                       : clamp_limit(cfg, (uint32_t)n);
}

static uint32_t proportional_limit(const struct controller *c)
{
    return proportional_within(c, c->cfg.p99_target_ms);
}

/* Sets the limit to nl with an event of `kind` and its reason. */
static void set_limit(struct controller *c, uint64_t now_ns, enum controller_event_kind kind,
                      uint32_t nl, const char *what, const char *why)
{
    uint32_t old = c->limit;
    c->limit = nl;
    c->adjustments++;
    push_event(c, now_ns, kind, old, nl, "%s %u -> %u: %s", what, old, nl, why);
}

/* Shrinks the limit for a window over target, to no less than `least` (0: no floor). */
static void shrink(struct controller *c, double p99_ms, uint32_t least, uint64_t now_ns)
{
    const struct controller_config *cfg = &c->cfg;
    double target = cfg->p99_target_ms;
    uint32_t old = c->limit;
    /* What ran over target is the window's concurrency, which admission may have taken past
     * the limit (controller_admit_limit): shrink from there; but not from the late admissions
     * (rule 4), which ran past the limit by leave of the late bound. */
    uint32_t ran = ran_batch(c), late = (uint32_t)floor(c->late_last + 0.5);
    ran = ran > late ? ran - late : 0;
    uint32_t base = ran > old ? ran : old;
    if (base <= cfg->min_batch || base <= least) return;
    double want = floor((double)base * target / c->ema_ms);
    double floor_cut = ceil((double)base * (1.0 - cfg->max_shrink_fraction));
    if (want < floor_cut) want = floor_cut;
    if (want < (double)least) want = (double)least;
    if (want > (double)(base - 1)) want = (double)(base - 1);
    uint32_t nl = clamp_limit(cfg, want < 1.0 ? 1u : (uint32_t)want);
    c->ceiling = base;
    c->ceiling_left = cfg->ceiling_windows;
    /* Late admissions (controller_late_admit_limit) ran past the limit, and the limit already
     * is where this rule puts it: nothing to change, nothing to report. */
    if (nl == old) return;
    c->limit = nl;
    c->adjustments++;
    /* (from the concurrency that ran: the limit may have been below it, see above) */
    push_event(c, now_ns, CONTROLLER_EVENT_SHRINK, base, nl,
               "shrink %u -> %u: ema p99 %.1f ms and window p99 %.1f ms > target %.1f ms at "
               "%.1f running (%.0f prompt tokens/step)",
               base, nl, c->ema_ms, p99_ms, target, c->dec_last_batch, c->prefill_per_step);
}

static void tune(struct controller *c, double p99_ms, bool pressure, double wait_ms,
                 uint64_t now_ns)
{
    const struct controller_config *cfg = &c->cfg;
    double target = cfg->p99_target_ms;
    uint32_t old = c->limit;

    if (!pressure) c->late_grown = false;
    if (c->ceiling) {
        if (c->ceiling_left > 0) c->ceiling_left--;
        if (c->ceiling_left == 0 || c->ema_ms < cfg->ceiling_reset * target) c->ceiling = 0;
    }
    /* Goodput: when the fit says no batch size meets the target (the fixed cost alone is over
     * it: a slow or busy host), fewer sequences only lose throughput: run at the knee. */
    double at_min = c->knee && have_fit(c) ? line_ms(c, (double)cfg->min_batch) : 0.0;
    /* Remembered (with its knee) until the EMA is back under target: a fit reset on a noisy
     * host must not turn it back into blind shrinking. */
    if (at_min > target) {
        c->unreach_knee = c->knee;
        c->unreach_ms = at_min;
    } else if (c->ema_ms <= target || (c->knee && have_fit(c))) {
        c->unreach_knee = 0;
        c->late_hold = false;
    }
    if (c->unreach_knee) {
        /* A late episode lasts while more run than the knee: taking the late requests empties
         * the queue, which must not send them back to it; it ends once the knee would take
         * what runs. */
        c->late_hold = unreach_late(c, pressure, wait_ms) ||
                       (c->late_hold && c->dec_last_batch > (double)c->unreach_knee);
        uint32_t knee = unreach_limit(c, pressure, wait_ms);
        at_min = c->unreach_ms;
        if (old == knee || (old < knee && !pressure)) return;
        /* (the knee of a noisy fit wanders: changes within the hold band, or of one, wait) */
        uint32_t dead = (uint32_t)ceil(cfg->hold_band * (double)old);
        if (dead < 2) dead = 2;
        if (knee + dead > old && knee < old + dead) return;
        uint32_t step = old / 2 > 1 ? old / 2 : 1;
        uint32_t nl = old > knee ? knee : (knee < old + step ? knee : old + step);
        c->limit = nl;
        c->adjustments++;
        push_event(c, now_ns, nl > old ? CONTROLLER_EVENT_GROW : CONTROLLER_EVENT_SHRINK, old, nl,
                   "%u -> %u toward %s %u: target %.1f ms unreachable (p99 at batch %u "
                   "predicted %.1f ms)",
                   old, nl, knee == c->unreach_knee ? "the knee" : "all waiting (late), max", knee,
                   target, cfg->min_batch, at_min);
        return;
    }
    if (c->ema_ms > target && p99_ms > target) {
        /* Late admissions (rule 4) ran past the limit and the window stayed within their
         * bound: they are what made it slower, by leave; the limit already holds what the
         * target allows the requests on time. */
        double late_bound = cfg->late_p99_factor * target;
        bool within_late = p99_ms <= late_bound && c->ema_ms <= late_bound;
        if (within_late && c->late_last >= 0.5) {
            /* ...and they keep coming: the limit takes them in, so the next ones do not wait
             * late_wait_ms first; held while the engine stays busy (below). */
            uint32_t ran = ran_batch(c);
            if (ran > old) {
                char why[96];
                snprintf(why, sizeof why, "late admissions ran, p99 %.1f ms <= late bound %.1f ms",
                         p99_ms, late_bound);
                set_limit(c, now_ns, CONTROLLER_EVENT_GROW, ran, "late", why);
                c->late_grown = true;
            }
            return;
        }
        if (within_late && c->late_grown && pressure) return;
        c->late_grown = false;
        bool unmet = !c->knee && c->ema_ms > UNMET_PROBE * target;
        /* Far over target with no fit to say why: shrinking helps only if the cost is per
         * sequence; if it is the fixed part (a slow or busy host) fewer sequences only lose
         * throughput. One window at another batch size (up by half, at least one; at
         * max_batch down by a quarter) gives the fit its slope, and the rules above decide.
         * Once per fit: if the noise still hides the slope, it shrinks. */
        uint32_t ran = ran_batch(c);
        if (unmet && pressure && !c->unmet_probe && (ran < cfg->max_batch || ran > 1)) {
            uint32_t nl = ran < cfg->max_batch ? ran + (ran / 2 > 1 ? ran / 2 : 1)
                                               : ran - (ran / 4 > 1 ? ran / 4 : 1);
            nl = clamp_limit(cfg, nl);
            c->unmet_probe = true;
            if (nl != old) {
                char why[96];
                snprintf(why, sizeof why,
                         "ema p99 %.1f ms > target %.1f ms at %u running, no slope yet", c->ema_ms,
                         target, ran);
                set_limit(c, now_ns, nl > old ? CONTROLLER_EVENT_GROW : CONTROLLER_EVENT_SHRINK, nl,
                          "probe", why);
            }
            return;
        }
        c->unmet_probe = false;
        /* Requests already waited past the first-token target: below the knee a shrink turns
         * missed step targets into more missed first tokens (no goodput either way) and loses
         * throughput, so it stops at the knee. */
        bool late = pressure && cfg->ttft_target_ms > 0.0 && wait_ms > cfg->ttft_target_ms;
        shrink(c, p99_ms, late ? c->knee : 0, now_ns);
        return;
    }
    if (c->ema_ms > target || p99_ms > target || !c->have_dec) return;

    uint32_t nl;
    char why[96];
    if (!c->knee) {
        /* Before two batch sizes were seen (since the last reset) the slope, and so the knee,
         * is unknown: while work is waiting, run the next window at another size. From what
         * ran (admission may have taken it past the limit) up by one, or by up to half as far
         * as the steepest line through the measurement allows; at max_batch (or under a
         * ceiling), down by a quarter for one window. */
        if (!pressure) return;
        uint32_t ran = ran_batch(c), est = proportional_limit(c);
        uint32_t up = ran + (ran / 2 > 1 ? ran / 2 : 1);
        if (up > est) up = est;
        if (up <= ran) up = ran + 1;
        if (up > cfg->max_batch) up = cfg->max_batch;
        if (c->ceiling && up >= c->ceiling) up = c->ceiling - 1;
        if (up > ran && up <= old)
            return; /* the limit already admits the next size: nothing pins the batch (a lone
                     * request, then a burst arriving, must not bring the limit down to 2) */
        if (up > ran)
            nl = up;
        else if (ran > cfg->min_batch)
            nl = clamp_limit(cfg, ran - (ran / 4 > 1 ? ran / 4 : 1));
        else
            return;
        if (nl == old) return;
        snprintf(why, sizeof why, "probe a second batch size (%u ran, p99 %.1f ms)", ran, p99_ms);
        set_limit(c, now_ns, nl > old ? CONTROLLER_EVENT_GROW : CONTROLLER_EVENT_SHRINK, nl,
                  "probe", why);
        return;
    } else {
        /* Past the knee only for goodput: requests miss their first-token target in the queue.
         * Such a late episode lasts while requests still queue and more than the knee run:
         * admitting the late requests shortens the queue's wait, and that must not send the
         * limit back to the knee while work still waits (it would swing between knee and
         * capacity at every window of a saturated closed loop). */
        c->goodput_hold =
            (pressure && cfg->ttft_target_ms > 0.0 && wait_ms > cfg->ttft_target_ms) ||
            c->late_last >= 0.5 || /* late admissions (rule 4) took requests past the limit */
            (c->goodput_hold && pressure && c->dec_last_batch > (double)c->knee);
        bool at_knee = false;
        uint32_t want = wanted_limit(c, pressure, wait_ms, why, sizeof why, &at_knee);
        /* Steady hold: a change under hold_band of the limit is noise in the fit. */
        uint32_t band = (uint32_t)ceil(cfg->hold_band * (double)old);
        if (band < 1) band = 1;
        if (at_knee && (double)want < (1.0 - KNEE_ABOVE) * (double)old &&
            fit_var(c) >= KNEE_DOWN_VAR) {
            /* Well above the knee (a probe or a goodput burst took it there), with a fit over
             * batch sizes far enough apart that the knee is not noise: extra sequences add
             * little throughput and slow every stream. Down at most max_shrink_fraction. */
            double cut = ceil((double)old * (1.0 - cfg->max_shrink_fraction));
            nl = (double)want < cut ? (uint32_t)cut : want;
            set_limit(c, now_ns, CONTROLLER_EVENT_SHRINK, nl, "down to the knee", why);
            return;
        }
        if (want < old + band || old >= cfg->max_batch) return;
        uint32_t step = (uint32_t)floor(cfg->grow_fraction * (double)old);
        if (step < old / 2) step = old / 2;
        if (step < 1) step = 1;
        /* (what late admissions already ran is no step into the unknown) */
        uint32_t ran = ran_batch(c);
        if (c->late_last >= 0.5 && ran > old + step) step = ran - old;
        nl = want < old + step ? want : old + step;
    }
    if (c->ceiling && nl >= c->ceiling) nl = c->ceiling - 1;
    nl = clamp_limit(cfg, nl);
    double pred = predict_ms(c, (double)nl);
    while (nl > old && pred + GROW_NOISE_K * c->dev_ms > target) pred = predict_ms(c, --nl);
    if (nl <= old) return;
    c->limit = nl;
    c->adjustments++;
    push_event(c, now_ns, CONTROLLER_EVENT_GROW, old, nl,
               "grow %u -> %u: %s; p99 predicted %.1f ms <= target %.1f ms", old, nl, why, pred,
               target);
}

static void evaluate_window(struct controller *c, uint64_t now_ns)
{
    const struct controller_config *cfg = &c->cfg;
    /* A regression is several slow steps, not one (a host hiccup, a prompt chunk whose cost
     * was misjudged): count the steps over the spike threshold. A lone one is an OUTLIER: it
     * is left out of the window's P99 (tuning on it would shrink the limit for nothing), but
     * outliers in two windows in a row are a spike. */
    /* What the window's steps should take: the EMA, or what the fitted line predicts at the
     * window's mean batch when that is more (more sequences were admitted: slower steps are
     * what they cost, not a regression). */
    double expect = c->ema_ms;
    if (c->n_in_window && c->have_dec && have_fit(c)) {
        double at = line_ms(c, (double)c->tokens_sum / (double)c->n_in_window);
        if (at > expect) expect = at;
    }
    double thr = cfg->degrade_factor_target * cfg->p99_target_ms;
    if (c->have_ema && cfg->degrade_factor_ema * expect > thr)
        thr = cfg->degrade_factor_ema * expect;
    /* (on a noisy host a regression must also stand out of the noise) */
    if (c->have_ema && expect + DEGRADE_NOISE_K * noise_ms(c) > thr)
        thr = expect + DEGRADE_NOISE_K * noise_ms(c);
    uint64_t thr_ns = (uint64_t)(thr * NS_PER_MS);
    /* (each step less what its prompt tokens are known to cost: a step that carried a long
     * chunk by the prefill budget's leave is as slow as it was allowed to be) */
    uint32_t n_over = 0, n_steps = c->n_in_window;
    for (uint32_t i = 0; i < n_steps; i++) n_over += c->spike_ns[i] > thr_ns;
    uint32_t need = n_steps < CONTROLLER_DEGRADE_STEPS ? n_steps : CONTROLLER_DEGRADE_STEPS;
    bool spike = c->have_ema && n_over > 0 && (n_over >= need || c->outlier_prev);
    bool outlier = c->have_ema && n_over > 0 && !spike;
    c->outlier_prev = outlier;
    c->outliers += outlier;
    uint64_t upto = outlier ? thr_ns : UINT64_MAX;
    double p99 = p99_ms_upto(c->window_ns, n_steps, upto);
    double spread = p99 - quantile_ms(c->window_ns, n_steps, upto, 0.5);
    c->spread_ms =
        c->windows ? cfg->ema_alpha * spread + (1.0 - cfg->ema_alpha) * c->spread_ms : spread;
    /* The fit sees the decode-only steps of the window (and decode-equivalents of the
     * others, see controller_observe). */
    bool dec = c->n_dec >= 1;
    double dec_p99 = dec ? p99_ms_upto(c->dec_ns, c->n_dec, upto) : 0.0;
    double mean_batch = dec ? (double)c->batch_sum / (double)c->n_dec : 0.0;
    bool pressure = c->pressure;
    double wait_ms = (double)c->max_wait_ns / NS_PER_MS;
    double a = cfg->ema_alpha, pps = (double)c->prefill_sum / (double)c->n_in_window;
    c->prefill_per_step = c->windows ? a * pps + (1.0 - a) * c->prefill_per_step : pps;
    c->last_tok_s =
        c->window_time_ns ? (double)c->tokens_sum * 1e9 / (double)c->window_time_ns : 0.0;
    c->last_wait_ms = wait_ms;
    c->late_last = (double)c->late_sum / (double)c->n_in_window;
    c->late_sum = 0;
    if (c->plain_n) {
        double m = (double)c->plain_ns_sum / (double)c->plain_n / NS_PER_MS;
        double mb = (double)c->plain_batch_sum / (double)c->plain_n;
        c->plain_ms = c->have_plain ? a * m + (1.0 - a) * c->plain_ms : m;
        c->plain_batch = c->have_plain ? a * mb + (1.0 - a) * c->plain_batch : mb;
        c->have_plain = true;
    }
    c->plain_ns_sum = c->plain_batch_sum = 0;
    c->plain_n = 0;
    c->n_in_window = c->n_dec = 0;
    c->batch_sum = c->tokens_sum = c->prefill_sum = c->window_time_ns = c->max_wait_ns = 0;
    c->last_pressure = pressure;
    c->last_queued = c->queued_seen;
    c->pressure = c->queued_seen = false;
    c->windows++;
    c->last_p99_ms = p99;

    if (!spike) {
        fold_ema(c, p99);
        if (dec) fold_decode(c, dec_p99, mean_batch);
    }

    switch (c->mode) {
    case CONTROLLER_MODE_TUNING:
        if (spike) {
            uint32_t old = c->limit;
            uint32_t fb = fallback_limit(cfg);
            uint32_t nl = old < fb ? old : fb;
            c->limit = nl;
            c->mode = CONTROLLER_MODE_DEGRADED;
            c->last_spike_ns = now_ns;
            c->degradations++;
            c->ceiling = 0;
            c->goodput_hold = false; /* after recovery it starts from the fallback afresh */
            c->late_grown = false;
            push_event(c, now_ns, CONTROLLER_EVENT_DEGRADE, old, nl,
                       "p99 %.1f ms > %.1fx target %.1f ms and %.1fx ema %.1f ms (%u of %u "
                       "steps); limit %u -> %u",
                       p99, cfg->degrade_factor_target, cfg->p99_target_ms, cfg->degrade_factor_ema,
                       c->ema_ms, n_over, n_steps, old, nl);
            return;
        }
        tune(c, p99, pressure, wait_ms, now_ns);
        return;
    case CONTROLLER_MODE_DEGRADED:
        if (spike) {
            /* Folded while degraded: a lasting new level (a slower host) becomes the EMA
             * within a few windows, stops reading as a spike, and tuning resumes. */
            fold_ema(c, p99);
            c->last_spike_ns = now_ns;
            return;
        }
        if (now_ns - c->last_spike_ns >= cfg->calm_period_ms * 1000000ull) {
            c->mode = CONTROLLER_MODE_TUNING;
            c->recoveries++;
            push_event(c, now_ns, CONTROLLER_EVENT_RECOVER, c->limit, c->limit,
                       "recovered: no spike for %.0f ms; tuning resumes at limit %u (ema p99 "
                       "%.1f ms)",
                       (double)(now_ns - c->last_spike_ns) / NS_PER_MS, c->limit, c->ema_ms);
        }
        return;
    case CONTROLLER_MODE_FIXED:
        if (spike) fold_ema(c, p99); /* statistics only: nothing reacts to it */
        return;
    }
}

/* What a step's prompt tokens added over a decode-only step of the same batch is their cost.
 * The baseline is the MEAN latency of decode-only steps (EMA of window means, moved along the
 * fitted slope to the step's batch), not the P99 line (against a P99 every step looks
 * cheap), and the noisy differences are summed signed (clipping each at 0 reads noise as
 * cost). Both biases grow with the host's noise. */
static void learn_prompt_cost(struct controller *c, const struct controller_step *st)
{
    if (st->n_prefill == 0 || !c->have_plain) return;
    double slope = have_fit(c) ? c->slope : 0.0;
    double base = c->plain_ms + slope * ((double)st->n_decode - c->plain_batch);
    double extra = (double)st->latency_ns / NS_PER_MS - (base > 0.0 ? base : 0.0);
    c->pf_ms = PF_DECAY * c->pf_ms + extra;
    c->pf_tok = PF_DECAY * c->pf_tok + (double)st->n_prefill;
}

uint32_t controller_observe(struct controller *ctrl, const struct controller_step *st)
{
    if (!ctrl || !st) return 0;
    if (st->n_decode == 0 && st->n_prefill == 0) return ctrl->limit; /* idle: says nothing */
    double pf_tok = prefill_ms_per_token(ctrl);
    if (st->n_decode == 0) {
        /* Prompt tokens alone: no stream waited on this step; it only teaches their cost. */
        learn_prompt_cost(ctrl, st);
        if (st->oldest_wait_ns > ctrl->max_wait_ns) ctrl->max_wait_ns = st->oldest_wait_ns;
        if (st->queued > 0) ctrl->queued_seen = true;
        return ctrl->limit;
    }
    uint32_t i = ctrl->n_in_window++;
    ctrl->window_ns[i] = st->latency_ns;
    double pf_share = pf_tok * NS_PER_MS * (double)st->n_prefill;
    ctrl->spike_ns[i] = (double)st->latency_ns > pf_share ? st->latency_ns - (uint64_t)pf_share : 0;
    ctrl->window_time_ns += st->latency_ns;
    ctrl->tokens_sum += st->n_decode;
    ctrl->prefill_sum += st->n_prefill;
    ctrl->late_sum += st->n_late < st->n_decode ? st->n_late : st->n_decode;
    if (st->n_prefill == 0) {
        ctrl->dec_ns[ctrl->n_dec++] = st->latency_ns;
        ctrl->batch_sum += st->n_decode;
        ctrl->plain_ns_sum += st->latency_ns;
        ctrl->plain_n++;
        ctrl->plain_batch_sum += st->n_decode;
    } else if (pf_tok > 0.0 && have_fit(ctrl)) {
        /* Under steady arrivals most steps carry a prompt chunk: once a prompt token's cost
         * is known, such a step also tells what its decodes cost (its latency less the
         * prompt's share), so the fit keeps learning. */
        double eq = (double)st->latency_ns - pf_tok * NS_PER_MS * (double)st->n_prefill;
        ctrl->dec_ns[ctrl->n_dec++] = eq > 0.0 ? (uint64_t)eq : 0;
        ctrl->batch_sum += st->n_decode;
    }
    learn_prompt_cost(ctrl, st);
    if (st->queued > 0 || st->n_decode >= ctrl->limit) ctrl->pressure = true;
    if (st->queued > 0) ctrl->queued_seen = true;
    if (st->oldest_wait_ns > ctrl->max_wait_ns) ctrl->max_wait_ns = st->oldest_wait_ns;
    if (ctrl->n_in_window >= ctrl->cfg.interval) evaluate_window(ctrl, st->now_ns);
    return ctrl->limit;
}

uint32_t controller_observe_step(struct controller *ctrl, uint64_t step_latency_ns,
                                 uint32_t batch_size, uint32_t queued_waiting, uint64_t now_ns)
{
    struct controller_step st = {.latency_ns = step_latency_ns,
                                 .n_decode = batch_size,
                                 .queued = queued_waiting,
                                 .now_ns = now_ns};
    return controller_observe(ctrl, &st);
}

uint32_t controller_admit_limit(const struct controller *ctrl)
{
    if (!ctrl) return 0;
    const struct controller *c = ctrl;
    const struct controller_config *cfg = &c->cfg;
    uint32_t lim = c->limit;
    if (c->mode != CONTROLLER_MODE_TUNING) return lim;
    /* The target is out of reach at any batch size: fewer sequences only lose throughput, so
     * the engine takes up to the knee (or everything, see unreach_limit) at once; the limit
     * walks there window by window. */
    if (c->unreach_knee) {
        uint32_t want = unreach_limit(c, c->last_pressure, c->last_wait_ms);
        return want > lim ? want : lim;
    }
    /* Nothing measured yet: the engine takes what its KV and token budget allow, and the first
     * window measures what that costs (the shrink rule corrects it). */
    if (!c->have_dec) return cfg->max_batch;
    /* Saturated: the last windows are over target, the limit decides. */
    double target = cfg->p99_target_ms;
    if (c->ema_ms > target || c->last_p99_ms > target) return lim;
    uint32_t want;
    if (c->knee)
        want = wanted_limit(c, c->last_pressure, c->last_wait_ms, NULL, 0, NULL);
    else if (c->last_queued)
        return lim; /* no slope and requests waited: the limit probes (tune) */
    else
        want = proportional_limit(c);
    if (c->ceiling && want >= c->ceiling) want = c->ceiling - 1;
    return want > lim ? want : lim;
}

/* The late admission (see controller.h): a request that has waited late_wait_ms may run while
 * the predicted step P99 stays within late_p99_factor * target. Not while degraded or fixed
 * (the fallback size is what must hold then) and not with the target out of reach (the
 * unreachable rule already admits everything that waits late). */
uint32_t controller_late_admit_limit(const struct controller *ctrl)
{
    if (!ctrl) return 0;
    const struct controller *c = ctrl;
    uint32_t lim = controller_admit_limit(c);
    if (c->mode != CONTROLLER_MODE_TUNING || !c->have_dec || c->unreach_knee) return lim;
    double bound = c->cfg.late_p99_factor * c->cfg.p99_target_ms;
    uint32_t want = have_fit(c) ? capacity_within(c, bound) : proportional_within(c, bound);
    return want > lim ? want : lim;
}

uint64_t controller_late_wait_ns(const struct controller *ctrl)
{
    return ctrl ? (uint64_t)(ctrl->cfg.late_wait_ms * NS_PER_MS) : 0;
}

static uint32_t prefill_budget_within(const struct controller *ctrl, uint32_t n_decode,
                                      uint32_t max_tokens, double bound_ms)
{
    uint32_t min_chunk = ctrl->cfg.min_prefill_chunk;
    if (ctrl->mode == CONTROLLER_MODE_FIXED || n_decode == 0) return max_tokens;
    /* A prompt token's cost is what a step with prompt tokens takes over one without: while
     * no decode-only step was ever seen (prompts arriving faster than chunks run), the last
     * step of each window carries none, or it would never be learned. */
    if (!ctrl->have_plain && ctrl->n_in_window + 1 >= ctrl->cfg.interval) return 0;
    if (min_chunk >= max_tokens) return max_tokens;
    double per_tok = prefill_ms_per_token(ctrl);
    /* Not measured yet: a prompt token costs about what one more decoding row does (a prompt
     * token is one row of the same matmuls, without its own sampling). */
    if (per_tok <= 0.0 && have_fit(ctrl)) per_tok = ctrl->slope;
    if (per_tok <= 0.0) return min_chunk; /* nothing known: start small */
    double dec_ms = 0.0;
    if (n_decode > 0 && ctrl->have_dec) {
        dec_ms = have_fit(ctrl) ? line_ms(ctrl, (double)n_decode) : ctrl->dec_ema_ms;
        dec_ms += GROW_NOISE_K * ctrl->dev_ms;
    }
    double room = PREFILL_TARGET_SHARE * bound_ms - dec_ms;
    /* With the target out of reach every step misses it anyway: prompts may add up to half a
     * decode step, so first tokens come at a pace that follows the engine's, not 8 tokens a
     * step while a step takes seconds; with requests late in the queue (see unreach_limit)
     * up to two decode steps: the late requests miss their first-token target too, but a
     * running stream's gap stays bounded (the whole token budget made it seconds). */
    if (ctrl->unreach_knee) {
        bool late = ctrl->late_hold || unreach_late(ctrl, ctrl->last_pressure, ctrl->last_wait_ms);
        double share = late ? LATE_PREFILL_SHARE : UNREACH_PREFILL_SHARE;
        if (share * dec_ms > room) room = share * dec_ms;
    }
    double n = floor(room / per_tok);
    if (n < (double)min_chunk) return min_chunk;
    return n >= (double)max_tokens ? max_tokens : (uint32_t)n;
}

uint32_t controller_prefill_budget(const struct controller *ctrl, uint32_t n_decode,
                                   uint32_t max_tokens)
{
    if (!ctrl) return 0;
    return prefill_budget_within(ctrl, n_decode, max_tokens, ctrl->cfg.p99_target_ms);
}

uint32_t controller_late_prefill_budget(const struct controller *ctrl, uint32_t n_decode,
                                        uint32_t max_tokens)
{
    if (!ctrl) return 0;
    double bound = ctrl->cfg.p99_target_ms;
    if (ctrl->mode == CONTROLLER_MODE_TUNING) bound *= ctrl->cfg.late_p99_factor;
    return prefill_budget_within(ctrl, n_decode, max_tokens, bound);
}

uint32_t controller_limit(const struct controller *ctrl)
{
    return ctrl ? ctrl->limit : 0;
}

int controller_state(const struct controller *ctrl, struct controller_snapshot *out)
{
    if (!ctrl || !out) return KRS_ERR_INVALID;
    memset(out, 0, sizeof *out);
    out->limit = ctrl->limit;
    out->mode = ctrl->mode;
    out->ema_p99_ms = ctrl->have_ema ? ctrl->ema_ms : 0.0;
    out->last_window_p99_ms = ctrl->last_p99_ms;
    out->slope_ms_per_seq = ctrl->slope;
    if (have_fit(ctrl)) {
        out->intercept_ms = line_ms(ctrl, 0.0);
        out->capacity_limit = ctrl->have_dec ? capacity_limit(ctrl) : 0;
    }
    out->admit_limit = controller_admit_limit(ctrl);
    out->late_admit_limit = controller_late_admit_limit(ctrl);
    out->knee_limit = ctrl->knee;
    out->prefill_ms_per_token = prefill_ms_per_token(ctrl);
    out->window_tok_s = ctrl->last_tok_s;
    out->window_max_wait_ms = ctrl->last_wait_ms;
    out->windows = ctrl->windows;
    out->adjustments = ctrl->adjustments;
    out->degradations = ctrl->degradations;
    out->outliers = ctrl->outliers;
    out->recoveries = ctrl->recoveries;
    out->n_events = ctrl->ev_count;
    for (uint32_t i = 0; i < ctrl->ev_count; i++)
        out->events[i] = ctrl->events[(ctrl->ev_head + i) % CONTROLLER_EVENTS];
    return KRS_OK;
}

int controller_set_enabled(struct controller *ctrl, bool on, uint64_t now_ns)
{
    if (!ctrl) return KRS_ERR_INVALID;
    bool is_on = ctrl->mode != CONTROLLER_MODE_FIXED;
    if (on == is_on) return KRS_OK;
    uint32_t old = ctrl->limit;
    if (on) {
        ctrl->mode = CONTROLLER_MODE_TUNING;
        ctrl->ceiling = 0;
        push_event(ctrl, now_ns, CONTROLLER_EVENT_ENABLE, old, old,
                   "auto-tuning enabled at limit %u", old);
    } else {
        ctrl->mode = CONTROLLER_MODE_FIXED;
        ctrl->limit = fallback_limit(&ctrl->cfg);
        push_event(ctrl, now_ns, CONTROLLER_EVENT_DISABLE, old, ctrl->limit,
                   "auto-tuning disabled: fixed limit %u", ctrl->limit);
    }
    ctrl->cfg.enabled = on;
    return KRS_OK;
}

const char *controller_mode_name(enum controller_mode mode)
{
    switch (mode) {
    case CONTROLLER_MODE_TUNING:
        return "tuning";
    case CONTROLLER_MODE_DEGRADED:
        return "degraded";
    case CONTROLLER_MODE_FIXED:
        return "fixed";
    }
    return "unknown";
}

const char *controller_event_name(enum controller_event_kind kind)
{
    switch (kind) {
    case CONTROLLER_EVENT_GROW:
        return "grow";
    case CONTROLLER_EVENT_SHRINK:
        return "shrink";
    case CONTROLLER_EVENT_DEGRADE:
        return "degrade";
    case CONTROLLER_EVENT_RECOVER:
        return "recover";
    case CONTROLLER_EVENT_ENABLE:
        return "enable";
    case CONTROLLER_EVENT_DISABLE:
        return "disable";
    }
    return "unknown";
}
