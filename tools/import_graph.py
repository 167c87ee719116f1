"""Draw which folder of the repository imports which, as the Mermaid graph in the README's layout section.

    python tools/import_graph.py            # print the graph
    python tools/import_graph.py --check    # exit 1 when README.md's graph is out of date or a loop exists

Every ``.py`` file of the project's folders is parsed (not imported); an import counts for the folder
that holds the file and the folder that owns the imported package.  The libraries the project builds
on appear as their own nodes, so runtime code in ``models/`` would show as an edge to mmengine.
"""
import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("models", "runtime", "classification", "detection", "segmentation", "tools")
# top-level import name -> the folder that provides it; scripts in a task folder import their siblings by name
PROVIDERS = {
    "models": "models",
    "runtime": "runtime",
    "tools": "tools",
    "mmdet_custom": "detection",
    "mmseg_custom": "segmentation",
    "cls_common": "classification",
}
LIBRARIES = ("timm", "mmengine", "mmcv", "mmdet", "mmseg")
BEGIN, END = "<!-- import-graph: made by tools/import_graph.py -->", "<!-- /import-graph -->"


def python_files(folder: str) -> Iterator[Path]:
    root = REPO / folder
    for path in sorted(root.rglob("*.py")):
        # the task folders' ``models`` links lead back to models/, which is counted once, as itself
        if not any(part == "models" for part in path.relative_to(root).parts[:-1]) or folder == "models":
            yield path


def imported_names(path: Path) -> Set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def edges() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {folder: set() for folder in FOLDERS if (REPO / folder).is_dir()}
    for folder in graph:
        for path in python_files(folder):
            for name in imported_names(path):
                target = PROVIDERS.get(name) or (name if name in LIBRARIES else None)
                if target and target != folder:
                    graph[folder].add(target)
    return graph


def loops(graph: Dict[str, Set[str]]) -> List[Tuple[str, ...]]:
    """Every cycle among the project's folders, each once (libraries cannot import the project)."""
    found: Set[Tuple[str, ...]] = set()

    def walk(node: str, path: List[str]):
        for nxt in graph.get(node, ()):
            if nxt == path[0]:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif nxt in graph and nxt not in path and nxt > path[0]:
                walk(nxt, path + [nxt])

    for start in graph:
        walk(start, [start])
    return sorted(found)


def mermaid(graph: Dict[str, Set[str]]) -> str:
    lines = ["```mermaid", "graph BT"]
    for library in LIBRARIES:
        lines.append(f"  {library}([{library}])")
    for folder in sorted(graph):
        for target in sorted(graph[folder]):
            lines.append(f"  {folder} --> {target}")
    lines.append("```")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with README.md and look for loops")
    args = parser.parse_args(argv)
    graph = edges()
    drawing = mermaid(graph)
    if not args.check:
        print(drawing)
        return 0
    problems = [f"import loop: {' -> '.join(cycle + (cycle[0],))}" for cycle in loops(graph)]
    if readme_block((REPO / "README.md").read_text()) != drawing:
        problems.append("README.md's import graph is out of date: paste the output of python tools/import_graph.py")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
