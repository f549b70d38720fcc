#!/usr/bin/env bash
# The README's first command, checked: `bash scripts/demo.sh` must run to the end and print the
# lifecycle in order: generate -> validate -> rotate -> both valid in the grace window ->
# revoke -> the very next validation refused. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! bash scripts/demo.sh >"$out" 2>&1; then
  tail -40 "$out"
  echo "demo: scripts/demo.sh failed" >&2
  exit 1
fi
python3 - "$out" <<'PY'
import re
import sys

text = open(sys.argv[1], errors="replace").read()
token = r"cf-[0-9A-Za-z]{28}\b"
# Each step: (what, a pattern that must match after the previous step's match).
steps = [
    ("generate prints the token once", rf"== 2\. generate.*?\ntoken for acme: {token}"),
    ("only its SHA-256 is stored", r"stored_hash\s*\n-+\n [0-9a-f]{64}\n"),
    ("the application validates it over TCP", r"== 3\. validate.*?\n t\s+\| acme\s+\| agent\s+\| dev\s+\| \{read,write\}"),
    ("and may not read the token table", r"ERROR:  permission denied for table tokens"),
    ("rotate prints a successor", rf"== 4\. rotate.*?\nsuccessor: {token}"),
    ("the old token is rotating", r"\| rotating \| t\n"),
    ("both validate in the grace window", r"== 5\. both validate.*?\n old\s+\| t\s+\|.*?\n new\s+\| t\s+\|"),
    ("revoke", r"== 6\. revoke.*?\n t\n"),
    ("the next validation is refused", r"ERROR:  token rejected: revoked\nDETAIL:  token cf-[0-9A-Za-z]{4} was revoked"),
    ("and check_token says why", r"\n f\s+\| revoked\n"),
    ("a dev token is refused by the prod database", r"ERROR:  Token environment mismatch: dev token used in prod"),
    ("RLS shows the tenant its rows only", r"== 8\..*?\n acme\s+\| acme-billing\n acme\s+\| acme-website\n"),
    ("refusals are events, with hints only", r"== 9\..*?\n refused\s+\| revoked\s+\| cf-[0-9A-Za-z]{4}\s+\| acme"),
    ("the demo cleans up", r"demo finished; the throwaway cluster is stopped and removed"),
]
pos = 0
for what, pattern in steps:
    m = re.compile(pattern, re.S).search(text, pos)
    if not m:
        print(text[-3000:])
        sys.exit(f"demo: missing (in order): {what}")
    pos = m.end()
print(f"demo: {len(steps)} lifecycle steps printed in order")
PY
