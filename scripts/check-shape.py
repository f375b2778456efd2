#!/usr/bin/env python3
"""CI: the shape docs/architecture.md promises, checked (#22).

1. No import cycles between modules, at any level of either crate: for each
   module, every `crate::...` path and `super::...` path in its non-test code
   (comments, `#[cfg(doc)]` imports and `#[cfg(test)] mod` blocks ignored) is
   resolved to the module it names, and counted as an edge between the two
   siblings under their common parent (a child naming its own ancestor or
   descendant is not an edge: `mod a;` in a parent and `super::` in the child
   are how Rust nests, not a cycle). A strongly connected set of two or more
   siblings is a cycle, and fails the check, printing the edges that make it.
2. The largest source files, by lines before their `#[cfg(test)]` module:
   printed, and failing the check above LIMIT (docs/architecture.md: "about
   600"; a file past it has more than one concern, or its tests belong in a
   sibling `tests.rs`).

A lexical reading, not rustc's: it sees paths written out, not items reached
through a glob re-export. The crates avoid glob imports outside tests, which
is what makes this enough.

Usage: scripts/check-shape.py [crate source directory ...]
"""

import os
import re
import sys

CRATES = ["session-server/src", "session-client/src"]
LIMIT = 650
TEST_MODULE = re.compile(r"#\[cfg\(test\)\]\s*\n\s*mod\s+\w+\s*\{")
# Files that are themselves tests or benchmarks of a module.
TEST_FILES = {"tests", "proptests", "bench"}


def module_path(root, path):
    parts = os.path.relpath(path, root)[: -len(".rs")].split(os.sep)
    if parts[-1] in ("lib", "main", "mod"):
        parts = parts[:-1]
    return tuple(parts)


def non_test_code(source):
    match = TEST_MODULE.search(source)
    if match:
        source = source[: match.start()]
    source = re.sub(r"//[^\n]*", "", source)
    return re.sub(r"#\[cfg\(doc\)\]\s*use[^;]*;", "", source)


def use_tree(prefix, body, out):
    """Adds the paths of `prefix::{body}` (nested groups included) to out."""
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "{" in part:
            head, rest = part.split("{", 1)
            use_tree(prefix + split(head), rest.rsplit("}", 1)[0], out)
        else:
            out.append(prefix + split(part.split(" as ")[0]))


def split(path):
    return tuple(x for x in path.strip().split("::") if x)


def paths_named(module, code):
    out = []
    for match in re.finditer(r"\bcrate::", code):
        rest = code[match.end() :]
        group = re.match(r"((?:\w+::)*)\{", rest)
        if group:
            start = end = match.end() + group.end()
            depth = 1
            while depth and end < len(code):
                depth += code[end] == "{"
                depth -= code[end] == "}"
                end += 1
            use_tree(split(group.group(1)), code[start : end - 1], out)
        else:
            plain = re.match(r"\w+(?:::\w+)*", rest)
            if plain:
                out.append(split(plain.group(0)))
    for match in re.finditer(r"\b((?:super::)+)(\w+(?:::\w+)*)", code):
        up = match.group(1).count("super::")
        out.append(module[: max(len(module) - up, 0)] + split(match.group(2)))
    return out


def cycles(root):
    modules = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".rs"):
                path = os.path.join(directory, name)
                module = module_path(root, path)
                if module and module[-1] in TEST_FILES:
                    continue
                with open(path, encoding="utf-8") as f:
                    modules[module] = non_test_code(f.read())
    edges = set()
    for module, code in modules.items():
        for path in paths_named(module, code):
            target = next(
                (path[:k] for k in range(len(path), 0, -1) if path[:k] in modules),
                None,
            )
            if target is None:
                continue
            common = 0
            while (
                common < min(len(module), len(target))
                and module[common] == target[common]
            ):
                common += 1
            if common in (len(module), len(target)):
                continue
            edges.add((module[: common + 1], target[: common + 1]))
    return strongly_connected(edges), edges, len(modules)


def strongly_connected(edges):
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(component)

    sys.setrecursionlimit(10_000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def largest(root, count=3):
    sizes = []
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".rs") and name[:-3] not in TEST_FILES:
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                match = TEST_MODULE.search(source)
                code = source[: match.start()] if match else source
                sizes.append((code.count("\n"), path))
    return sorted(sizes, reverse=True)[:count]


def main(roots):
    failed = False
    for root in roots:
        found, edges, modules = cycles(root)
        print(f"{root}: {modules} modules, {len(edges)} edges between siblings, {len(found)} cycles")
        for component in found:
            failed = True
            names = sorted("::".join(m) for m in component)
            print(f"  cycle: {', '.join(names)}")
            for a, b in sorted(edges):
                if a in component and b in component:
                    print(f"    {'::'.join(a)} -> {'::'.join(b)}")
        for lines, path in largest(root):
            mark = f"  over {LIMIT}" if lines > LIMIT else ""
            print(f"  {lines:5} lines before its tests: {path}{mark}")
            failed |= lines > LIMIT
    return 1 if failed else 0


if __name__ == "__main__":
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main(sys.argv[1:] or CRATES))
