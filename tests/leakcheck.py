"""No raw token anywhere on disk: searches every file under the given directories (server
logs, pgbouncer logs, dumps, and the clusters' data directories: heap, WAL, everything) for
every token the test run generated.

    leakcheck.py TOKENS_FILE DIR [DIR...]

A token is found if its 22-character random body appears, which also catches a token whose
prefix or checksum was cut off. The tokens file itself is the positive control: the same
search must find every token in it, or the check is broken and fails.
"""

import os
import re
import sys

BODY = 22
RUN = re.compile(rb"[0-9A-Za-z]{%d,}" % BODY)


def bodies_in(data, wanted):
    found = set()
    for m in RUN.finditer(data):
        run = m.group()
        if run.count(run[:1]) == len(run):  # 'aaaa...': no token body looks like that
            continue
        for i in range(len(run) - BODY + 1):
            w = run[i:i + BODY]
            if w in wanted:
                found.add(w)
    return found


def main():
    tokens_file, dirs = sys.argv[1], sys.argv[2:]
    tokens = [t.strip() for t in open(tokens_file) if t.strip()]
    wanted = {t[-28:-6].encode(): t for t in tokens}
    if len(wanted) < 10:
        sys.exit(f"leakcheck: only {len(wanted)} tokens recorded; the tests should have recorded many")
    control = bodies_in(open(tokens_file, "rb").read(), wanted)
    if len(control) != len(wanted):
        sys.exit("leakcheck: the search misses tokens in the control file; the check itself is broken")

    scanned, nbytes, leaks, hints = 0, 0, [], 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for name in files:
                path = os.path.join(root, name)
                if os.path.abspath(path) == os.path.abspath(tokens_file) or not os.path.isfile(path):
                    continue
                try:
                    data = open(path, "rb").read()
                except OSError:
                    continue
                scanned += 1
                nbytes += len(data)
                if name.endswith(".log"):
                    hints += data.count(b" hint=")
                for body in bodies_in(data, wanted):
                    t = wanted[body]
                    # Say where, never what: the prefix and 4 characters, as the extension does.
                    leaks.append(f"{path}: {t[:-24]}... ")
    print(f"leakcheck: {len(wanted)} tokens, {scanned} files, {nbytes / 1e6:.1f} MB scanned, "
          f"{hints} hinted event lines in logs")
    if hints == 0:
        sys.exit("leakcheck: no event lines with hints in any log; were the logs written where expected?")
    if leaks:
        print("\n".join(sorted(set(leaks))))
        sys.exit(f"leakcheck: {len(set(leaks))} raw tokens found on disk")
    print("leakcheck: no raw token in any log, dump or data file")


if __name__ == "__main__":
    main()
