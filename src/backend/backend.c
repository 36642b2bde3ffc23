/* Backend registry: which devices this build has, and creating one by name. The one place that
 * knows the list, so front ends and tests pick a device with a string from configuration. */
#include "backend/backend.h"

#include "krserve.h"

#include <stdio.h>
#include <string.h>

int backend_available(const char *device)
{
    if (!device) return 0;
    if (!strcmp(device, "cpu")) return 1;
#ifdef KRS_HAVE_CUDA
    if (!strcmp(device, "cuda")) return 1;
#endif
    return 0;
}

int backend_create(const char *device, const struct backend_params *p, struct backend **out,
                   char *err, size_t errlen)
{
    *out = NULL;
    if (!device || !strcmp(device, "cpu")) {
        int rc = backend_cpu_create(p, out);
        if (rc) snprintf(err, errlen, "CPU backend: %s", krs_status_str(rc));
        return rc;
    }
    if (!strcmp(device, "cuda")) {
#ifdef KRS_HAVE_CUDA
        return backend_cuda_create(p, out, err, errlen);
#else
        snprintf(err, errlen,
                 "device 'cuda' is not available: this build has no CUDA backend "
                 "(rebuild with nvcc installed, -DKRS_CUDA=ON)");
        return KRS_ERR_UNSUPPORTED;
#endif
    }
    snprintf(err, errlen, "unknown device '%s' (expected cpu or cuda)", device);
    return KRS_ERR_INVALID;
}
