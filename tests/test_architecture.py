"""The import graph of the package: no circle, and no arrow running up the layers that the
README's Architecture section lists (each row may import from its own row and the rows above)."""

import ast
from pathlib import Path

import safetransfer

PACKAGE = Path(safetransfer.__file__).parent
#: the rows of the README's table, bottom layer first: a module may import from its own layer or a lower one
LAYERS = [
    {
        "errors",
        "atomic",
        "methods",
        "paired",
        "logs",
        "runtime",
        "demo",
        "data",
        "downloads",
        "draws",
        "overrides",
        "fingerprints",
    },
    {"backbones", "directions", "resume"},
    {"regularizers", "targets", "checkpoints"},
    {"engine", "checks"},
    {"results", "tables", "plots", "search", "sources"},
    {"preparation", "build", "fetch"},
    {"experiment"},
    {"train", "sweeps", "reproduce", "__main__"},
]


def module_of(path: Path) -> str:
    """The package's top-level module a file belongs to (subpackages count as one)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imports() -> dict[str, set[str]]:
    """module -> the package's other top-level modules it imports (at the top or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = module_of(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "safetransfer":
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("safetransfer.")]
            graph.setdefault(source, set()).update(n for n in names if n != source)
    return graph


def layer(module: str) -> int:
    found = [index for index, modules in enumerate(LAYERS) if module in modules]
    assert found, f"{module} is in no layer: add it to LAYERS and to the README's Architecture table"
    return found[0]


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if layer(target) > layer(source)
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


def test_every_import_points_to_the_same_layer_or_below():
    assert upward(imports()) == []


def test_the_import_graph_has_no_circle():
    assert circle(imports()) is None


def test_the_checks_find_what_they_look_for():
    """On made-up graphs: the circle experiment -> sweeps -> tables -> experiment that the
    package once had, and an arrow from the engine up to the job."""
    assert circle({"experiment": {"sweeps"}, "sweeps": {"tables"}, "tables": {"experiment"}}) == [
        "experiment",
        "sweeps",
        "tables",
        "experiment",
    ]
    assert circle({"experiment": {"engine"}, "engine": set()}) is None
    assert upward({"engine": {"experiment"}, "experiment": {"engine"}}) == ["engine -> experiment"]
    assert {"engine", "preparation", "build"} <= imports()["experiment"]  # the parser sees real imports
