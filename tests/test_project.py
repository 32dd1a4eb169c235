"""Project hygiene: the README's commands, .ci/run, environment.yml as pip reads it and in step with pyproject.toml,
one Python floor everywhere."""
import json
import re
import subprocess
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import PYTHON, ROOT

# pip's own requirements-file parser, in a process of its own (pip imports distutils, which must not leak into
# this one: torch's inductor needs setuptools' distutils later)
PIP_PARSE = """import json, sys
from pip._internal.network.session import PipSession
from pip._internal.req.req_file import parse_requirements
print(json.dumps([[r.requirement, r.is_editable] for r in parse_requirements(sys.argv[1], session=PipSession())]))"""

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
    done = subprocess.run([PYTHON, "-c", PIP_PARSE, str(reqs)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    parsed = json.loads(done.stdout)
    editable = [req for req, is_editable in parsed if is_editable]
    assert editable == [".[dev]"], "environment.yml must install the project itself: -e .[dev]"
    assert PROJECT["name"] == "embxlib" and "dev" in PROJECT["optional-dependencies"]  # what ".[dev]" is
    listed = sorted(canonical(req) for req, is_editable in parsed if not is_editable)
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
