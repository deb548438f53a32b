"""TLS, mutual TLS and bearer-token roles against live servers.

Certificates are made here, in a temporary directory, with `cryptography` (no key material is
committed). Every refused call is a state-changing one (a push, or a write), and afterwards an
admin client checks that the variable and the optimizer's iterations did not move. Every call
carries a per-RPC timeout, so a refusal returns in milliseconds instead of waiting on retries.
"""
import datetime
import ipaddress
import json
import os
import time

import grpc
import numpy as np
import pytest

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

import sparseps  # noqa: E402
from sparseps.local import LocalServer  # noqa: E402
from sparseps.proto import sparseps_pb2 as pb  # noqa: E402
from sparseps.proto import sparseps_pb2_grpc as pb_grpc  # noqa: E402
from sparseps.server.auth import METHOD_ROLES, TokenFileError, parse_tokens, required_role  # noqa: E402
from sparseps.tensors import to_tensor  # noqa: E402

TIMEOUT = 10.0         # per RPC
FAST = TIMEOUT / 2     # a refusal comes back well before the deadline (it is not a hang the deadline ended)
ROWS, DIM = 16, 4
TOKENS = {"admin": "adm-" + os.urandom(8).hex(), "train": "trn-" + os.urandom(8).hex(),
          "read": "rd-" + os.urandom(8).hex()}


