/* Sub-commands of the krserve binary. Each lives in its own cli_<name>.c, takes the arguments
 * after the sub-command name (argv[0] is the sub-command) and returns the process exit code. */
#ifndef KRS_CLI_H
#define KRS_CLI_H

#include <stddef.h>
#include <stdio.h>

/* Resolves the model path: explicit (-m) > $KRSERVE_MODEL > the default path below. Prints a
 * one-line error saying how to get the default model and returns NULL when it does not exist. */
const char *cli_model_path(const char *explicit_path);

#define CLI_DEFAULT_MODEL "models/default.gguf"

/* Reads one line of f (without its newline) into *buf, grown with alloc_realloc (the caller
 * alloc_frees it). Returns its length, -1 at end of input, -2 out of memory. */
long cli_read_line(FILE *f, char **buf, size_t *cap);

/* Sub-command entry points (one per cli_<name>.c). */
int cli_config(int argc, char **argv);
int cli_eval(int argc, char **argv);
int cli_generate(int argc, char **argv);
int cli_inspect(int argc, char **argv);
int cli_serve(int argc, char **argv);
int cli_rpc(int argc, char **argv);
int cli_tokenize(int argc, char **argv);

#endif
