"""`make lab` starts JupyterLab from .venv on nbs/ with a kernel that imports embxlib and shows widgets;
`make kernel` registers .venv as the kernel `embxlib` for a JupyterLab installed elsewhere. Real servers and
kernels, on 127.0.0.1 only, each shut down at the end."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from jupyter_client import BlockingKernelClient
from nbformat.v4 import new_code_cell, new_notebook

from conftest import ROOT

VENV = ROOT / ".venv"
pytestmark = pytest.mark.skipif(Path(sys.prefix).resolve() != VENV.resolve(), reason="needs the project's .venv "
                                "(make test)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port: int, token: str):
        self.base, self.token = f"http://127.0.0.1:{port}", token

    def page(self, path: str, method: str = "GET", body: dict | None = None) -> str:
        req = urllib.request.Request(self.base + path, method=method, headers={"Authorization": f"token {self.token}"},
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()

    def call(self, path: str, method: str = "GET", body: dict | None = None):
        text = self.page(path, method, body)
        return json.loads(text) if text else None

    def wait_up(self, proc, log: Path, timeout: float = 120):
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                pytest.fail(f"make lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return self.call("/api/status")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def run_code(connection_file: Path, code: str) -> str:
    client = BlockingKernelClient()
    client.load_connection_file(str(connection_file))
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        out = []
        reply = client.execute_interactive(code, timeout=120, output_hook=lambda m: out.append(
            m["content"].get("text", "") if m["msg_type"] == "stream" else ""))
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out)
    finally:
        client.stop_channels()


@pytest.mark.slow
def test_make_lab_serves_nbs_with_a_kernel_that_imports_embxlib(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    env.pop("MAKEFLAGS", None)
    log = tmp_path / "lab.log"
    args = (f"--no-browser --port={port} --ServerApp.port_retries=0 --IdentityProvider.token={token} "
            "--LabApp.extension_manager=readonly")  # no look-ups on PyPI
    with open(log, "w") as out:
        proc = subprocess.Popen(["make", "-s", "lab", f"LAB_ARGS={args}"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(port, token)
    try:
        server.wait_up(proc, log)
        listed = {c["name"] for c in server.call("/api/contents/nbs")["content"]}
        assert {"run_variant.ipynb", "analyze_runs.ipynb", "sweep.ipynb"} <= listed
        nb = server.call("/api/contents/nbs/run_variant.ipynb")["content"]
        kernel_name = nb["metadata"]["kernelspec"]["name"]
        assert kernel_name in server.call("/api/kernelspecs")["kernelspecs"]  # the notebooks open without a prompt
        page = server.page("/lab")  # the federated extensions the browser loads: widgets, so tqdm.auto bars render
        assert '"name": "@jupyter-widgets/jupyterlab-manager"' in page.replace('":"', '": "')
        kernel = server.call("/api/kernels", "POST", {"name": kernel_name, "path": "nbs/run_variant.ipynb"})
        try:
            printed = run_code(tmp_path / "runtime" / f"kernel-{kernel['id']}.json",
                               "import os, sys, embxlib, ipywidgets, torch\n"
                               "print(sys.prefix); print(embxlib.__file__); print(os.getcwd())")
        finally:
            server.call(f"/api/kernels/{kernel['id']}", "DELETE")
        prefix, module, cwd = printed.split("\n")[:3]
        assert Path(prefix).resolve() == VENV.resolve()
        assert Path(module).resolve() == (ROOT / "embxlib" / "__init__.py").resolve()
        assert Path(cwd).resolve() == (ROOT / "nbs").resolve()  # a notebook's kernel runs in nbs/
    finally:
        try:
            server.call("/api/shutdown", "POST")
            proc.wait(timeout=30)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_make_kernel_registers_the_venv_as_kernel_embxlib(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))  # where --user installs, here a temporary one
    monkeypatch.delenv("MAKEFLAGS", raising=False)
    env = dict(os.environ)
    subprocess.run(["make", "-s", "kernel"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    listed = json.loads(subprocess.run([str(VENV / "bin" / "jupyter"), "kernelspec", "list", "--json"], env=env,
                                       check=True, capture_output=True, text=True).stdout)["kernelspecs"]
    spec = listed["embxlib"]
    assert Path(spec["resource_dir"]).is_relative_to(tmp_path)
    assert Path(spec["spec"]["argv"][0]).parent.resolve() == (VENV / "bin").resolve()
    nb = new_notebook(cells=[new_code_cell("import sys, embxlib\nprint(sys.prefix)")])
    nbformat.write(nb, tmp_path / "probe.ipynb")
    done = pm.execute_notebook(str(tmp_path / "probe.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="embxlib",
                               progress_bar=False, cwd=str(tmp_path))
    assert Path(done.cells[0].outputs[0]["text"].strip()).resolve() == VENV.resolve()
