"""The layers hold: ground < resources < jobs < assets < dagster_project, no stage imports another, no
import cycles, thin asset functions. The checker runs on the real tree and on small bad trees,
so each rule is shown to fail on the violation it names."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["ground", "resources", "jobs", "assets", "dagster_project"]
HEAVY = {"dagster", "mlflow", "torch", "transformers", "trl", "peft", "great_expectations", "datasets"}
SHARED_STAGE_MODULES = {"_stage", "common"}
MAX_ASSET_LINES = 55


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for f in (root / pkg).rglob("*.py") if (root / pkg).exists() else []:
            out[".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


def imports_of(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def problems(root: Path) -> list[str]:
    mods = modules(root)
    graph = {m: {t for t in imports_of(f) if t in mods} for m, f in mods.items()}
    out = []
    for m, f in mods.items():
        layer = LAYERS.index(m.split(".")[0])
        for t in graph[m]:
            if LAYERS.index(t.split(".")[0]) > layer:
                out.append(f"{m} imports {t}, a layer above it")
            if m.startswith("assets.") and t.startswith("assets."):
                mine, theirs = m.split(".")[1], t.split(".")[1]
                if mine != theirs and theirs not in SHARED_STAGE_MODULES and mine not in SHARED_STAGE_MODULES:
                    out.append(f"stage {m} imports stage {t}")
        if m.startswith("ground"):
            heavy = sorted({i.split(".")[0] for i in imports_of(f)} & HEAVY)
            if heavy:
                out.append(f"{m} (ground) imports {heavy}")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for f in (root / "assets").glob("*.py") if (root / "assets").exists() else []:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and any("asset" in ast.unparse(d) for d in node.decorator_list):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_ASSET_LINES:
                    out.append(f"asset function {f.name}:{node.name} has {lines} lines (> {MAX_ASSET_LINES})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, found = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_the_project_keeps_its_layers():
    assert problems(ROOT) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"resources/a.py": "from assets.x import y\n", "assets/x.py": "y = 1\n"}, "resources.a imports assets.x"),
        ({"ground/a.py": "def f():\n    import resources.b\n", "resources/b.py": ""}, "ground.a imports resources.b"),
        ({"assets/one.py": "from assets.two import f\n", "assets/two.py": "def f(): pass\n"}, "stage assets.one imports stage assets.two"),
        ({"resources/a.py": "import resources.b\n", "resources/b.py": "import resources.a\n"}, "import cycle"),
        ({"ground/a.py": "import torch\n"}, "ground.a (ground) imports ['torch']"),
        (
            {"assets/big.py": "@dg.asset\ndef big():\n" + "    x = 1\n" * 60},
            "asset function big.py:big has 61 lines",
        ),
    ],
)
def test_each_rule_fails_on_its_violation(tmp_path, files, expected):
    found = problems(write(tmp_path, files))
    assert any(expected in p for p in found), found


def test_shared_stage_modules_may_be_imported_by_every_stage(tmp_path):
    root = write(tmp_path, {"assets/_stage.py": "", "assets/common.py": "", "assets/one.py": "import assets._stage\nimport assets.common\n"})
    assert problems(root) == []
