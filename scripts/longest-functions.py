#!/usr/bin/env python3
"""The longest Rust functions of the given trees (default: the crates' src/), test modules
included only with --tests. Usage: scripts/longest-functions.py [-n 10] [--tests] [DIR...]"""
import argparse
import pathlib
import re

TESTS = False
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def functions(path):
    lines = path.read_text().splitlines()
    if not TESTS:
        # An inline test module (`#[cfg(test)] mod ...`) ends the file's code.
        for k in range(len(lines) - 1):
            if lines[k].strip() == "#[cfg(test)]" and re.match(r"\s*(pub\s+)?mod\s", lines[k + 1]):
                lines = lines[:k]
                break
    i = 0
    while i < len(lines):
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, j, opened = 0, i, False
        while j < len(lines):
            code = re.sub(r'"(\\.|[^"\\])*"|//.*', "", lines[j])
            depth += code.count("{") - code.count("}")
            opened |= "{" in code
            if (opened and depth <= 0) or (not opened and code.rstrip().endswith(";")):
                break
            j += 1
        if opened:
            yield m.group(6), i + 1, j - i + 1
        i += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--tests", action="store_true")
    ap.add_argument("dirs", nargs="*")
    a = ap.parse_args()
    global TESTS
    TESTS = a.tests
    dirs = a.dirs or [p for p in ["src", "crates"] if pathlib.Path(p).is_dir()]
    found = []
    for d in dirs:
        for f in sorted(pathlib.Path(d).rglob("*.rs")):
            if "/benches/" in str(f) or (not a.tests and (f.name == "tests.rs" or "/tests/" in str(f))):
                continue
            found += [(n, name, f"{f}:{line}") for name, line, n in functions(f)]
    for n, name, at in sorted(found, reverse=True)[: a.n]:
        print(f"{n:5}  {name:32} {at}")


if __name__ == "__main__":
    main()
