/* OpenAI tool calling on /v1/chat/completions: tools, tool_choice, and the tool turns of a
 * conversation. Pure (no I/O, no engine), called by the request parser.
 *
 * The model learns the tools from a system message this file writes (the function names,
 * descriptions and parameter schemas, and the reply convention: a JSON object
 * {"name": ..., "arguments": {...}}); models whose chat template this server renders have no
 * native tool format in it. The convention is then enforced by a grammar:
 *   tool_choice "required": one call of any tool (anyOf over {"name": const, "arguments": params})
 *   a named function:       its arguments object alone (the name is known)
 *   "auto" (the default):   either such a call, or text that does not start with '{'
 *   "none":                 no grammar and no tool prompt
 * server_gen.c turns a call into `tool_calls` (finish_reason "tool_calls").
 * Conversation turns: an assistant message with tool_calls becomes the call's JSON text, a
 * "tool" message a user turn with the result, so templates that only know user/assistant work. */
#include "server/server.h"

#include "grammar/grammar.h"
#include "krserve.h"
#include "util/alloc.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#define MAX_TOOLS 64

static int name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > SERVER_TOOL_NAME_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* The call schema of one tool: {"name": const, "arguments": parameters}. */
static cJSON *call_schema(const char *name, const cJSON *params)
{
    cJSON *s = cJSON_CreateObject(), *props = cJSON_AddObjectToObject(s, "properties");
    cJSON_AddStringToObject(s, "type", "object");
    cJSON *n = cJSON_AddObjectToObject(props, "name");
    cJSON_AddStringToObject(n, "const", name);
    cJSON_AddItemToObject(props, "arguments", cJSON_Duplicate(params, 1));
    cJSON *req = cJSON_AddArrayToObject(s, "required");
    cJSON_AddItemToArray(req, cJSON_CreateString("name"));
    cJSON_AddItemToArray(req, cJSON_CreateString("arguments"));
    return s;
}

static int compile(const cJSON *schema, int auto_mode, struct grammar **out, char *why, size_t wl)
{
    char *text = cJSON_PrintUnformatted(schema), *gbnf = NULL;
    if (!text) return KRS_ERR_NOMEM;
    int rc = grammar_schema_to_gbnf(text, strlen(text), &gbnf, why, wl);
    cJSON_free(text);
    if (rc) return rc;
    if (auto_mode) {
        /* the schema's start rule becomes `call`; text is anything not starting with '{' */
        char *root = strstr(gbnf, "\nroot ::= ");
        size_t n = strlen(gbnf);
        char *g2 = root ? alloc_malloc(n + 64) : NULL;
        if (!g2) {
            alloc_free(gbnf);
            return root ? KRS_ERR_NOMEM : KRS_ERR_INTERNAL;
        }
        size_t head = (size_t)(root - gbnf) + 1;
        memcpy(g2, gbnf, head);
        snprintf(g2 + head, n + 64 - head, "call ::= %s\nroot ::= call | [^{] .*\n",
                 root + strlen("\nroot ::= "));
        alloc_free(gbnf);
        gbnf = g2;
    }
    rc = grammar_compile_gbnf(gbnf, strlen(gbnf), out, why, wl);
    alloc_free(gbnf);
    return rc;
}

