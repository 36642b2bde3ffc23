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

#define FIT_DECAY      0.9  /* per-window decay of the least-squares statistics */
#define FIT_MIN_VAR    0.25 /* batch-size variance needed before the fitted slope is trusted */
#define FIT_RESET_FRAC 0.1  /* residual (share of target) that restarts the fit */
#define GROW_NOISE_K   2.0  /* growth keeps this many mean deviations of headroom */
#define NS_PER_MS      1000000.0

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

/* Nearest-rank P99 of the window (ceil(0.99 n)-th smallest), in ms. */
static double window_p99_ms(const struct controller *c)
{
    uint64_t v[CONTROLLER_MAX_INTERVAL];
    uint32_t n = c->n_in_window;
    memcpy(v, c->window_ns, n * sizeof v[0]);
    for (uint32_t i = 1; i < n; i++) {
        uint64_t x = v[i];
        uint32_t j = i;
        while (j > 0 && v[j - 1] > x) {
            v[j] = v[j - 1];
            j--;
        }
        v[j] = x;
    }
    uint32_t rank = (uint32_t)ceil(0.99 * (double)n);
    if (rank < 1) rank = 1;
    return (double)v[rank - 1] / NS_PER_MS;
}

/* Folds a (non-spike) window into the EMA and the latency-vs-batch fit. */
static bool have_fit(const struct controller *c);

static void fold_window(struct controller *c, double p99_ms, double mean_batch)
{
    if (!c->have_ema) {
        c->ema_ms = p99_ms;
        c->have_ema = true;
    } else {
        double a = c->cfg.ema_alpha;
        /* Noise is what the batch size does not explain: the residual from the fitted line
         * once there is one (a limit that just grew moves P99 away from the EMA by design). */
        double expect = c->ema_ms;
        if (have_fit(c)) expect = c->sy / c->sw + c->slope * (mean_batch - c->sx / c->sw);
        c->dev_ms = a * fabs(p99_ms - expect) + (1.0 - a) * c->dev_ms;
        c->ema_ms = a * p99_ms + (1.0 - a) * c->ema_ms;
    }
    /* A window at the batch size the fit is centred on but far off the fitted line means the cost
     * model changed (another model load, thermal throttling, prompts of another length): start the
     * fit afresh. */
    if (c->sw > 0.0) {
        double mx = c->sx / c->sw, my = c->sy / c->sw;
        double expect = my + c->slope * (mean_batch - mx);
        if (fabs(mean_batch - mx) < 1.0 &&
            fabs(p99_ms - expect) > FIT_RESET_FRAC * c->cfg.p99_target_ms)
            c->sw = c->sx = c->sy = c->sxx = c->sxy = 0.0;
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
    }
}

static bool have_fit(const struct controller *c)
{
    if (c->sw <= 0.0) return false;
    double mx = c->sx / c->sw;
    return c->sxx / c->sw - mx * mx >= FIT_MIN_VAR || c->slope > 0.0;
}

