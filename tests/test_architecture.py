"""The package's folders are its layers: no import runs up them, and the modules' import graph
has no circle. The layers are the rows of the README's Architecture table, bottom first; a
module may import from its own folder or a folder below it, never from one above."""

import ast
import re
from pathlib import Path

import pytest

import safetransfer

PACKAGE = Path(safetransfer.__file__).parent
README = PACKAGE.parent / "README.md"
#: the package's folders, bottom layer first
LAYERS = ["common", "training", "data", "sources", "reporting", "job", "commands"]
#: the package's own files at its top: the version and resolver, and `python -m safetransfer`
TOP = {"__init__": -1, "__main__": len(LAYERS)}


def module_name(path: Path) -> str:
    """safetransfer.data.targets.cub200 for safetransfer/data/targets/cub200.py."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the package's other modules it imports (at the top or inside functions); a
    name imported from a package is the package's module when it is one, else the package."""
    known = {module_name(path) for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "safetransfer":
                names = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
                ]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("safetransfer.")]
            graph.setdefault(source, set()).update(n for n in names if n != source)
    return graph


def layer(module: str) -> int:
    """The index in LAYERS of the folder a module lies in."""
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in TOP:
        return TOP[parts[1]]
    assert len(parts) > 2 and parts[1] in LAYERS, (
        f"{module} lies in no layer's folder: move it into one of {', '.join(LAYERS)} (or add a folder to LAYERS "
        "and to the README's Architecture table)"
    )
    return LAYERS.index(parts[1])


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if target != "safetransfer" and layer(target) > layer(source)
    )


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open": on the path being followed; "done": no circle through it

    def visit(path: list[str]) -> list[str] | None:
        state[path[-1]] = "open"
        for target in sorted(graph.get(path[-1], ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit([*path, target])):
                return found
        state[path[-1]] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit([module])):
            return found
    return None


def test_every_module_lies_in_a_layer_and_imports_from_its_own_or_a_lower_one():
    assert upward(imports()) == []


def test_the_import_graph_has_no_circle():
    assert circle(imports()) is None


def test_the_readme_table_lists_the_folders_in_their_order():
    section = README.read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `safetransfer/(\w+)/` \|", section, flags=re.M)
    assert rows == LAYERS


def test_the_checks_find_what_they_look_for():
    """On made-up graphs: the circle run -> sweeps -> tables -> run that the package once had,
    an arrow from the training core up to the job, and a module left at the top."""
    s = "safetransfer."
    ring = {s + "job.run": {s + "commands.sweeps"}, s + "commands.sweeps": {s + "reporting.tables"}}
    ring[s + "reporting.tables"] = {s + "job.run"}
    assert circle(ring) == [s + "commands.sweeps", s + "reporting.tables", s + "job.run", s + "commands.sweeps"]
    assert circle({s + "job.run": {s + "training.engine"}, s + "training.engine": set()}) is None
    assert upward({s + "training.engine": {s + "job.run"}}) == [f"{s}training.engine -> {s}job.run"]
    with pytest.raises(AssertionError, match="lies in no layer's folder"):
        layer(s + "engine")
    graph = imports()  # the parser sees real imports, a package's submodules by their own names
    assert {s + "training.engine", s + "data.preparation", s + "job.build"} <= graph[s + "job.run"]
    assert s + "sources.checkpoint_files" in graph[s + "sources.published"]


def test_the_shape_the_readme_gives_names_modules_that_exist_and_hold_it():
    """The Architecture section's few lines name real modules, and what they say holds: the store and
    its views are the only writers of results/ tables, and the registry is the only place that builds
    a config node (no module calls Hydra's instantiate)."""
    section = README.read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(safetransfer/[\w/]+\.py)`", section))
    assert len(named) >= 7
    for path in named:
        assert (PACKAGE.parent / path).is_file(), path
    sources = {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    assert not [m for m, text in sources.items() if "hydra.utils import instantiate" in text or "instantiate(" in text]
    writers = [m for m, text in sources.items() if ".seeds.csv" in text or "_paper.md" in text]
    assert set(writers) <= {"safetransfer.reporting.store", "safetransfer.reporting.tables"}, writers
