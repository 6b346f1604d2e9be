"""Project files agree with each other: dependencies, entry points, CI."""

import re
from pathlib import Path

import tomllib
import yaml

from resemul_core.interfaces.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_name(r) for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip_section if not r.startswith("-e")}
    assert listed == declared
    assert "torch==2.13.0" in pip_section and "jupyter-book==1.0.4.post1" in pip_section


def test_install_pins_torch_and_jupyter_book():
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in makefile and "-c constraints.txt" in makefile
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert "jupyter-book==1.0.4.post1" in constraints
    assert not any(line.lower().startswith("torch==") for line in constraints)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make book" in readme
    assert readme.index("make book") < readme.index("make test") < 1500  # the opening lines


def test_models_command_prints_the_twelve_variants(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["variant", "block", "multi", "trainable", "total"]
    rows = {line.split()[0]: line.split()[3] for line in lines[2:]}
    assert len(rows) == 12
    assert rows["rese2-multi"] == "26,980,146" and rows["basic"] == "1,869,874"


def test_models_command_accepts_width(capsys):
    assert main(["models", "--width", "0.25", "--num-tags", "10"]) == 0
    assert "basic-multi" in capsys.readouterr().out


def test_every_name_the_package_exports_resolves():
    import resemul_core

    for name in resemul_core.__all__:
        assert getattr(resemul_core, name) is not None, name
