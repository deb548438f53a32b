"""`sparseps`: the command for a person.

    sparseps status 127.0.0.1:50051        # variables, optimizers, iterations of every shard
    sparseps status etcd://127.0.0.1:2379/prod   # the same, after one line per replica (role, epoch, lag)
    sparseps demo                          # train a small model against a local server
    sparseps demo --dynamic                # a CTR model on hashed 64-bit ids in dynamic tables
    sparseps demo --torch --workers 2      # a DLRM-like model in PyTorch (sparseps.torch), two workers
    sparseps cluster up --shards 3         # run a local cluster until Ctrl-C (client/cluster.py)
    sparseps export-tf ADDR --out DIR      # TensorFlow checkpoint of an optimizer's state (import-tf: back)
    sparseps export ADDR --variable emb --out rows.npz   # a dynamic variable's live rows (client/export.py)
    sparseps evict ADDR                    # run the age eviction of dynamic variables now
"""
import argparse
import json
import sys


def _replicas(address: str) -> int:
    """One line per replica of a replicated cluster, from etcd: shard, role, epoch, pid, address, lag."""
    from .server.coordination import cluster_view
    try:
        view = cluster_view(address)
    except Exception as e:
        print(f"sparseps status: cannot read {address}: {e}", file=sys.stderr)
        return 1
    if not view:
        print(f"sparseps status: no replicas of {address} in etcd", file=sys.stderr)
        return 1
    for k in sorted(view):
        s = view[k]
        isr = set((s["isr"] or {}).get("members", []))
        epoch = (s["leader"] or {}).get("epoch", 0)
        if s["leader"] is None:
            print(f"shard={k} role=none epoch=0 pid=- address=- no leader (in-sync: {sorted(isr)})")
        for r in sorted(s["replicas"], key=lambda r: (r.get("role") != "leader", r.get("id", ""))):
            extra = f" in_sync={r['in_sync']}" if r.get("role") == "leader" else \
                f" lag_records={r.get('lag_records', 0)} lag_bytes={r.get('lag_bytes', 0)}" \
                f" lag_seconds={r.get('lag_seconds', 0)}" + \
                (" in_sync=yes" if r.get("id") in isr else (" in_sync=no" if r.get("role") != "serving" else ""))
            print(f"shard={k} role={r.get('role')} epoch={r.get('epoch', epoch)} pid={r.get('pid')} "
                  f"address={r.get('address')} lsn={r.get('lsn')} id={r.get('id')}{extra}")
    return 0


def _status(args):
    from .tf_checkpoint import connect_from_args   # address, token, TLS options
    if args.address.startswith("etcd://"):
        code = _replicas(args.address)
        if code or args.replicas_only:
            return code
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
            if v.get("dynamic"):
                print(f"  variable  {v['name']:<20} dynamic dim={v['shape'][-1]} {v['dtype']} "
                      f"optimizer={v['optimizer'] or '-'} live_rows={v['local_rows']} bytes={v['bytes']}")
                print(f"            policy: {_policy_text(v['table'])}")
                print(f"            rows:   {_counters_text(v['table_stats'])}")
                continue
            print(f"  variable  {v['name']:<20} shape={v['shape']} {v['dtype']} optimizer={v['optimizer'] or '-'} "
                  f"partition={v['partition']} rows_here={v['local_rows']} bytes={v['bytes']}")
    totals = {}   # dynamic variable -> its counters summed over the shards
    for sh in st["shards"]:
        for v in sh["variables"]:
            if v.get("dynamic"):
                acc = totals.setdefault(v["name"], {})
                for k in COUNTERS:
                    acc[k] = acc.get(k, 0) + v["table_stats"].get(k, 0)
    for name, acc in totals.items():
        print(f"dynamic variable {name} (all shards): {_counters_text(acc)}")
    return 0


# a dynamic table's counters (server/dynamic.py DynamicTable.stats, plus live_rows), in print order
COUNTERS = ("live_rows", "created", "admitted", "evicted", "refused_admission", "refused_capacity")


def _counters_text(stats: dict) -> str:
    return " ".join(f"{k}={stats.get(k, 0)}" for k in COUNTERS)


