/* Request fields -> grammar: OpenAI's response_format shapes and the GBNF "grammar" string,
 * validated once for every front end. Must not accept a shape it does not apply. */
#include "grammar/grammar.h"

#include "krserve.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

static int rfail(const char **param, const char *which, char *err, size_t errlen, int rc,
                 const char *msg)
{
    *param = which;
    snprintf(err, errlen, "%s", msg);
    return rc;
}

int grammar_from_request(const struct cJSON *rf, const struct cJSON *gbnf, struct grammar **out,
                         const char **param, char *err, size_t errlen)
{
    *out = NULL;
    *param = NULL;
    char why[200] = "";
    int has_rf = rf && !cJSON_IsNull(rf), has_g = gbnf && !cJSON_IsNull(gbnf);
    if (has_g) {
        if (!cJSON_IsString(gbnf))
            return rfail(param, "grammar", err, errlen, KRS_ERR_INVALID,
                         "'grammar' must be a string (GBNF)");
        const cJSON *ty =
            has_rf && cJSON_IsObject(rf) ? cJSON_GetObjectItemCaseSensitive(rf, "type") : NULL;
        if (has_rf && !(cJSON_IsString(ty) && !strcmp(ty->valuestring, "text")))
            return rfail(param, "grammar", err, errlen, KRS_ERR_INVALID,
                         "'grammar' and 'response_format' cannot be combined");
        int rc = grammar_compile_gbnf(gbnf->valuestring, strlen(gbnf->valuestring), out, why,
                                      sizeof why);
        if (rc) {
            *param = "grammar";
            snprintf(err, errlen, "invalid grammar: %s", why);
        }
        return rc;
    }
    if (!has_rf) return KRS_OK;
    if (!cJSON_IsObject(rf))
        return rfail(param, "response_format", err, errlen, KRS_ERR_INVALID,
                     "'response_format' must be an object");
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rf, "type");
    if (!cJSON_IsString(ty))
        return rfail(param, "response_format", err, errlen, KRS_ERR_INVALID,
                     "'response_format.type' must be a string");
    const char *t = ty->valuestring;
    int rc;
    if (!strcmp(t, "text")) return KRS_OK;
    if (!strcmp(t, "json_object")) {
        rc = grammar_compile_json_schema(NULL, 0, out, why, sizeof why);
    } else if (!strcmp(t, "json_schema")) {
        const cJSON *js = cJSON_GetObjectItemCaseSensitive(rf, "json_schema");
        if (!cJSON_IsObject(js))
            return rfail(param, "response_format", err, errlen, KRS_ERR_INVALID,
                         "'response_format.json_schema' must be an object");
        const cJSON *schema = cJSON_GetObjectItemCaseSensitive(js, "schema");
        if (!schema || cJSON_IsNull(schema)) {
            /* OpenAI: a json_schema without a schema is any JSON object */
            rc = grammar_compile_json_schema(NULL, 0, out, why, sizeof why);
        } else {
            char *text = cJSON_PrintUnformatted(schema);
            if (!text) return KRS_ERR_NOMEM;
            rc = grammar_compile_json_schema(text, strlen(text), out, why, sizeof why);
            cJSON_free(text);
        }
    } else {
        snprintf(why, sizeof why,
                 "response_format type '%.40s' is not supported (text, json_object, json_schema)",
                 t);
        return rfail(param, "response_format", err, errlen, KRS_ERR_INVALID, why);
    }
    if (rc) {
        *param = "response_format";
        snprintf(err, errlen, "%s%s", rc == KRS_ERR_UNSUPPORTED ? "unsupported schema: " : "", why);
    }
    return rc;
}
