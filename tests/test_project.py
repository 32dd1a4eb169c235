"""Project hygiene: the README's commands, .ci/run, environment.yml as pip reads it and in step with pyproject.toml,
one Python floor everywhere."""
import re
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pip._internal.network.session import PipSession
from pip._internal.req.req_file import parse_requirements

from conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def canonical(text: str) -> tuple:
    r = Requirement(text)
    return canonicalize_name(r.name), str(r.specifier), tuple(sorted(r.extras)), str(r.marker or "")


def environment_pip_lines() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def test_environment_yml_pip_lines_are_what_pip_accepts_and_pyproject_lists(tmp_path):
    # conda writes the pip: list to a requirements file and runs `pip install -r` on it from the yml's folder:
    # parse it with pip's own parser (an option pip does not take there, like --no-deps, fails here)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(environment_pip_lines()) + "\n")
    parsed = list(parse_requirements(str(reqs), session=PipSession()))
    editable = [p.requirement for p in parsed if p.is_editable]
    assert editable == [".[dev]"], "environment.yml must install the project itself: -e .[dev]"
    assert PROJECT["name"] == "embxlib" and "dev" in PROJECT["optional-dependencies"]  # what ".[dev]" is
    listed = sorted(canonical(p.requirement) for p in parsed if not p.is_editable)
    wanted = sorted(canonical(d) for d in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"])
    assert listed == wanted
    assert any(name == "jupyterlab" for name, *_ in listed)


def test_one_python_floor_in_pyproject_environment_readme_and_makefile():
    floor = re.fullmatch(r">=\s*3\.(\d+)", PROJECT["requires-python"])
    assert floor, PROJECT["requires-python"]
    minor = int(floor[1])
    assert minor >= 11, "the tests import tomllib (Python 3.11+)"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert f"python=3.{minor}" in env["dependencies"]
    readme = (ROOT / "README.md").read_text()
    assert set(re.findall(r"Python (3\.\d+)\+", readme)) == {f"3.{minor}"}
    assert f"sys.version_info >= (3, {minor})" in (ROOT / "Makefile").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()
