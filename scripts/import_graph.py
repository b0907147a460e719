#!/usr/bin/env python3
"""List the import graph's cycles and the imports that run up the layers: what the import-linter
contracts in pyproject.toml (``[tool.importlinter]``) forbid, said as a list to read rather than a
verdict. Every import counts, type-only and function-level ones included (grimp reads them all).

    python scripts/import_graph.py            # cycles and upward imports; exit 1 if there are any
    PYTHONPATH=/tmp/old python scripts/import_graph.py   # the same for another tree

The layers are read from the project's layers contract: a module may import from its own layer's
package and from the layers below; siblings on one line (``a | b``) may not import each other.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import grimp


def layers() -> list[list[str]]:
    doc = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    for c in doc["tool"]["importlinter"]["contracts"]:
        if c["type"] == "layers":
            return [[p.strip() for p in line.split("|")] for line in c["layers"]]
    raise SystemExit("no layers contract in pyproject.toml")


def package_of(module: str, packages: list[str]) -> str | None:
    best = None
    for p in packages:
        if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best)):
            best = p
    return best


def cycles(g: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(g.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(g.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.find_modules_directly_imported_by(w)))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def upward(g: grimp.ImportGraph, order: list[list[str]]) -> list[tuple[str, str, str]]:
    level = {p: i for i, line in enumerate(order) for p in line}
    packages = list(level)
    out = []
    for m in sorted(g.modules):
        a = package_of(m, packages)
        if a is None:
            continue
        for d in sorted(g.find_modules_directly_imported_by(m)):
            b = package_of(d, packages)
            if b is None or b == a:
                continue
            if level[b] < level[a]:
                out.append((m, d, "up"))
            elif level[b] == level[a]:
                out.append((m, d, "sideways"))
    return out


def main() -> int:
    g = grimp.build_graph("shoal", include_external_packages=False, cache_dir=None)
    found = cycles(g)
    print(f"{len(found)} import cycle(s)")
    for comp in found:
        print("  " + " <-> ".join(comp))
    ups = upward(g, layers())
    print(f"{len(ups)} import(s) against the layers")
    for m, d, how in ups:
        print(f"  {m} -> {d} ({how})")
    return 1 if found or ups else 0


if __name__ == "__main__":
    sys.exit(main())
