/* A test guest probing its WASI world: files, environment, stdin, exit codes, traps. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 2) return 100;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "read") && argc > 2) { /* print a file's first line, or "denied" */
        FILE *f = fopen(argv[2], "r");
        if (!f) { puts("denied"); return 3; }
        char line[256] = {0};
        fgets(line, sizeof line, f);
        fputs(line, stdout);
        fclose(f);
        return 0;
    }
    if (!strcmp(cmd, "write") && argc > 3) {
        FILE *f = fopen(argv[2], "w");
        if (!f) { puts("denied"); return 3; }
        fputs(argv[3], f);
        fclose(f);
        return 0;
    }
    if (!strcmp(cmd, "env")) { /* print every variable the guest can see */
        extern char **environ;
        for (char **e = environ; *e; e++) puts(*e);
        return 0;
    }
    if (!strcmp(cmd, "echo")) { /* stdin to stdout, upper-cased */
        int c;
        while ((c = getchar()) != EOF) putchar(c >= 'a' && c <= 'z' ? c - 32 : c);
        return 0;
    }
    if (!strcmp(cmd, "exit") && argc > 2) return atoi(argv[2]);
    if (!strcmp(cmd, "trap")) { volatile int *p = (int *)0xFFFFFFF0u; return *p; }
    if (!strcmp(cmd, "spin")) { volatile unsigned long i = 0; for (;;) i++; }
    if (!strcmp(cmd, "grow")) { /* allocate until malloc fails: prints the MiB it got */
        size_t total = 0;
        void *volatile sink;
        while ((sink = malloc(1 << 20)) != NULL) total++;
        printf("%zu\n", total);
        return 0;
    }
    return 101;
}
