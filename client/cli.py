"""`sparseps`: the command for a person.

    sparseps status 127.0.0.1:50051        # variables, optimizers, iterations of every shard
    sparseps demo                          # train a small model against a local server
    sparseps demo --dynamic                # a CTR model on hashed 64-bit ids in dynamic tables
    sparseps cluster up --shards 3         # run a local cluster until Ctrl-C (client/cluster.py)
    sparseps export-tf ADDR --out DIR      # TensorFlow checkpoint of an optimizer's state (import-tf: back)
"""
import argparse
import json
import sys


def _status(args):
    from .tf_checkpoint import connect_from_args   # address, token, TLS options
    with connect_from_args(args, retry_deadline=5) as client:
        st = client.status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for sh in st["shards"]:
        print(f"shard {sh['shard']} at {sh['address']}  backend={sh['backend']} device={sh['device']} "
              f"version={sh['version']}")
        for o in sh["optimizers"]:
            print(f"  optimizer {o['name']:<20} {o['class_name']:<16} iterations={o['iterations']}")
        for v in sh["variables"]:
            print(f"  variable  {v['name']:<20} shape={v['shape']} {v['dtype']} optimizer={v['optimizer'] or '-'} "
                  f"partition={v['partition']} rows_here={v['local_rows']} bytes={v['bytes']}")
    return 0


def _checkpoint(args):
    from .tf_checkpoint import connect_from_args   # address, token, TLS options
    with connect_from_args(args, retry_deadline=5) as client:
        for shard, path, nbytes in client.checkpoint():
            print(f"shard {shard}: {path} ({nbytes / 1e6:.1f} MB)")
    return 0


def _demo(args):
    from .demo import run
    return run(args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"] and "--dynamic" in argv[1:]:     # the example takes its own options
        from .demo import run_dynamic
        return run_dynamic([a for a in argv[1:] if a != "--dynamic"])
    p = argparse.ArgumentParser(prog="sparseps", description="Talk to a sparseps cluster.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="show variables, optimizers and iterations")
    from .tf_checkpoint import connection_arguments   # address, --token, --tls-*: no TensorFlow import
    connection_arguments(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_status)
    c = sub.add_parser("checkpoint", help="write a checkpoint on every shard now (servers need --data-dir)")
    connection_arguments(c)
    c.set_defaults(fn=_checkpoint)
    d = sub.add_parser("demo", help="train a small recommendation model (starts a local server if needed)")
    from .demo import add_arguments
    add_arguments(d)
    d.set_defaults(fn=_demo)
    k = sub.add_parser("cluster", help="run a local cluster: `sparseps cluster up --shards 3`")
    from .cluster import add_arguments as cluster_arguments
    cluster_arguments(k)
    from .tf_checkpoint import add_cli as tf_checkpoint_cli   # export-tf, import-tf (TensorFlow on demand)
    tf_checkpoint_cli(sub)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
