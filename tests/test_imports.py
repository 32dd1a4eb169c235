"""The package's import graph (issue 27): no circle, counting imports inside functions; no module imports another's
`_private` name; the trainer (embxlib/train.py) is imported by nothing but the GPU check that runs it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embxlib"


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import in the file, at any depth."""
    me = path.stem
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if typing.TYPE_CHECKING:` blocks never run: their imports are annotations only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], None) for a in node.names if a.name.startswith("embxlib.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import a
                found += [(node.module.split(".")[0], a.name) for a in node.names]
            elif node.level == 1 or node.module == "embxlib":  # from . import x / from embxlib import x
                found += [(a.name, None) for a in node.names]
            elif node.module and node.module.startswith("embxlib."):
                found += [(node.module.split(".")[1], a.name) for a in node.names]
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return [(m, n) for m, n in found if m in modules and m != me]


def graph() -> dict[str, set[str]]:
    return {p.stem: {m for m, _ in imports(p) if m != "__init__"} for p in PACKAGE.glob("*.py")}


def test_no_import_circle():
    g = graph()
    done, path, circles = set(), [], []

    def visit(m):
        if m in path:
            circles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        path.append(m)
        for n in sorted(g.get(m, ())):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)
    assert circles == [], circles


def test_no_private_name_is_imported_across_modules():
    private = [(p.stem, m, n) for p in PACKAGE.glob("*.py") for m, n in imports(p) if n and n.startswith("_")]
    assert private == []


def test_only_the_gpu_check_imports_the_trainer():
    assert sorted(m for m, deps in graph().items() if "train" in deps) == ["gpucheck"]


def test_the_environment_and_the_repository_root_have_one_home():
    """WORLD_SIZE, RANK and LOCAL_RANK are read in embxlib/dist.py only; ROOT is defined in embxlib/__init__.py."""
    for p in PACKAGE.glob("*.py"):
        text = p.read_text()
        if p.name != "dist.py":
            assert not any(f'"{v}"' in text for v in ("WORLD_SIZE", "LOCAL_RANK", "RANK")), p.name
        if p.name != "__init__.py":
            assert "\nROOT = " not in text, p.name
