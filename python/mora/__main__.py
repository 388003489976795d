"""`python -m mora`: the package's command line.

    python -m mora run [--stop] SCRIPT [ARGS...]
"""

from __future__ import annotations

import sys
from typing import List

RUN_HELP = """\
usage: python -m mora run SCRIPT [ARGS...]
       python -m mora run --stop

Runs SCRIPT as `python SCRIPT ARGS...` would, in a fresh process forked from
a warm interpreter that has already imported the heavy modules: the script
starts without paying for `import torch, diffusers, transformers`.

The script gets this process's arguments, environment, working directory,
stdin, stdout and stderr; its exit status comes back as this process's, and
a script killed by a signal kills this one with the same signal. SIGINT,
SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent here go to the script's
process group. Each run is its own process: a crash or a leak in one never
reaches the next. Runs keep the memory they free for reuse (glibc's malloc:
no fresh mapping per large block, no trimming) unless MALLOC_* or a
glibc.malloc tunable in GLIBC_TUNABLES is set.

The warm interpreter (the run server) starts on first use, saying so in one
line on stderr, and listens beside the Mora daemon's socket
($MORA_SOCKET's directory, else $XDG_RUNTIME_DIR/mora, else /tmp/mora-$UID):
one per Python interpreter, MORA_PRELOAD and import-time environment
(PYTHON*, HF_*, TORCH*, OMP_*, MALLOC_*, ...). It is replaced when a preloaded
package, or this package, changes on disk, and exits after MORA_RUN_IDLE
seconds without a run (default 3600; 0: never).

  MORA_PRELOAD   modules to import in the server, comma-separated; an entry
                 MODULE:ATTR also reads the attribute (diffusers and
                 transformers import their classes on first use). Default:
                 torch, transformers, diffusers and their common classes,
                 those installed.
  --stop         stop this interpreter's run server (its runs finish first).
"""

USAGE = """\
usage: python -m mora COMMAND ...

commands:
  run SCRIPT [ARGS...]   run a script in a process forked from a warm interpreter
                         (python -m mora run --help)
"""


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "run":
        sys.stderr.write("python -m mora: unknown command %r\n%s" % (command, USAGE))
        return 2
    if not rest:
        sys.stderr.write(RUN_HELP.split("\n\n")[0] + "\npython -m mora run: a script to run is required\n")
        return 2
    if rest[0] in ("-h", "--help"):
        sys.stdout.write(RUN_HELP)
        return 0
    from . import _run_client

    if rest[0] == "--stop":
        return _run_client.stop()
    if rest[0].startswith("-") and rest[0] != "-":
        sys.stderr.write("python -m mora run: unknown option %s (python -m mora run --help)\n" % rest[0])
        return 2
    try:
        _run_client.run(rest)
    except _run_client.RunError as e:
        sys.stderr.write("python -m mora run: %s\n" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
