"""Which cluster a sparseps.keras layer or optimizer talks to: the default client, and an optimizer's own."""
import os

from .. import connect
from ..client import Client

_default_client = [None]


class OnCluster:
    """Base of sparseps.keras.Optimizer: something with the `.client` and `.name` of an optimizer on
    the cluster. A layer or RemoteVariable given one as optimizer= takes its client and name."""


def client_and_optimizer(client, optimizer):
    """(client, optimizer) as a layer was given them: a sparseps.keras.Optimizer brings its client
    (unless client= is given) and stands for its name."""
    if isinstance(optimizer, OnCluster):
        return client or optimizer.client, optimizer.name
    return client, optimizer


def set_client(client_or_addresses) -> Client:
    """Make a client the default for layers and optimizers created without client=."""
    c = client_or_addresses if isinstance(client_or_addresses, Client) else connect(client_or_addresses)
    _default_client[0] = c
    return c


def get_client(client=None) -> Client:
    if client is None:
        client = _default_client[0]
        if client is None:
            addresses = os.environ.get("SPARSEPS_ADDRESS")
            if not addresses:
                raise ValueError("no sparseps client: pass client=, call sparseps.keras.set_client(...) or set "
                                 "SPARSEPS_ADDRESS")
            client = set_client(addresses)
        return client
    if isinstance(client, str) or isinstance(client, (list, tuple)):
        return connect(client)
    return client

