"""sparseps: a parameter server for sparse training whose optimizers match TensorFlow's.

The whole trainer contract, in the spirit of ps-lite's Push / Pull / Wait:

    client = sparseps.connect("127.0.0.1:50051")                 # every shard address
    opt = client.create_optimizer("opt", {"class_name": "LazyAdam", "config": {"learning_rate": 1e-3}})
    emb = client.create_variable("emb", initial_value=np.zeros((1000, 64), np.float32), optimizer="opt")

    rows = emb.pull(ids)                                         # Pull: rows by id
    it = client.push({"emb": (ids, grad_rows)})                  # Push: one atomic optimizer step
    it, nxt = client.push_pull({"emb": (ids, g)}, {"emb": next_ids})   # PushPull: both, one round trip

Needs only numpy and grpcio; `sparseps.keras` (imported on demand) adds the TensorFlow layer.
"""
from .client import Client, Optimizer, StaleGradient, Variable
from .errors import (AlreadyExists, DeadlineExceeded, Error, FailedPrecondition, InvalidArgument, NotFound,
                     PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable)

__all__ = ["connect", "Client", "Variable", "Optimizer", "Error", "InvalidArgument", "NotFound", "AlreadyExists",
           "FailedPrecondition", "ResourceExhausted", "Unavailable", "DeadlineExceeded", "PermissionDenied",
           "Unauthenticated", "StaleGradient"]


def connect(addresses, *, metrics_port: int | None = None, **options) -> Client:
    """Connect to a cluster: a list or comma-separated string of shard addresses (any order).
    Options are Client's (timeout, retry_deadline, token, tls_*, data_plane, ...); metrics_port
    also serves this trainer's push/pull round trips at /metrics (sparseps.metrics).

        client = sparseps.connect("127.0.0.1:50051")
        client = sparseps.connect(["10.0.0.1:50051", "10.0.0.2:50051"], retry_deadline=120)
        client = sparseps.connect(addr, metrics_port=9400)  # the trainer's push/pull round trips at /metrics
    """
    if metrics_port is not None:   # here, not in client.py: sparseps.metrics builds on Client
        from . import metrics
        return metrics.connect(addresses, metrics_port=metrics_port, **options)
    return Client(addresses, **options)
