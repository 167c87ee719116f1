"""The repository's structure as the README draws it: models/ at the bottom, no loops, no path hacks."""
import re
from pathlib import Path

from tools import import_graph

REPO = Path(__file__).resolve().parents[1]


def test_readme_draws_the_current_import_graph():
    assert import_graph.main(["--check"]) == 0


def test_no_loop_between_folders_and_models_imports_no_runtime():
    graph = import_graph.edges()
    assert import_graph.loops(graph) == []
    assert not {"runtime", "tools", "classification", "detection", "segmentation", "mmdet", "mmseg", "mmcv"} & set(
        graph["models"])
    assert graph["models"].get("mmengine") is not True  # only inside a function: reading mmengine's checkpoints


def test_a_loop_would_be_found():
    assert import_graph.loops({"a": {"b": True}, "b": {"c": False}, "c": {"a": True}}) == [("a", "b", "c")]


def test_no_sys_path_edits_and_no_pythonpath():
    sources = [p for folder in import_graph.FOLDERS + ("tests",) for p in (REPO / folder).rglob("*.py")]
    sources += list(REPO.glob("*/*.sh")) + list((REPO / "runtime").glob("*.sh"))
    offenders = [str(p.relative_to(REPO)) for p in sources
                 if re.search(r"sys\.path\.(insert|append)|sys\.path\[|PYTHONPATH=\"?\$", p.read_text())]
    assert offenders == []
