#!/usr/bin/env python3
"""Fails when the top-level modules of a crate depend on each other in a cycle.

For each crate's src/, every reference from one module to another (`use crate::a::…`,
`crate::a::…` in code, `super::a` from a top-level module, `crate::Name` re-exported from the crate
root by `pub use a::Name`) is an edge between top-level modules: `foo.rs`, `foo/mod.rs` and
everything under `foo/` are one node, so a parent and its children are never a cycle. The crate
root (lib.rs, main.rs) is not a node: it declares the modules and re-exports their items.
Comments, doc comments and string literals are ignored; test modules count like any other code.

Usage: scripts/check-module-cycles.py [CRATES_DIR]   (default: crates/ next to this script)
Prints each cycle, then every edge among its modules with the file and line of its first
reference; exits 1 if there is a cycle.
"""

import re
import sys
from pathlib import Path

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ROOTS = ("lib.rs", "main.rs")


def strip(text):
    """The source with comments, strings and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return "".join(c if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif (m := re.match(r'b?r(#*)"', text[i:])) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(blank(text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i : j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{1F600}'), or a lifetime / label ('a).
            if i + 1 < n and text[i + 1] == "\\":
                j = text.find("'", i + 2)
                j = n if j < 0 else j + 1
            elif i + 2 < n and text[i + 2] == "'":
                j = i + 3
            else:
                j = i + 1
            out.append(blank(text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def first_segments(code, pos):
    """The first path segments after `…::` at pos: one identifier, or each item of a `{…}` group."""
    while pos < len(code) and code[pos].isspace():
        pos += 1
    if pos < len(code) and code[pos] == "{":
        depth, j, start, items = 1, pos + 1, pos + 1, []
        while j < len(code) and depth:
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    items.append(code[start:j])
            elif code[j] == "," and depth == 1:
                items.append(code[start:j])
                start = j + 1
            j += 1
        names = []
        for item in items:
            m = IDENT.match(item.strip())
            if m:
                names.append(m.group(0))
        return names
    m = IDENT.match(code, pos)
    return [m.group(0)] if m else []


def module_of(src, path):
    """Top-level module name of a file, and its module path below the crate root."""
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if len(parts) == 1 and parts[0] + ".rs" in ROOTS:
        return None, []
    return parts[0], parts


def reexports(root_code, modules):
    """Names the crate root re-exports from a top-level module: `pub use a::{X, y::Z as W}`."""
    names = {}
    for m in re.finditer(r"\buse\s+(?:crate::|self::)?([A-Za-z_]\w*)\s*::", root_code):
        module = m.group(1)
        if module not in modules:
            continue
        end = root_code.find(";", m.end())
        tree = root_code[m.end() : end]
        for leaf in re.findall(r"([A-Za-z_]\w*)(?:\s+as\s+([A-Za-z_]\w*))?\s*(?=[,}]|$)", tree.strip()):
            names[leaf[1] or leaf[0]] = module
    return names


def inline_module_stack(code):
    """For each position, the names of the inline `mod x { … }` blocks around it (a callable)."""
    stack, depth_stack, depth = [], [], 0
    tokens = re.finditer(r"\bmod\s+([A-Za-z_]\w*)\s*\{|[{}]", code)
    spans = []  # (start, end, tuple(stack))
    last = 0
    for t in tokens:
        spans.append((last, t.start(), tuple(stack)))
        last = t.start()
        if t.group(1):
            depth += 1
            stack.append(t.group(1))
            depth_stack.append(depth)
        elif t.group(0) == "{":
            depth += 1
        else:
            if depth_stack and depth_stack[-1] == depth:
                depth_stack.pop()
                stack.pop()
            depth -= 1
    spans.append((last, len(code), tuple(stack)))

    def at(pos):
        for start, end, names in spans:
            if start <= pos < end:
                return list(names)
        return []

    return at


def crate_edges(src):
    files = sorted(p for p in src.rglob("*.rs"))
    modules = set()
    for path in files:
        top, _ = module_of(src, path)
        if top:
            modules.add(top)
    codes = {path: strip(path.read_text(encoding="utf-8")) for path in files}
    names = {}
    for root in ROOTS:
        if (src / root) in codes:
            names.update(reexports(codes[src / root], modules))

    def resolve(segment):
        if segment in modules:
            return segment
        return names.get(segment)

    edges = {}  # (from, to) -> first "file:line"
    for path, code in codes.items():
        top, file_path = module_of(src, path)
        if top is None:
            continue
        stack_at = inline_module_stack(code)
        for m in re.finditer(r"\b(crate|super)\s*::", code):
            if m.group(1) == "crate":
                base = []
            else:
                base = file_path + stack_at(m.start())
                pos = m.end()
                base = base[:-1]
                # super::super::…
                while (more := re.match(r"\s*super\s*::", code[pos:])):
                    base = base[:-1]
                    pos += more.end()
                if base:
                    continue  # still inside this top-level module
            pos = m.end()
            while (more := re.match(r"\s*super\s*::", code[pos:])):
                pos += more.end()
            for segment in first_segments(code, pos):
                target = resolve(segment)
                if target and target != top:
                    line = code.count("\n", 0, m.start()) + 1
                    edges.setdefault((top, target), f"{path}:{line}")
    return modules, edges


def cycles(modules, edges):
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {m: sorted(b for (a, b) in edges if a == m) for m in modules}
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return sorted(out)


def one_cycle(component, edges):
    """A shortest cycle through the component's first module, as a list of modules."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for (a, b) in sorted(edges):
                if a != v or b not in members:
                    continue
                if b == start:
                    return paths[v] + [start]
                if b not in paths:
                    paths[b] = paths[v] + [b]
                    nxt.append(b)
        frontier = nxt
    return component


def shorten(where, crates_dir):
    path, _, line = where.rpartition(":")
    try:
        path = Path(path).resolve().relative_to(crates_dir.resolve().parent)
    except ValueError:
        pass
    return f"{path}:{line}"


def main():
    crates_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "crates"
    failed = False
    for src in sorted(crates_dir.glob("*/src")):
        modules, edges = crate_edges(src)
        for component in cycles(modules, edges):
            failed = True
            crate = src.parent.name
            cycle = one_cycle(component, edges)
            print(f"module cycle in {crate}: {' -> '.join(cycle)} (modules in the cycle: {', '.join(component)})")
            members = set(component)
            for (a, b), where in sorted(edges.items()):
                if a in members and b in members:
                    print(f"  {a} -> {b}  ({shorten(where, crates_dir)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
