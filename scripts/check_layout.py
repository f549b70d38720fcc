#!/usr/bin/env python3
"""Keeps pg_token's architecture visible and true. Part of the test command.

Fails (exit 1, one line per finding) when:
  1. the pure core (src/core) depends on pgrx, or any file under it names pgrx or pg_sys;
  2. the edge modules import each other in a cycle: `use crate::a` / `crate::a::...` in module
     b is an edge b -> a, checked between top-level modules (src/x.rs, src/x/) and between the
     files of each directory (super::y in src/x/z.rs is z -> y);
  3. a source file is longer than MAX_LINES, unless it is listed in ONE_CONCERN with the
     reason it is still one concern;
  4. anything outside src/error.rs raises or logs directly (ereport!, error!, ErrorReport,
     PgSqlErrorCode), so every SQLSTATE comes from error.rs's one map.

    python3 scripts/check_layout.py          # from the repository root
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CORE = SRC / "core"
MAX_LINES = 500
# Files allowed past MAX_LINES, with why they are still one concern.
ONE_CONCERN = {
    "src/core/verdict.rs": "the verdict rules and their table of tests, one decision procedure",
    "src/core/format.rs": "token syntax: parse, compose, checksum, and its property tests",
    "src/events/queue.rs": "the shared-memory queue: one lock, one layout, its operations",
    "src/core/aggregate.rs": "the refusal-counting rules (keys, folds, the row bound) and their tests",
    "src/core/shared.rs": "the shared cache: one table layout, its sequence-locked operations and their race tests",
}
RAISING = re.compile(r"\bereport!|\berror!\(|\bErrorReport\b|\bPgSqlErrorCode\b")


def rel(p):
    return str(p.relative_to(ROOT))


def check_core(problems):
    manifest = (CORE / "Cargo.toml").read_text()
    if re.search(r"^\s*pgrx", manifest, re.M):
        problems.append("src/core/Cargo.toml depends on pgrx: the core must build without Postgres")
    for f in sorted(CORE.rglob("*.rs")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if re.search(r"\bpgrx\b|\bpg_sys\b", code):
                problems.append(f"{rel(f)}:{n}: the core names pgrx/pg_sys")


def edge_files():
    return [f for f in sorted(SRC.rglob("*.rs")) if CORE not in f.parents]


def module_of(f):
    """Top-level module a file belongs to (lib for src/lib.rs)."""
    parts = f.relative_to(SRC).with_suffix("").parts
    return parts[0]


def find_cycle(graph):
    """A cycle in `graph` (node -> set of nodes) as a list, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def strip_comments(text):
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def check_cycles(problems):
    top = {}
    for f in edge_files():
        m = module_of(f)
        if m == "lib":
            continue
        code = strip_comments(f.read_text())
        for target in re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code):
            if target != m:
                top.setdefault(m, set()).add(target)
        top.setdefault(m, set())
    cycle = find_cycle(top)
    if cycle:
        problems.append("import cycle between modules: " + " -> ".join(cycle))
    # Within each directory module: siblings referring to each other through super::.
    for d in sorted(p for p in SRC.iterdir() if p.is_dir() and p != CORE):
        graph = {}
        for f in sorted(d.glob("*.rs")):
            name = f.stem
            code = strip_comments(f.read_text())
            refs = set(re.findall(r"\bsuper::([a-z_][a-z0-9_]*)", code))
            if name == "mod":
                refs |= set(re.findall(r"\b(?:self::)?([a-z_][a-z0-9_]*)::", code)) & {g.stem for g in d.glob("*.rs")}
            siblings = {g.stem for g in d.glob("*.rs")} | {"mod"}
            graph[name] = {("mod" if r not in siblings else r) for r in refs if r != name} & siblings
        cycle = find_cycle({k: v - {"mod"} if k == "mod" else v for k, v in graph.items()})
        if cycle:
            problems.append(f"import cycle inside src/{d.name}: " + " -> ".join(cycle))


def check_sizes(problems):
    for f in sorted(SRC.rglob("*.rs")):
        n = len(f.read_text().splitlines())
        if n > MAX_LINES and rel(f) not in ONE_CONCERN:
            problems.append(f"{rel(f)} has {n} lines (limit {MAX_LINES}): split it by concern, or list it in "
                            "ONE_CONCERN with the reason it is one")


def check_errors(problems):
    for f in edge_files():
        if f == SRC / "error.rs":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if RAISING.search(line.split("//", 1)[0]):
                problems.append(f"{rel(f)}:{n}: raises or logs directly; go through crate::error")


def main():
    problems = []
    check_core(problems)
    check_cycles(problems)
    check_sizes(problems)
    check_errors(problems)
    for p in problems:
        print(f"layout: {p}")
    if problems:
        return 1
    modules = sorted({module_of(f) for f in edge_files()} - {"lib"})
    print(f"layout: ok (core is pgrx-free; {len(modules)} edge modules, no import cycle; "
          f"files within {MAX_LINES} lines or one concern; every error through error.rs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