# ---------------------------------------------------------------------------- certificates
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _cert(subject_cn, key, issuer_cert=None, issuer_key=None, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca, server (SAN localhost + 127.0.0.1), client (signed by ca); other_ca + rogue client."""
    d = tmp_path_factory.mktemp("pki")
    out = {}

    def write(name, data):
        path = d / name
        path.write_bytes(data)
        os.chmod(path, 0o600)
        out[name] = str(path)

    ca_key, other_key = _key(), _key()
    ca = _cert("sparseps test CA", ca_key, ca=True)
    other = _cert("some other CA", other_key, ca=True)
    write("ca.pem", _pem_cert(ca))
    write("other_ca.pem", _pem_cert(other))
    for name, issuer, ikey, server in (("server", ca, ca_key, True), ("client", ca, ca_key, False),
                                       ("rogue", other, other_key, False)):
        k = _key()
        write(f"{name}.key", _pem_key(k))
        write(f"{name}.pem", _pem_cert(_cert(f"sparseps {name}", k, issuer, ikey, server=server)))
    tokens = d / "tokens"
    tokens.write_text("# test tokens\n" + "".join(f"{t} {role}\n" for role, t in TOKENS.items()))
    os.chmod(tokens, 0o600)
    out["tokens"] = str(tokens)
    return out


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def mtls_server(pki):
    """Mutual TLS (client certificates required) and bearer tokens."""
    srv = LocalServer("--backend", "numpy", "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                      "--tls-ca", pki["ca.pem"], "--tokens-file", pki["tokens"], "--no-malloc-tuning")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tls_server(pki):
    """Server-authenticated TLS only, no tokens."""
    srv = LocalServer("--backend", "numpy", "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"],
                      "--no-malloc-tuning")
    yield srv
    srv.stop()


def _admin(server, pki):
    return sparseps.connect(server.address, tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"],
                            tls_key=pki["client.key"], token=TOKENS["admin"], timeout=TIMEOUT, retry_deadline=5)


@pytest.fixture(scope="module")
def table(mtls_server, pki):
    """SGD(lr=1) over a 16x4 table of zeros; one accepted push of ones to row 0 (iterations = 1)."""
    with _admin(mtls_server, pki) as c:
        c.create_optimizer("sgd", "SGD", learning_rate=1.0)
        c.create_variable("emb", initial_value=np.zeros((ROWS, DIM), np.float32), optimizer="sgd")
        assert c.push({"emb": (np.array([0]), np.ones((1, DIM), np.float32))}) == 1
        return c.pull("emb").copy(), c.optimizer("sgd").iterations


def _assert_unchanged(server, pki, table):
    before, its = table
    with _admin(server, pki) as c:
        np.testing.assert_array_equal(c.pull("emb"), before)
        assert c.optimizer("sgd").iterations == its


def _push_request():
    return pb.PushRequest(gradients=[pb.Gradient(variable="emb", ids=to_tensor(np.arange(ROWS, dtype=np.int64)),
                                                 values=to_tensor(np.ones((ROWS, DIM), np.float32)))],
                          optimizers=["sgd"])


def _channel(server, pki, *, ca="ca.pem", cert="client", plaintext=False, target=None):
    target = target or server.address
    if plaintext:
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(_read(pki[ca]), _read(pki[f"{cert}.key"]) if cert else None,
                                         _read(pki[f"{cert}.pem"]) if cert else None)
    return grpc.secure_channel(target, creds)


def _refused(channel, request=None, method="Push", token=TOKENS["admin"]):
    """Call `method` on the channel with a timeout; (status code, details, seconds)."""
    stub = pb_grpc.ParameterServerStub(channel)
    t = time.perf_counter()
    try:
        getattr(stub, method)(request if request is not None else _push_request(), timeout=TIMEOUT,
                              metadata=(("authorization", f"Bearer {token}"),) if token else None)
    except grpc.RpcError as e:
        return e.code(), e.details(), time.perf_counter() - t
    finally:
        channel.close()
    return grpc.StatusCode.OK, "", time.perf_counter() - t


# ---------------------------------------------------------------------------- TLS
def test_tls_works_and_server_name(tls_server, pki):
    c = sparseps.connect(tls_server.address, tls_ca=pki["ca.pem"], timeout=TIMEOUT, retry_deadline=5)
    c.create_optimizer("o", "SGD", learning_rate=1.0)
    c.create_variable("w", initial_value=np.zeros((4, 2), np.float32), optimizer="o")
    assert c.push({"w": (np.array([1]), np.ones((1, 2), np.float32))}) == 1
    np.testing.assert_array_equal(c.pull("w")[1], [-1, -1])
    c.close()
    # the certificate names localhost: dial the IP and verify against that name
    c = sparseps.connect(tls_server.address, tls_ca=_read(pki["ca.pem"]), server_name="localhost",
                         timeout=TIMEOUT, retry_deadline=5)
    assert c.server_info[0].num_shards == 1
    c.close()


def test_tls_refusals_are_fast(tls_server, pki):
    cases = {
        "plaintext": _channel(tls_server, pki, plaintext=True),
        "wrong CA": _channel(tls_server, pki, ca="other_ca.pem", cert=None),
        "name not in certificate": grpc.secure_channel(
            tls_server.address, grpc.ssl_channel_credentials(_read(pki["ca.pem"])),
            (("grpc.ssl_target_name_override", "not-the-server.example"),)),
    }
    with sparseps.connect(tls_server.address, tls_ca=pki["ca.pem"], timeout=TIMEOUT) as c:
        c.create_optimizer("o2", "SGD", learning_rate=1.0)
        c.create_variable("emb", initial_value=np.zeros((ROWS, DIM), np.float32), optimizer="o2")
    for what, ch in cases.items():
        code, details, secs = _refused(ch)
        assert code == grpc.StatusCode.UNAVAILABLE, (what, code, details)
        assert secs < FAST, (what, secs)
    with sparseps.connect(tls_server.address, tls_ca=pki["ca.pem"], timeout=TIMEOUT) as c:
        assert c.optimizer("o2").iterations == 0
        assert not c.pull("emb").any()


# ---------------------------------------------------------------------------- mutual TLS + tokens
def test_mtls_with_admin_token(mtls_server, pki, table):
    before, its = table
    assert its == 1 and before[0].tolist() == [-1.0] * DIM and not before[1:].any()
    with _admin(mtls_server, pki) as c:
        assert c.status()["shards"][0]["optimizers"][0]["iterations"] == 1


@pytest.mark.parametrize("case", ["plaintext", "wrong CA", "no client certificate", "client cert of another CA"])
def test_transport_refusals_change_nothing(mtls_server, pki, table, case):
    ch = {"plaintext": lambda: _channel(mtls_server, pki, plaintext=True),
          "wrong CA": lambda: _channel(mtls_server, pki, ca="other_ca.pem"),
          "no client certificate": lambda: _channel(mtls_server, pki, cert=None),
          "client cert of another CA": lambda: _channel(mtls_server, pki, cert="rogue")}[case]()
    code, details, secs = _refused(ch)
    assert code == grpc.StatusCode.UNAVAILABLE, (case, code, details)
    assert secs < FAST
    _assert_unchanged(mtls_server, pki, table)


@pytest.mark.parametrize("token,method,want,words", [
    (None, "Push", grpc.StatusCode.UNAUTHENTICATED, "no token"),
    ("not-a-token", "Push", grpc.StatusCode.UNAUTHENTICATED, "unknown token"),
    (TOKENS["read"], "Push", grpc.StatusCode.PERMISSION_DENIED, "needs the 'train' role"),
    (TOKENS["read"], "PushChunked", grpc.StatusCode.PERMISSION_DENIED, "needs the 'train' role"),
    (TOKENS["train"], "SetWeights", grpc.StatusCode.PERMISSION_DENIED, "needs the 'admin' role"),
    (TOKENS["train"], "CreateVariable", grpc.StatusCode.PERMISSION_DENIED, "needs the 'admin' role"),
    (TOKENS["read"], "Checkpoint", grpc.StatusCode.PERMISSION_DENIED, "needs the 'admin' role"),
    (None, "GetServerInfo", grpc.StatusCode.UNAUTHENTICATED, "no token"),
])
def test_token_refusals_change_nothing(mtls_server, pki, table, token, method, want, words):
    request = {"Push": None,
               "PushChunked": iter([_push_request()]),
               "SetWeights": pb.SetWeightsRequest(writes=[pb.WeightWrite(
                   variable="emb", values=to_tensor(np.full((ROWS, DIM), 7, np.float32)))],
                   optimizer="sgd", set_iterations=True, iterations=99),
               "CreateVariable": pb.CreateVariableRequest(name="intruder", shape=[2, 2], dtype=pb.FLOAT32),
               "Checkpoint": pb.CheckpointRequest(),
               "GetServerInfo": pb.ServerInfoRequest()}[method]
    code, details, secs = _refused(_channel(mtls_server, pki), request, method, token)
    assert code == want, (code, details)
    assert words in details and method in details
    assert TOKENS["admin"] not in details and (token is None or token not in details)
    assert secs < FAST
    _assert_unchanged(mtls_server, pki, table)
    with _admin(mtls_server, pki) as c:
        assert [v.name for v in c.variables()] == ["emb"]


def test_roles_allow_what_they_should(mtls_server, pki, table):
    kw = dict(tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"], tls_key=pki["client.key"], timeout=TIMEOUT,
              retry_deadline=5)
    with sparseps.connect(mtls_server.address, token=TOKENS["read"], **kw) as c:
        np.testing.assert_array_equal(c.pull("emb"), table[0])
        assert c.optimizer("sgd").iterations == table[1]
        assert c.status()["shards"][0]["variables"][0]["name"] == "emb"
        with pytest.raises(sparseps.PermissionDenied, match="Push needs the 'train' role"):
            c.push({"emb": (np.array([3]), np.ones((1, DIM), np.float32))})
    with pytest.raises(sparseps.Unauthenticated, match="unknown token"):
        sparseps.connect(mtls_server.address, token="wrong", **kw)
    _assert_unchanged(mtls_server, pki, table)


def test_train_token_pushes(tls_server, mtls_server, pki, table):
    kw = dict(tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"], tls_key=pki["client.key"], timeout=TIMEOUT)
    with _admin(mtls_server, pki) as a:
        a.create_variable("emb2", initial_value=np.zeros((4, 2), np.float32), optimizer="sgd")
        its = a.optimizer("sgd").iterations
    with sparseps.connect(mtls_server.address, token=TOKENS["train"], **kw) as c:
        assert c.push({"emb2": (np.array([2]), np.ones((1, 2), np.float32))}) == its + 1
        np.testing.assert_array_equal(c.pull("emb2")[2], [-1, -1])
        with pytest.raises(sparseps.PermissionDenied, match="CreateVariable needs the 'admin' role"):
            c.create_variable("nope", initial_value=np.zeros((2, 2), np.float32))
    with _admin(mtls_server, pki) as a:   # leave the shared table's iterations as the fixture saw them
        a.set_weights([], optimizer="sgd", iterations=its)


def test_health_needs_no_token(mtls_server, pki):
    ch = _channel(mtls_server, pki)   # mutual TLS still applies: the probe presents a client certificate
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    ch.close()


# ---------------------------------------------------------------------------- configuration
def test_tokens_file_formats():
    assert parse_tokens("a read\n\n# c\nb  train  # trailing\nc admin\n") == {"a": "read", "b": "train", "c": "admin"}
    assert parse_tokens(json.dumps({"x": "admin"})) == {"x": "admin"}
    assert parse_tokens(json.dumps([{"token": "x", "role": "read"}])) == {"x": "read"}
    assert parse_tokens(json.dumps({"tokens": [{"token": "y", "role": "train"}]})) == {"y": "train"}
    for bad, words in (("a reader", "roles are read, train, admin"), ("a b c", "expected `TOKEN ROLE`"),
                       ("", "no tokens"), ("{", "not valid JSON"), ('[{"token": "x"}]', "entry 0"),
                       ("a read\na admin", "twice")):
        with pytest.raises(TokenFileError, match=words):
            parse_tokens(bad)


def test_every_method_has_a_role():
    for m in pb.DESCRIPTOR.services_by_name["ParameterServer"].methods:
        assert m.name in METHOD_ROLES, m.name
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/sparseps.v1.ParameterServer/SomethingNew") == "admin"


def test_bad_flags_refuse_to_start(pki, tmp_path):
    bad = tmp_path / "tokens"
    bad.write_text("tok superuser\n")
    for args, words in ((["--tls-cert", pki["server.pem"]], "needs both --tls-cert and --tls-key"),
                        (["--tokens-file", str(bad)], "roles are read, train, admin"),
                        (["--tokens-file", str(tmp_path / "missing")], "cannot read tokens file")):
        with pytest.raises(RuntimeError, match=words):
            LocalServer("--backend", "numpy", "--no-malloc-tuning", *args, ready_timeout=20)


def test_cli_takes_token_and_tls(mtls_server, pki, table, capsys):
    from sparseps import cli
    tls = ["--tls-ca", pki["ca.pem"], "--tls-cert", pki["client.pem"], "--tls-key", pki["client.key"]]
    assert cli.main(["status", mtls_server.address, "--token", TOKENS["read"], *tls]) == 0
    assert "optimizer sgd" in capsys.readouterr().out
    with pytest.raises(sparseps.Unauthenticated, match="no token"):
        cli.main(["status", mtls_server.address, *tls])
