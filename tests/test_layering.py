"""The project's import layering, read from the source with `ast` (nothing is imported or run):
`unimodal` < `tokenizer` < `llm` < {`train`, `eval`, `demo`}; a module imports only from its own or a lower layer,
and `train/`, `eval/`, `demo/` never import each other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"unimodal": 0, "tokenizer": 1, "llm": 2, "train": 3, "eval": 3, "demo": 3}


def project_imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in the file, at any depth, relative imports resolved."""
    package = path.relative_to(root).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's own package
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LAYER]
    return found


MODULES = sorted(p for name in LAYER for p in (ROOT / name).rglob("*.py"))


def test_every_layer_has_modules():
    assert {p.relative_to(ROOT).parts[0] for p in MODULES} == set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_respect_the_layers(path):
    own = path.relative_to(ROOT).parts[0]
    wrong = [f"line {line}: {own} imports {other}" for line, other in project_imports(path)
             if other != own and LAYER[other] >= LAYER[own]]
    assert not wrong, f"{path.relative_to(ROOT)}: " + "; ".join(wrong)


def test_the_checker_sees_violations(tmp_path):
    """A train module importing eval (absolutely or from inside a function) and a tokenizer module importing llm
    are caught; a relative import inside the package is not."""
    (tmp_path / "train").mkdir()
    bad = tmp_path / "train" / "x.py"
    bad.write_text("import torch\nfrom .y import z\n\ndef f():\n    from eval.speed import gpu_spec\n")
    assert project_imports(bad, tmp_path) == [(2, "train"), (5, "eval")]
    (tmp_path / "tokenizer").mkdir()
    low = tmp_path / "tokenizer" / "x.py"
    low.write_text("import llm.flops\nfrom unimodal import images\n")
    assert project_imports(low, tmp_path) == [(1, "llm"), (2, "unimodal")]
