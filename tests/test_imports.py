"""The product packages' import structure, read from the source with `ast`:

- no import cycle among the modules of model/, pipelines/, train/ and tools/ (an import inside a
  function counts as an edge too: it runs whenever the function does);
- no dataset reader, writer or verifier defined in tools/: those live in pipelines/ (readers of
  raw formats in `pipelines.dataset_readers`, the dataset directory's writer and its
  verification in `pipelines.dataset_writer`), and tools/ holds command lines over them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipelines", "train", "tools")
# The names of what reads a raw dataset, lists a folder's images, writes a dataset directory or
# verifies one: `read_idx_dataset`, `read_folder_dataset`, `detect_format`, `image_files`,
# `write_dataset`, `write_betons`, `write_manifest`, `artefact_records`, `verify`, ...
LIBRARY_NAME = re.compile(r"_?(read_\w*dataset|detect_format|image_files|write_dataset\w*|"
                          r"write_betons?|write_manifest|artefact_records|verify\w*)")


def parse(path: Path) -> ast.Module:
    """`path`'s syntax tree. CPython 3.11.7's parser can fail with "SystemError: AST constructor
    recursion depth mismatch" when the recursion counters it reads move under it (one run of the
    whole suite met it, in a worker that had run other tests before): the parse runs in a fresh
    thread, whose counters start afresh, and is tried again should that error still come."""
    from concurrent.futures import ThreadPoolExecutor

    for attempt in range(3):
        with ThreadPoolExecutor(1) as pool:
            try:
                return pool.submit(ast.parse, path.read_text(), str(path)).result()
            except SystemError as e:
                if "recursion depth mismatch" not in str(e) or attempt == 2:
                    raise
    raise AssertionError("unreachable")


def modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in the product packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The product modules that module `name` (at `path`) imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(parse(path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` names module pkg.mod; `from mod import f` names mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a known a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of `graph`, or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every edge is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "pipelines.loader_base" in graph["pipelines.torchvision_loader"]
    assert "pipelines.torchvision_loader" in graph["pipelines.loader"]  # in build_loader
    assert "pipelines.ffcv_writer" in graph["pipelines.dataset_writer"]  # in _load_write_beton
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_tools_define_no_dataset_reader_writer_or_verifier():
    found = []
    for path in sorted((ROOT / "tools").glob("*.py")):
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    LIBRARY_NAME.fullmatch(node.name):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not found, "move these into pipelines/: " + ", ".join(found)
