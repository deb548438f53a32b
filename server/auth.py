"""Bearer tokens with roles, checked by a server interceptor before any request is read.

A tokens file maps tokens to roles, either one `TOKEN ROLE` pair per line (`#` starts a comment)

    # who          token                              role
    3f9c1e...      read
    a71b0d...      train

or JSON: {"TOKEN": "ROLE", ...}, [{"token": ..., "role": ...}, ...] or {"tokens": [...]}.

Roles are cumulative: `read` may call Pull, GetSlot, Describe/List/Get* and GetServerInfo;
`train` may also Push and PushChunked; `admin` may call everything (CreateOptimizer,
CreateVariable, SetWeights, Checkpoint, and any method added later). `replica` is apart: the
followers of a replicated shard fetch its log with it (and may read); only it and `admin` may. A client sends
`authorization: Bearer TOKEN` in the call metadata (`sparseps.connect(addr, token=...)`).

A call without a token, or with a token the file does not list, ends with UNAUTHENTICATED; a
known token whose role is too low ends with PERMISSION_DENIED. Either way the request body is
never parsed (nor counted against the memory budget) and nothing changes. The gRPC health service stays open so that load balancers and
orchestrators can probe the server without a token; reflection needs a `read` token.

Tokens are compared by their SHA-256 digests (no per-character timing), and are never logged.
"""
import hashlib
import json
import logging
import os

import grpc

log = logging.getLogger("sparseps.server")

ROLES = ("read", "train", "admin", "replica")
# `replica` is a role of its own (a follower of a replicated shard, docs/replication.md): it may
# fetch the log and snapshots (sparseps.v1.Replication) and read, nothing else; `admin` may too.
RANK = {"read": 0, "train": 1, "admin": 2, "replica": 0}
REPLICATION = "/sparseps.v1.Replication/"

SERVICE = "/sparseps.v1.ParameterServer/"
HEALTH = "/grpc.health.v1.Health/"

# The least role each ParameterServer method needs. A method missing here needs `admin`.
METHOD_ROLES = {
    "GetServerInfo": "read",
    "GetOptimizer": "read",
    "ListOptimizers": "read",
    "DescribeVariable": "read",
    "ListVariables": "read",
    "Pull": "read",
    "GetSlot": "read",
    "Push": "train",
    "PushChunked": "train",
    "PushPull": "train",
    "CreateOptimizer": "admin",
    "CreateVariable": "admin",
    "SetWeights": "admin",
    "Checkpoint": "admin",
    "Evict": "admin",        # removes rows of dynamic variables (`sparseps evict`)
    "SyncVote": "train",     # sync mode: a trainer's vote, sent to shard 0
    "SyncCommit": "admin",   # sync mode: shard 0 to its peers (SPARSEPS_PEER_TOKEN must be an admin token)
}


class TokenFileError(ValueError):
    pass


def parse_tokens(text: str, where: str = "tokens file") -> dict:
    """{token: role} from the text of a tokens file (JSON or `token role` lines)."""
    stripped = text.strip()
    pairs = []
    if stripped[:1] in ("{", "["):
        try:
            obj = json.loads(stripped)
        except ValueError as e:
            raise TokenFileError(f"{where}: not valid JSON: {e}") from None
        if isinstance(obj, dict) and "tokens" in obj and isinstance(obj["tokens"], list):
            obj = obj["tokens"]
        if isinstance(obj, dict):
            pairs = list(obj.items())
        elif isinstance(obj, list):
            for i, entry in enumerate(obj):
                if not isinstance(entry, dict) or "token" not in entry or "role" not in entry:
                    raise TokenFileError(f"{where}: entry {i} must be {{\"token\": ..., \"role\": ...}}")
                pairs.append((entry["token"], entry["role"]))
        else:
            raise TokenFileError(f"{where}: JSON must be an object or a list")
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise TokenFileError(f"{where} line {lineno}: expected `TOKEN ROLE`, got {len(fields)} field(s)")
            pairs.append((fields[0], fields[1]))
    tokens = {}
    for i, (token, role) in enumerate(pairs, 1):
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise TokenFileError(f"{where}: token #{i} must be a non-empty string without spaces")
        if role not in RANK:
            raise TokenFileError(f"{where}: token #{i} has role {role!r}; roles are {', '.join(ROLES)}")
        if token in tokens and tokens[token] != role:
            raise TokenFileError(f"{where}: token #{i} is listed twice with different roles")
        tokens[token] = role
    if not tokens:
        raise TokenFileError(f"{where}: no tokens (a server with --tokens-file and no tokens refuses everyone)")
    return tokens


def load_tokens(path: str) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise TokenFileError(f"cannot read tokens file {path}: {e.strerror or e}") from None
    mode = os.stat(path).st_mode
    if mode & 0o004:
        log.warning("tokens file %s is readable by every user of this machine (chmod 600 it)", path)
    return parse_tokens(text, f"tokens file {path}")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def required_role(method: str) -> str | None:
    """The role a full method name needs; None for the open health service."""
    if method.startswith(HEALTH):
        return None
    if method.startswith(SERVICE):
        return METHOD_ROLES.get(method[len(SERVICE):], "admin")
    if method.startswith(REPLICATION):
        return "replica"
    return "read"   # reflection and anything else that exists


def permits(role: str, need: str) -> bool:
    if need == "replica":
        return role in ("replica", "admin")
    return RANK[role] >= RANK[need]


def peer_credentials(args):
    """Channel credentials for calls to this server's peers (sync-mode commits, replication): the
    server's own certificate as the client's, its --tls-ca as the roots; None without TLS."""
    cert, key, ca = (getattr(args, n, None) for n in ("tls_cert", "tls_key", "tls_ca"))
    if not (cert and key):
        return None

    def read(p):
        with open(p, "rb") as f:
            return f.read()
    return grpc.ssl_channel_credentials(read(ca) if ca else None, read(key), read(cert))


def _aborting_handler(handler, code, details):
    """A handler of the same kind as `handler` that ends the call without reading the request."""
    def abort(request_or_iterator, context):
        context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer TOKEN` against {token: role} before a call is handled."""

    def __init__(self, tokens: dict):
        self._roles = {_digest(t): r for t, r in tokens.items()}
        self.denied = 0   # calls refused (for tests and metrics)

    def role_of(self, metadata) -> tuple:
        """(role or None, reason) for the call's metadata."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return None, "no token"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "malformed authorization (expected `Bearer TOKEN`)"
        role = self._roles.get(_digest(token.strip()))
        if role is None:
            return None, "unknown token"
        return role, ""

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        need = required_role(method)
        if need is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:       # no such method: let gRPC answer UNIMPLEMENTED
            return None
        role, reason = self.role_of(handler_call_details.invocation_metadata)
        short = method.rsplit("/", 1)[-1]
        if role is None:
            self.denied += 1
            return _aborting_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                     f"{short}: {reason}; this server needs `authorization: Bearer TOKEN` "
                                     "metadata with a token from its --tokens-file "
                                     "(sparseps.connect(address, token=...))")
        if not permits(role, need):
            self.denied += 1
            return _aborting_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                     f"{short} needs the {need!r} role; this token has {role!r}")
        return handler