static void tune(struct controller *c, double p99_ms, double mean_batch, bool pressure,
                 uint32_t demand, uint64_t now_ns)
{
    const struct controller_config *cfg = &c->cfg;
    double target = cfg->p99_target_ms;
    uint32_t old = c->limit;

    if (c->ceiling) {
        if (c->ceiling_left > 0) c->ceiling_left--;
        if (c->ceiling_left == 0 || c->ema_ms < cfg->ceiling_reset * target) c->ceiling = 0;
    }

    if (c->ema_ms > target && p99_ms > target) {
        if (old <= cfg->min_batch) return;
        double want = floor((double)old * target / c->ema_ms);
        double floor_cut = ceil((double)old * (1.0 - cfg->max_shrink_fraction));
        if (want < floor_cut) want = floor_cut;
        if (want > (double)(old - 1)) want = (double)(old - 1);
        uint32_t nl = clamp_limit(cfg, want < 1.0 ? 1u : (uint32_t)want);
        c->ceiling = old;
        c->ceiling_left = cfg->ceiling_windows;
        c->limit = nl;
        c->adjustments++;
        push_event(c, now_ns, CONTROLLER_EVENT_SHRINK, old, nl,
                   "shrink %u -> %u: ema p99 %.1f ms and window p99 %.1f ms > target %.1f ms", old,
                   nl, c->ema_ms, p99_ms, target);
        return;
    }
    if (!pressure || old >= cfg->max_batch || c->ema_ms > target || p99_ms > target) return;

    uint32_t step = (uint32_t)floor(cfg->grow_fraction * (double)old);
    if (step < 1) step = 1;
    bool fit = have_fit(c);
    /* With a fitted slope the prediction below picks the step: up to +50 % at once, so a limit
     * far under target converges in a few windows instead of +1 per window. */
    if (fit && step < old / 2) step = old / 2 > 1 ? old / 2 : 1;
    uint32_t nl = clamp_limit(cfg, old + step);
    /* Room beyond what was asked for in the window buys nothing (one probe step aside). */
    if (nl > old + 1 && nl > demand) nl = demand > old + 1 ? demand : old + 1;
    if (c->ceiling && nl >= c->ceiling) nl = c->ceiling - 1;
    double base_batch = mean_batch >= 1.0 ? mean_batch : 1.0;
    /* Before two batch sizes were seen the slope is unknown: probe with a single +1 step
     * (bounded by the shrink rule and the ceiling if it goes over). */
    if (!fit) nl = old + 1 <= nl ? old + 1 : nl;
    double slope = fit ? c->slope : 0.0;
    /* Predict from the fresher of the two: the EMA lags a limit that just grew. */
    double now_ms = p99_ms > c->ema_ms ? p99_ms : c->ema_ms;
    double pred = 0.0;
    while (nl > old) {
        pred = now_ms + slope * ((double)nl - base_batch);
        if (pred + GROW_NOISE_K * c->dev_ms <= target) break;
        nl--;
    }
    if (nl <= old) return;
    c->limit = nl;
    c->adjustments++;
    push_event(c, now_ns, CONTROLLER_EVENT_GROW, old, nl,
               "grow %u -> %u: ema p99 %.1f ms, predicted %.1f ms <= target %.1f ms", old, nl,
               c->ema_ms, pred, target);
}

static void evaluate_window(struct controller *c, uint64_t now_ns)
{
    const struct controller_config *cfg = &c->cfg;
    double p99 = window_p99_ms(c);
    double mean_batch = (double)c->batch_sum / (double)c->n_in_window;
    bool pressure = c->pressure;
    uint32_t demand = c->demand;
    c->n_in_window = 0;
    c->batch_sum = 0;
    c->pressure = false;
    c->demand = 0;
    c->windows++;
    c->last_p99_ms = p99;

    bool spike = c->have_ema && p99 > cfg->degrade_factor_target * cfg->p99_target_ms &&
                 p99 > cfg->degrade_factor_ema * c->ema_ms;

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
            push_event(c, now_ns, CONTROLLER_EVENT_DEGRADE, old, nl,
                       "p99 %.1f ms > %.1fx target %.1f ms and %.1fx ema %.1f ms; limit %u -> %u",
                       p99, cfg->degrade_factor_target, cfg->p99_target_ms, cfg->degrade_factor_ema,
                       c->ema_ms, old, nl);
            return;
        }
        fold_window(c, p99, mean_batch);
        tune(c, p99, mean_batch, pressure, demand, now_ns);
        return;
    case CONTROLLER_MODE_DEGRADED:
        if (spike) {
            c->last_spike_ns = now_ns;
            return;
        }
        fold_window(c, p99, mean_batch);
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
        fold_window(c, p99, mean_batch);
        return;
    }
}

uint32_t controller_observe_step(struct controller *ctrl, uint64_t step_latency_ns,
                                 uint32_t batch_size, uint32_t queued_waiting, uint64_t now_ns)
{
    if (!ctrl) return 0;
    if (batch_size == 0) return ctrl->limit; /* idle steps say nothing about batch cost */
    ctrl->window_ns[ctrl->n_in_window++] = step_latency_ns;
    ctrl->batch_sum += batch_size;
    if (queued_waiting > 0 || batch_size >= ctrl->limit) ctrl->pressure = true;
    uint64_t want = (uint64_t)batch_size + queued_waiting;
    if (want > ctrl->demand) ctrl->demand = want > UINT32_MAX ? UINT32_MAX : (uint32_t)want;
    if (ctrl->n_in_window >= ctrl->cfg.interval) evaluate_window(ctrl, now_ns);
    return ctrl->limit;
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
    out->windows = ctrl->windows;
    out->adjustments = ctrl->adjustments;
    out->degradations = ctrl->degradations;
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