def _policy_text(table: dict) -> str:
    """admission, eviction and capacity of a dynamic table in one line (docs/dynamic.md)."""
    def section(d):
        return ", ".join(f"{k}={v}" for k, v in d.items()) if d else "none"
    cap = table.get("capacity")
    capacity = (f"{cap} rows per shard, on_full={table.get('on_full')}, evict_batch={table.get('evict_batch')}"
                if cap is not None else "none")
    return (f"admission: {section(table.get('admission'))}; eviction: {section(table.get('eviction'))}; "
            f"capacity: {capacity}")


def _evict(args):
    from .tf_checkpoint import connect_from_args
    with connect_from_args(args, retry_deadline=5) as client:
        removed = client.evict(args.variable)
        if args.variable:
            names = [args.variable]
        else:   # every dynamic variable with an age policy, 0 included
            names = [v["name"] for v in client.status()["shards"][0]["variables"]
                     if v.get("dynamic") and v["table"].get("eviction")]
    names += sorted(set(removed) - set(names))
    if not names:
        print("no dynamic variable has an age policy (eviction: max_age_steps or max_age_seconds)")
    for name in names:
        print(f"{name}: {removed.get(name, 0)} rows evicted")
    return 0


def _step(text: str) -> int:
    step = int(text)
    if step < 0:
        raise argparse.ArgumentTypeError(f"a step is >= 0 (0: every live row), got {step}")
    return step


def _export(args):
    from .export import export_rows, write_npz, write_tf_checkpoint
    from .tf_checkpoint import connect_from_args
    with connect_from_args(args, retry_deadline=10) as client:
        keys, values, step = export_rows(client, args.variable, args.since_step, args.slot)
    if args.out:
        path = write_npz(args.out, keys, values, step)
    else:
        path = write_tf_checkpoint(args.tf_checkpoint, keys, values, step)
    what = f"slot {args.slot!r} of " if args.slot else ""
    since = f" changed since step {args.since_step}" if args.since_step else ""
    print(f"{len(keys)} rows of {what}{args.variable!r}{since} -> {path} "
          f"(next incremental export: --since-step {step})")
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


def _command(sub, name, fn, help):
    """A subcommand that talks to a cluster: address, --token, --tls-* (no TensorFlow import)."""
    from .tf_checkpoint import connection_arguments
    p = sub.add_parser(name, help=help)
    connection_arguments(p)
    p.set_defaults(fn=fn)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"] and "--dynamic" in argv[1:]:     # the example takes its own options
        from .demo import run_dynamic
        return run_dynamic([a for a in argv[1:] if a != "--dynamic"])
    if argv[:1] == ["demo"] and "--torch" in argv[1:]:
        from .demo import run_torch
        return run_torch([a for a in argv[1:] if a != "--torch"])
    p = argparse.ArgumentParser(prog="sparseps", description="Talk to a sparseps cluster.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = _command(sub, "status", _status, "show variables, optimizers and iterations (dynamic: policy, counters)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--replicas-only", action="store_true", help="etcd://: only the replica lines")
    _command(sub, "checkpoint", _checkpoint, "write a checkpoint on every shard now (servers need --data-dir)")
    ev = _command(sub, "evict", _evict, "run the age eviction of dynamic variables now; rows removed per variable")
    ev.add_argument("--variable", help="only this dynamic variable (default: all)")
    x = _command(sub, "export", _export, "write a dynamic variable's live rows (keys, values): .npz or TF checkpoint")
    x.add_argument("--variable", required=True, help="the dynamic variable")
    x.add_argument("--since-step", type=_step, default=0, metavar="T",
                   help="only rows updated after optimizer step T (an incremental dump; default: every live row)")
    x.add_argument("--slot", default="", help="export this optimizer slot's rows (e.g. m) instead of the values")
    where = x.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="an .npz file: keys (int64), values, step")
    where.add_argument("--tf-checkpoint", metavar="DIR",
                       help="a TensorFlow checkpoint DIR/rows-N: tensors keys/.ATTRIBUTES/VARIABLE_VALUE, "
                            "values/.ATTRIBUTES/VARIABLE_VALUE, step/.ATTRIBUTES/VARIABLE_VALUE")
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