int server_parse_tools(const cJSON *root, struct server_gen_request *out, struct server_error *err)
{
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    int has_tools = tools && !cJSON_IsNull(tools) && cJSON_GetArraySize(tools) > 0;
    if (tools && !cJSON_IsNull(tools) && !cJSON_IsArray(tools))
        return server_parse_fail(err, "tools", "'tools' must be an array");
    out->tool_mode = has_tools ? SERVER_TOOLS_AUTO : SERVER_TOOLS_NONE;
    if (tc && !cJSON_IsNull(tc)) {
        const cJSON *fn =
            cJSON_IsObject(tc) ? cJSON_GetObjectItemCaseSensitive(tc, "function") : NULL;
        const cJSON *fname = fn ? cJSON_GetObjectItemCaseSensitive(fn, "name") : NULL;
        if (cJSON_IsString(tc) && !strcmp(tc->valuestring, "none"))
            out->tool_mode = SERVER_TOOLS_NONE;
        else if (cJSON_IsString(tc) && !strcmp(tc->valuestring, "auto"))
            out->tool_mode = has_tools ? SERVER_TOOLS_AUTO : SERVER_TOOLS_NONE;
        else if (cJSON_IsString(tc) && !strcmp(tc->valuestring, "required"))
            out->tool_mode = SERVER_TOOLS_REQUIRED;
        else if (cJSON_IsString(fname)) {
            out->tool_mode = SERVER_TOOLS_NAMED;
            snprintf(out->tool_name, sizeof out->tool_name, "%s", fname->valuestring);
        } else
            return server_parse_fail(err, "tool_choice",
                                     "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}");
        if (out->tool_mode != SERVER_TOOLS_NONE && !has_tools)
            return server_parse_fail(err, "tool_choice", "'tool_choice' needs 'tools'");
    }
    if (out->tool_mode == SERVER_TOOLS_NONE) return KRS_OK;
    if (out->api != SERVER_API_CHAT)
        return server_parse_fail(err, "tools", "tools are supported on /v1/chat/completions");
    if (out->grammar)
        return server_parse_fail(err, "tools",
                                 "tools cannot be combined with response_format or grammar");
    int n = cJSON_GetArraySize(tools);
    if (n > MAX_TOOLS) return server_parse_fail(err, "tools", "at most %d tools", MAX_TOOLS);

    cJSON *any = cJSON_CreateArray(), *named = NULL;
    char *prompt = NULL;
    size_t plen = 0, pcap = 0;
    int rc = KRS_OK, found = 0;
    char why[200] = "";
#define PUT(s)                                                                                     \
    do {                                                                                           \
        size_t l_ = strlen(s);                                                                     \
        if (plen + l_ + 1 > pcap) {                                                                \
            size_t nc = (plen + l_ + 1) * 2;                                                       \
            char *np = alloc_realloc(prompt, nc);                                                  \
            if (!np) {                                                                             \
                rc = server_parse_fail(err, "tools", "out of memory");                             \
                goto out;                                                                          \
            }                                                                                      \
            prompt = np, pcap = nc;                                                                \
        }                                                                                          \
        memcpy(prompt + plen, s, l_ + 1);                                                          \
        plen += l_;                                                                                \
    } while (0)
    PUT("You can call these functions. Each is listed with its parameters as a JSON Schema.\n");
    for (const cJSON *t = tools->child; t; t = t->next) {
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(t, "type");
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
        const cJSON *nm = fn ? cJSON_GetObjectItemCaseSensitive(fn, "name") : NULL;
        const cJSON *desc = fn ? cJSON_GetObjectItemCaseSensitive(fn, "description") : NULL;
        const cJSON *params = fn ? cJSON_GetObjectItemCaseSensitive(fn, "parameters") : NULL;
        if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "function") || !cJSON_IsObject(fn)) {
            rc = server_parse_fail(err, "tools",
                                   "only tools of type \"function\" with a 'function' object are "
                                   "supported");
            goto out;
        }
        if (!cJSON_IsString(nm) || !name_ok(nm->valuestring)) {
            rc = server_parse_fail(err, "tools",
                                   "function names must be 1 to 64 characters of a-z, A-Z, 0-9, "
                                   "_ and -");
            goto out;
        }
        cJSON *empty = NULL;
        if (!params || cJSON_IsNull(params)) {
            empty = cJSON_Parse("{\"type\":\"object\",\"additionalProperties\":false}");
            params = empty;
        }
        char *ptxt = cJSON_PrintUnformatted(params);
        char line[256];
        snprintf(line, sizeof line, "- %s", nm->valuestring);
        PUT(line);
        if (cJSON_IsString(desc) && utf8_valid(desc->valuestring, strlen(desc->valuestring))) {
            PUT(": ");
            PUT(desc->valuestring);
        }
        PUT("\n  parameters: ");
        PUT(ptxt ? ptxt : "{}");
        PUT("\n");
        cJSON_free(ptxt);
        if (cJSON_GetObjectItemCaseSensitive(params, "$defs") ||
            cJSON_GetObjectItemCaseSensitive(params, "definitions")) {
            if (out->tool_mode != SERVER_TOOLS_NAMED) {
                cJSON_Delete(empty);
                rc = server_parse_fail(err, "tools",
                                       "unsupported schema: $defs in function parameters are "
                                       "supported only with a named tool_choice");
                goto out;
            }
        }
        if (out->tool_mode == SERVER_TOOLS_NAMED && !strcmp(nm->valuestring, out->tool_name)) {
            named = cJSON_Duplicate(params, 1);
            found = 1;
        }
        cJSON_AddItemToArray(any, call_schema(nm->valuestring, params));
        cJSON_Delete(empty);
    }
    if (out->tool_mode == SERVER_TOOLS_NAMED) {
        if (!found) {
            rc = server_parse_fail(err, "tool_choice", "tool_choice names '%.64s', not in 'tools'",
                                   out->tool_name);
            goto out;
        }
        PUT("Call the function ");
        PUT(out->tool_name);
        PUT(" now: reply with only its arguments, as one JSON object.");
        rc = compile(named, 0, &out->grammar, why, sizeof why);
    } else {
        PUT("To call a function, reply with only a JSON object {\"name\": <function name>, "
            "\"arguments\": <its arguments>}");
        PUT(out->tool_mode == SERVER_TOOLS_REQUIRED ? ". You must call one now."
                                                    : "; otherwise reply in plain text.");
        cJSON *schema = cJSON_CreateObject();
        cJSON_AddItemToObject(schema, "anyOf", any);
        any = NULL;
        rc = compile(schema, out->tool_mode == SERVER_TOOLS_AUTO, &out->grammar, why, sizeof why);
        cJSON_Delete(schema);
    }
    if (rc) {
        rc = server_parse_fail(err, "tools", "%s%s",
                               rc == KRS_ERR_UNSUPPORTED ? "unsupported schema in tools: " : "",
                               why);
        goto out;
    }
    out->tool_prompt = prompt;
    prompt = NULL;
