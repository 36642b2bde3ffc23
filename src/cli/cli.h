/* Sub-commands of the krserve binary. Each lives in its own cli_<name>.c, takes the arguments
 * after the sub-command name (argv[0] is the sub-command) and returns the process exit code. */
#ifndef KRS_CLI_H
#define KRS_CLI_H

/* Resolves the model path: explicit (-m) > $KRSERVE_MODEL > the default path below. Prints a
 * one-line error saying how to get the default model and returns NULL when it does not exist. */
const char *cli_model_path(const char *explicit_path);

#define CLI_DEFAULT_MODEL "models/default.gguf"

/* Sub-command entry points (one per cli_<name>.c). */
int cli_config(int argc, char **argv);
int cli_eval(int argc, char **argv);
int cli_generate(int argc, char **argv);
int cli_inspect(int argc, char **argv);
int cli_serve(int argc, char **argv);
int cli_rpc(int argc, char **argv);
int cli_tokenize(int argc, char **argv);

#endif
