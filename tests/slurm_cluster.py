"""A real one-node SLURM cluster in a temporary folder: munged, slurmctld and slurmd from Debian's slurm-wlm, run as
root in the foreground (so that exactly these processes are stopped afterwards), every state, spool, log, pid and
socket file under the folder, the ports picked free. Clients find it through SLURM_CONF.

    python tests/slurm_cluster.py /tmp/cluster      # start one by hand and keep it up (Ctrl-C or kill stops it)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "scontrol")
NODE = "embx1"
CPUS = 4  # more than this machine has (config_overrides): four one-CPU runs fit side by side, as on a wider node


def missing() -> list[str]:
    """The programs a cluster needs that are not installed (Debian: apt-get install slurm-wlm munge)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [d for d in DAEMONS if shutil.which(d, path=path) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class Cluster:
    """start() returns once sinfo shows the node idle; stop() ends the three daemons (by their pids)."""

    def __init__(self, folder: Path, extra_conf: str = ""):
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"
        self.extra_conf = extra_conf
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "munge", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        host = socket.gethostname()
        self.conf.write_text(f"""\
ClusterName=embx
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=10
MessageTimeout=5
InactiveLimit=0
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=60 State=UP
PartitionName=lab Nodes={NODE} AllowAccounts=physics MaxTime=30 State=UP
{self.extra_conf}""")

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def start(self, timeout: float = 60) -> "Cluster":
        self.write_conf()
        d = self.dir / "munge"
        subprocess.run([_which("mungekey"), "--create", "--keyfile", str(d / "munge.key"), "--force"], check=True,
                       capture_output=True)
        os.chmod(d / "munge.key", 0o600)
        self._start([_which("munged"), "--foreground", "--force", f"--socket={d}/munge.socket",
                     f"--key-file={d}/munge.key", f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                     f"--seed-file={d}/munged.seed"], "munged")
        self._wait(lambda: (d / "munge.socket").exists(), timeout, "munged's socket")
        self._start([_which("slurmctld"), "-D", "-c", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self.run("sinfo", "-h").returncode == 0, timeout, "slurmctld answering sinfo")
        self._start([_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)], "slurmd")
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t").stdout, timeout, "the node idle in sinfo")
        return self

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}: {self.logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise TimeoutError(f"no {what} after {timeout:.0f} s: {self.logs()}")

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([_which(args[0]), *args[1:]], capture_output=True, text=True, env=self.env,
                              timeout=timeout)

    def logs(self, n: int = 20) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")) + sorted(self.dir.glob("munge/*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        # jobs first, while slurmd can still end their processes; then the daemons, newest first
        if self.procs and self.procs[-1].poll() is None:
            try:
                self.run("scancel", "--full", "--user=root", timeout=10)
                end = time.time() + 20
                while time.time() < end and self.run("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # kill <pid> stops the daemons too (the finally below)
    c = Cluster(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={c.conf}", flush=True)
    try:
        signal.pause()
    finally:
        c.stop()