#undef PUT
out:
    cJSON_Delete(any);
    cJSON_Delete(named);
    alloc_free(prompt);
    return rc;
}

/* Text for an assistant turn that called tools: the calls in the reply convention. */
static char *calls_text(const cJSON *calls)
{
    cJSON *arr = cJSON_CreateArray();
    for (const cJSON *c = calls->child; c; c = c->next) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
        const cJSON *nm = fn ? cJSON_GetObjectItemCaseSensitive(fn, "name") : NULL;
        const cJSON *args = fn ? cJSON_GetObjectItemCaseSensitive(fn, "arguments") : NULL;
        if (!cJSON_IsString(nm)) continue;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", nm->valuestring);
        cJSON *a = cJSON_IsString(args) ? cJSON_Parse(args->valuestring) : NULL;
        cJSON_AddItemToObject(o, "arguments", a ? a : cJSON_CreateObject());
        cJSON_AddItemToArray(arr, o);
    }
    const cJSON *one = cJSON_GetArraySize(arr) == 1 ? arr->child : arr;
    char *t = cJSON_PrintUnformatted(one);
    cJSON_Delete(arr);
    if (!t) return NULL;
    char *copy = alloc_strdup(t);
    cJSON_free(t);
    return copy;
}

int server_tool_turn(const cJSON *msg, int idx, const char **role, char **text,
                     struct server_error *err)
{
    *text = NULL;
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(msg, "tool_calls");
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(msg, "content");
    if (!strcmp(*role, "assistant") && cJSON_IsArray(calls) && cJSON_GetArraySize(calls) > 0 &&
        (!content || cJSON_IsNull(content))) {
        *text = calls_text(calls);
        if (!*text) return server_parse_fail(err, "messages", "out of memory");
        return KRS_OK;
    }
    if (!strcmp(*role, "tool")) {
        if (!cJSON_IsString(content) ||
            !utf8_valid(content->valuestring, strlen(content->valuestring)))
            return server_parse_fail(err, "messages", "messages[%d].content must be a UTF-8 string",
                                     idx);
        const char *pre = "Function result: ";
        size_t n = strlen(pre) + strlen(content->valuestring) + 1;
        *text = alloc_malloc(n);
        if (!*text) return server_parse_fail(err, "messages", "out of memory");
        snprintf(*text, n, "%s%s", pre, content->valuestring);
        *role = "user";
    }
    return KRS_OK;
}
