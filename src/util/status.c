/* Names for the shared status codes of include/krserve.h. */
#include "krserve.h"

const char *krs_status_str(int status)
{
    switch (status) {
    case KRS_OK:
        return "ok";
    case KRS_ERR_INVALID:
        return "invalid argument";
    case KRS_ERR_NOMEM:
        return "out of memory";
    case KRS_ERR_IO:
        return "i/o error";
    case KRS_ERR_FORMAT:
        return "malformed input";
    case KRS_ERR_UNSUPPORTED:
        return "unsupported";
    case KRS_ERR_AGAIN:
        return "try again later";
    case KRS_ERR_NOT_FOUND:
        return "not found";
    case KRS_ERR_CANCELLED:
        return "cancelled";
    case KRS_ERR_FULL:
        return "full";
    case KRS_ERR_STATE:
        return "not allowed in this state";
    case KRS_ERR_INTERNAL:
        return "internal error";
    default:
        return "unknown status";
    }
}

const char *krs_version(void)
{
    return KRS_VERSION;
}
