"""The house rules: two floors of imports, one role per config key, one model registry."""
import ast
import dataclasses

import pytest

from conftest import ROOT
from model_config import MODELS, ROLES, Config, keys_of

COMMANDS = {"train", "eval", "export", "infer", "benchmark", "run_experiments", "serve"}
BUILDING_BLOCKS = {"util", "model_config", "get_dataset", "module", "model", "scorer", "runtime"}


def local_imports(path):
    """Top-level project modules imported anywhere in the file (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & (COMMANDS | BUILDING_BLOCKS)


def test_every_module_is_a_command_or_a_building_block():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == COMMANDS | BUILDING_BLOCKS, "classify the new module in tests/test_layout.py"


@pytest.mark.parametrize("module", sorted(COMMANDS | BUILDING_BLOCKS))
def test_no_module_imports_a_command(module):
    imported = local_imports(ROOT / f"{module}.py") - {module}
    assert not imported & COMMANDS, f"{module}.py imports the command(s) {sorted(imported & COMMANDS)}"


def test_every_config_key_has_one_known_role():
    for f in dataclasses.fields(Config):
        assert f.metadata.get("role") in ROLES, f.name
    assert set().union(*(keys_of(r) for r in ROLES)) == {f.name for f in dataclasses.fields(Config)}
    # what eval.py/export.py may change on a trained model never includes what defines it
    assert not keys_of("source", "run") & keys_of("data", "model", "train")
    assert {"epochs", "patience"} <= keys_of("budget") and "lr" in keys_of("train") and "seed" in keys_of("data")


def test_model_registry_is_the_one_list():
    import model
    import run_experiments
    for name, spec in MODELS.items():
        assert isinstance(getattr(model, spec.cls), type), name
        Config(model=name).for_model()  # every preset is a valid config
    assert run_experiments.ORDER == list(MODELS)
    assert {f.name: f.metadata["choices"] for f in dataclasses.fields(Config)}["model"] == tuple(MODELS)
    assert Config(model="two_tower").for_model().interaction == "dot"


def test_readme_is_a_short_contract_with_the_ci_test_command():
    """README.md stays a ModelZoo contract of at most 20 KB (evidence lives in docs/), and the test command
    it gives is the one .ci/run runs."""
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 20 * 1024, f"README.md is {len(readme):,} bytes: move evidence to docs/"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command == "python -m pytest -q"
    assert b"\npython -m pytest -q  " in readme or b"\npython -m pytest -q\n" in readme
