#!/usr/bin/env python3
"""Print docs/src/reference/cli.md: the conventions below, then every
command's `--help`, as a built keyhole prints it.

Usage: scripts/cli-reference.py [KEYHOLE] > docs/src/reference/cli.md
KEYHOLE defaults to target/debug/keyhole (cargo build first).
"""

import re
import subprocess
import sys

COMMANDS = [
    "", "serve",
    "secret", "secret put", "secret rotate", "secret get", "secret ls", "secret history", "secret rm",
    "workload", "workload add", "workload ls", "workload rm",
    "grant", "revoke", "grants", "mounts", "status", "refresh", "whoami", "audit",
    "template", "template put", "template get", "template ls", "template rm",
    "doctor", "completions", "man",
    "role", "role add", "role ls", "role rm", "apply", "diff", "export",
    "dynamic", "dynamic add", "dynamic ls", "dynamic rm",
    "cert", "cert add", "cert ls", "cert rm", "leases",
]

NOTES = '''# Command line

Every verb and flag, as `keyhole <command> --help` prints it (this page is
that output, made by `scripts/cli-reference.py`: run it again when a
command changes). The same text is in the man pages:
`keyhole man` (the main page), `keyhole man secret put` (one subcommand),
`keyhole man --dir DIR` (all of them, one file each;
see [Operating keyhole](../operating.md#completions-and-man-page)).

In short:

```text
keyhole serve [--config FILE] [--state-dir DIR] [--run-dir DIR] [--takeover] [--new-audit-log]
              [--log-format text|json] [--log-level FILTER]
keyhole secret put|rotate PATH (--stdin | --from-file F | --generate N) [--if-version N]
keyhole secret get PATH [--version N]
keyhole secret ls [PREFIX]  |  history PATH  |  rm PATH
keyhole workload add NAME --selector SEL...  |  ls  |  rm NAME
keyhole grant SECRET --to WORKLOAD [--file NAME] [--mode 0400] [--uid N] [--gid N] [--notify SIGNAL]
              [--restart [--restart-spacing 10s]] [--exec 'CMD ARGS']
keyhole grant --template NAME --to WORKLOAD [--file NAME] [--mode 0400] [--uid N] [--gid N] [--notify SIGNAL]
              [--restart [--restart-spacing 10s]] [--exec 'CMD ARGS']
keyhole revoke (SECRET | --template NAME) --from WORKLOAD  |  grants [--workload W]  |  mounts
keyhole template put NAME (--stdin | --from-file F)  |  get NAME [--version N]  |  ls  |  rm NAME
keyhole status  |  refresh [PATH | --backend NAME]  |  whoami  |  audit [--follow | --verify]
keyhole doctor [--config FILE] [--state-dir DIR] [--run-dir DIR]
keyhole completions bash|zsh|fish|elvish|powershell
keyhole man [SUBCOMMAND...] | man --dir DIR
keyhole role add NAME --principal uid:N|gid:N|subject:DN... [--paths P]... [--workloads W]... --verbs V,...
keyhole role ls  |  role rm NAME
keyhole apply -f FILE [--prune]  |  diff -f FILE [--prune]  |  export
global: --socket PATH (env KEYHOLE_SOCKET), --json,
        --endpoint https://HOST:PORT --cert F --key F --ca F (env KEYHOLE_ENDPOINT, _CERT, _KEY, _CA)
```

## Conventions

- **Values never go on the command line.** `--stdin` and `--from-file` keep
  every byte as given (a trailing newline too: use `printf`, not `echo`).
  `--generate N` has the broker make N characters from `[A-Za-z0-9]`; the
  value is never sent back by `put`/`rotate`.
- `put` creates a secret or adds a version; `rotate` adds a version and
  fails (exit 3) if the secret does not exist. `--if-version N` writes only
  if the secret is at version N now (`0`: only if it is new); otherwise
  exit 7.
- `get` writes the raw value to stdout; with `--json`, as `value_base64`.
- `--socket` defaults to `/run/keyhole/admin.sock`, and for `whoami` to
  `/run/keyhole/workload.sock`. `--endpoint` (with `--cert`, `--key`,
  `--ca`) sends admin calls to a [remote broker](../operating.md#remote-admin)
  instead; `whoami` is never served there.
- `--json` prints one JSON object (or array) with stable field names:
  `path`, `version`, `created` (RFC 3339), `size`. Every listing has it
  (`secret ls`, `history`, `workload ls`, `grants`, `mounts`, `status`,
  `doctor`); `audit --json` prints one object per line. The tables without
  it fit 80 columns: the one column that can grow long (a path, a
  selector) comes last.
- Secret paths: segments of `[A-Za-z0-9._-]` joined by `/`, no `.` or `..`
  segment, at most 256 bytes. `ls db` lists `db` and `db/...`, not `dbx`.
- Workload names: `[A-Za-z0-9._-]`, up to 64 characters, not starting
  with `.` or `-`.
- Values: 1 byte to `max_value_bytes` (1 MiB by default).
- Errors are one line on stderr and never contain a value; the [exit
  status](../troubleshooting.md#exit-status) says what kind.
- `keyhole diff` exits **10** when the broker differs from the file (what
  `apply` would change is printed), 0 when it matches, and 1-7 on errors
  only: CI tells drift from failure. A scoped admin's call outside its
  roles exits 4 (see [Teams](../teams.md)).
- The CLI waits up to 5 s for a broker that is starting, restarting or
  handing over, and repeats a read cut off by a handover; a change cut off
  mid-call is not repeated — it exits 5 saying the change may or may not
  have been made.

'''


def main(argv):
    keyhole = argv[0] if argv else "target/debug/keyhole"
    sections = []
    for c in COMMANDS:
        h = subprocess.run([keyhole, *c.split(), "--help"], capture_output=True, text=True, check=True).stdout
        h = h.rstrip()
        if c:
            # The global client options are said once, under `keyhole`.
            h = re.sub(r"\nClient options:\n(?: {6}.*\n)*", "\n", h + "\n").rstrip()
            h = re.sub(r"\n\n\n+", "\n\n", h)
        name = f"keyhole {c}".strip()
        sections.append(f"## `{name}`\n\n```text\n{h}\n```\n")
    sys.stdout.write(NOTES + "\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1:])
