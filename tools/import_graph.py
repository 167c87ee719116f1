"""Draw which folder of the repository imports which, as the Mermaid graph in the README's layout section.

    python tools/import_graph.py            # print the graph
    python tools/import_graph.py --check    # exit 1 when README.md's graph is out of date or a loop exists

Every ``.py`` file of the project's folders is parsed (not imported); an import counts for the folder
that holds the file and the folder that owns the imported package.  The libraries the project builds
on appear as their own nodes, so runtime code in ``models/`` would show as an edge to mmengine.  A solid
arrow is an import at module level; a dotted one only inside functions (used on demand, e.g. an optional
library).
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
    "classification": "classification",
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


def imported_names(path: Path) -> Dict[str, bool]:
    """Top-level names that ``path`` imports -> whether any such import runs at module level."""
    tree = ast.parse(path.read_text(), str(path))
    in_functions = {id(node) for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(func)}
    names: Dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = [node.module]
        else:
            continue
        for name in found:
            top = name.split(".")[0]
            names[top] = names.get(top, False) or id(node) not in in_functions
    return names


def edges() -> Dict[str, Dict[str, bool]]:
    """folder -> {imported folder or library: imported at module level somewhere}."""
    graph: Dict[str, Dict[str, bool]] = {folder: {} for folder in FOLDERS if (REPO / folder).is_dir()}
    for folder, targets in graph.items():
        for path in python_files(folder):
            for name, at_module_level in imported_names(path).items():
                target = PROVIDERS.get(name) or (name if name in LIBRARIES else None)
                if target and target != folder:
                    targets[target] = targets.get(target, False) or at_module_level
    return graph


def loops(graph: Dict[str, Dict[str, bool]]) -> List[Tuple[str, ...]]:
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


def mermaid(graph: Dict[str, Dict[str, bool]]) -> str:
    lines = ["```mermaid", "graph BT"]
    for library in LIBRARIES:
        lines.append(f"  {library}([{library}])")
    for folder in sorted(graph):
        for target in sorted(graph[folder]):
            lines.append(f"  {folder} {'-->' if graph[folder][target] else '-.->'} {target}")
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
