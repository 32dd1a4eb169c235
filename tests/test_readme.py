"""The README as a new user meets it: its cheap commands run as written (a training command only with --dry-run
added), its notebook parameters are accepted, its make targets exist, and the numbers it quotes are the data's."""
import inspect
import json
import re
import shlex
import subprocess

import pandas as pd
import pytest
import yaml

from embxlib import launch, lens, plots, runs, stats
from embxlib.config import Config
from conftest import PYTHON, ROOT, python_env

README = (ROOT / "README.md").read_text()
TEXT = " ".join(README.split())  # prose as one line: the README wraps sentences anywhere


def command_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def python_commands(module: str) -> list[list[str]]:
    out = []
    for line in command_lines():
        words = shlex.split(line)
        if words[:1] in (["python"], [".venv/bin/python"]) and words[1:3] == ["-m", module]:
            out.append([PYTHON, *words[1:]])
    return out


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=python_env(), cwd=ROOT, timeout=300, **kw)


def test_train_commands_of_the_readme_run_as_written():
    cmds = python_commands("embxlib.train")
    assert len(cmds) >= 4
    for cmd in cmds:
        if "--resume" in cmd:
            continue  # needs a run of one's own
        cheap = cmd if "--help" in cmd or "--dry-run" in cmd else cmd + ["--dry-run"]
        r = run(cheap)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        claimed = re.search(r"medium_x01 --dry-run[^#\n]*#[^\n]*?(\d{1,3}(?:,\d{3}){2,}) parameters", README)
        if "--dry-run" in cmd and "medium_x01" in cmd:
            assert f"parameters: {claimed[1]}" in r.stdout
        if "--config" in cmd:
            assert '"seed": 3' in r.stdout and '"extra_embeds": 1' in r.stdout


def test_make_targets_of_the_readme_exist():
    targets = set(re.findall(r"\bmake ([\w-]+)", README))
    assert {"run", "test", "lab", "kernel", "blog", "bench", "corpus"} <= targets
    for target in targets:
        r = run(["make", "-n", target])
        assert r.returncode == 0, (target, r.stderr)


def test_notebook_parameters_of_the_readme_are_accepted():
    seen = set()
    for line in command_lines():
        words = shlex.split(line.split("&&")[-1])
        if "papermill" not in words[0]:
            continue
        params = dict(zip(words[words.index("-p") + 1::3], words[words.index("-p") + 2::3])) if "-p" in words else {}
        if "-y" in words:
            params.update(yaml.safe_load(words[words.index("-y") + 1]))
        notebook = words[1]
        seen.add(notebook)
        if notebook == "nbs/run_variant.ipynb":
            launch.check_settings({k: v for k, v in params.items() if k in launch.LAUNCH_SETTINGS})
            launch.resolve({k: v for k, v in params.items() if k in launch.CONFIG_FIELDS})
        elif notebook == "nbs/sweep.ipynb":
            for _, p in launch.sweep_runs(params["grid"], params["seeds"], params.get("base")):
                launch.resolve(p)
    assert seen == {"nbs/run_variant.ipynb", "nbs/sweep.ipynb", "nbs/analyze_runs.ipynb"}


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.slow
def test_the_readme_analysis_command_writes_only_where_told(tmp_path):
    line = next(s for s in command_lines() if "analyze_runs.ipynb" in s)
    assert "runs/analysis/cpu-x0" in line
    before = git_status()
    r = subprocess.run(["bash", "-c", line.replace("runs/analysis/cpu-x0", str(tmp_path / "a"))], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert git_status() == before
    order = pd.read_csv(tmp_path / "a" / "crossing-order-6.0.csv")
    assert sorted(order["variant"]) == ["x00-ve2", "x01-ve2"] and set(order["n_runs"]) == {12}
    assert (tmp_path / "a" / "analysis.ipynb").is_file() and (tmp_path / "a" / "lambdas-layer-x01-ve2-mean12.png").is_file()


def test_numbers_the_readme_quotes_are_the_data():
    ours = sorted(p.parent for p in ROOT.glob("runs/cpu-*/*/config.json"))
    assert f"our own {len(ours)} tiny runs" in TEXT
    table = pd.read_csv(ROOT / "runs" / "cpu-x0" / "summary.csv")
    x01 = table[table["extra_embeds"] == 1]["train_time_s"]
    assert f"trained for {x01.min():.0f}-{x01.max():.0f} s" in TEXT
    rows = json.loads((ROOT / "runs" / "bench" / "cpu.json").read_text())["training"]
    compiled = {r["model"]: r for r in rows if r["compiled"]}
    eager = {r["model"]: r for r in rows if not r["compiled"]}
    x00, plain = compiled["embxlib tiny x00"], compiled["plain GPT (nanoGPT style)"]
    assert f"tiny x00 {x00['ms_per_step']:.0f} ms/step against {plain['ms_per_step']:.0f} ms" in TEXT
    assert f"({x00['vs_plain']:.2f}x; {x00['vs_plain_eager']:.2f}x of the plain GPT's eager " \
           f"{eager['plain GPT (nanoGPT style)']['ms_per_step']:.0f} ms)" in TEXT
    assert f"tiny x00 takes {eager['embxlib tiny x00']['ms_per_step']:.0f} ms " \
           f"({eager['embxlib tiny x00']['vs_plain']:.2f}x)" in TEXT
    ratios = ", ".join(f"{compiled[f'embxlib tiny x0{k}']['vs_x00']:.3f}x" for k in (1, 2, 3))
    assert f"x01 to x04 take {ratios} and {compiled['embxlib tiny x04']['vs_x00']:.3f}x the time of x00" in TEXT


def test_the_functions_the_readme_names_exist_and_plots_take_an_ax():
    modules = {"runs": runs, "stats": stats, "plots": plots, "lens": lens}
    named = set(re.findall(r"`(runs|stats|plots|lens)\.(\w+)\(", README))
    assert len(named) >= 8
    for module, name in named:
        func = getattr(modules[module], name)
        if module == "plots":
            assert "ax" in inspect.signature(func).parameters, name
    assert "take an optional `ax` and return the figure" in TEXT


def test_the_readme_sweeps_made_the_committed_runs():
    """Each sweep command of the README, resolved as the sweep resolves it, is the config of a committed run."""
    sweeps = [shlex.split(line) for line in command_lines() if "embxlib.launch sweep" in line]
    assert len(sweeps) >= 2
    for words in sweeps:
        spec = launch.sweep_spec(yaml.safe_load(words[words.index("-y") + 1]))
        for name, params in launch.check_sweep(**spec):
            run = ROOT / spec["sweep_dir"] / name
            expected = json.loads(json.dumps(launch.resolve(params).to_dict()))  # (tuples as config.json has lists)
            committed = json.loads((run / "config.json").read_text())
            # fields added since the runs were made are absent there; the runs trained as their defaults say
            added = {k: v for k, v in expected.items() if k not in committed}
            assert committed == {k: v for k, v in expected.items() if k in committed}, run
            assert all(Config.__dataclass_fields__[k].default == v for k, v in added.items()), added
            assert json.loads((run / "summary.json").read_text())["status"] == "finished", run
