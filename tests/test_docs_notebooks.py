"""docs/ and notebooks/ never rot: the generated pages equal what the code generates now, the
hand-written pages link to files that exist and name only options the commands have, and every
notebook executes from top to bottom in a fresh kernel and holds its plots, as committed."""
import re
from pathlib import Path

import nbformat
import pytest

from dsinfer.real_models import smollm2_hf
from dsinfer.tools import gen_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Each notebook takes < 60 s on 2 CPU cores (SmolLM2 cached); the bound leaves room for a
# machine busy with other work and still catches a notebook that got several times slower.
MAX_SECONDS = 180
# Options the hand-written pages quote from other tools (DeepSpeed, torchrun, Slurm).
FOREIGN_FLAGS = {"--hostfile", "--num_nodes", "--include", "--exclude", "--local_rank",
                 "--nodes", "--ntasks-per-node", "--nproc_per_node"}


def test_generated_pages_are_up_to_date():
    stale = gen_docs.stale(DOCS)
    assert not stale, f"docs/{stale} differ from what the code generates: run `make docs`"


def test_every_reader_and_architecture_is_in_the_matrix():
    from dsinfer import specs
    from dsinfer.formats import READERS
    page = gen_docs.architectures_page()
    header = next(l for l in page.splitlines() if l.startswith("| architecture |"))
    assert all(f"`{f}`" in header for f in READERS)
    assert all(f"\n| `{s.name}` |" in page for s in specs.SPECS)


def test_cli_page_covers_every_console_script_and_option():
    page = gen_docs.cli_page()
    for command, module in gen_docs.console_scripts().items():
        assert f"## `{command}`" in page
        parser = __import__(module, fromlist=["build_parser"]).build_parser()
        for action in parser._actions:
            if action.option_strings and action.help != "==SUPPRESS==" and action.dest != "help":
                assert f"`{action.option_strings[0]}`" in page, (command, action.option_strings)


def _hand_written():
    generated = set(gen_docs.GENERATED)
    return [p for p in sorted(DOCS.glob("*.md")) if p.name not in generated]


@pytest.mark.parametrize("page", [p.name for p in _hand_written()])
def test_hand_written_page_links_resolve(page):
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (DOCS / target).exists(), f"docs/{page} links to {target}, which does not exist"


@pytest.mark.parametrize("page", ["format.md", "migration.md", "multinode.md"])
def test_hand_written_page_names_only_real_options(page):
    known = set(FOREIGN_FLAGS)
    for module in gen_docs.console_scripts().values():
        parser = __import__(module, fromlist=["build_parser"]).build_parser()
        known |= {s for a in parser._actions for s in a.option_strings}
    text = (DOCS / page).read_text()
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z_-]*[a-z]", text))
    assert not used - known, f"docs/{page} names options no command has: {sorted(used - known)}"


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_holds_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "commit the executed notebook"
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook has no plot"


def test_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "quantization", "performance"}


@pytest.fixture(scope="module")
def model_cached():
    smollm2_hf()  # a first run downloads and converts it here, outside the notebooks' time


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, model_cached):
    nb, seconds = gen_docs.execute_notebook(path, save=False, timeout=MAX_SECONDS)
    print(f"{path.name}: {seconds:.1f} s")
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1
    assert seconds < MAX_SECONDS, f"{path.name} took {seconds:.0f} s"
