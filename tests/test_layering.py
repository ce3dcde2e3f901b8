"""Import direction, one way only: tools -> dsinfer -> {formats, kernels}; formats and kernels
import neither each other nor the runtime; nothing imports tools. Also: no unsafe torch.load."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> installed package names it must not import
FORBIDDEN = {
    "formats": ("dsinfer.kernels", "dsinfer.tools", "kernels", "tools"),
    "kernels": ("dsinfer.formats", "dsinfer.tools", "formats", "tools"),
    "dsinfer": ("dsinfer.tools", "tools"),
}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _runtime_imports(name: str) -> bool:
    # dsinfer's own modules other than its leaf subpackages
    return name == "dsinfer" or (name.startswith("dsinfer.")
                                 and not name.startswith(("dsinfer.formats", "dsinfer.kernels")))


# Entry points nothing imports (`python -m dsinfer` runs the launcher CLI).
ENTRY_POINTS = {ROOT / "dsinfer" / "__main__.py"}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_direction(folder):
    bad = []
    for path in set((ROOT / folder).rglob("*.py")) - ENTRY_POINTS:
        for name in _imports(path):
            if name.startswith(FORBIDDEN[folder]) or (folder in ("formats", "kernels")
                                                      and _runtime_imports(name)):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_no_unsafe_torch_load():
    for folder in ("dsinfer", "formats", "kernels", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "weights_only=False" not in text.replace(" ", ""), path
