"""`sparseps demo`: data, metrics, one and several workers, several shards, the plot (no TensorFlow needed)."""
import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from sparseps import cli, demo

SMALL = ["--users", "4000", "--items", "1000", "--dim", "8", "--batch", "1024", "--steps", "60", "--epochs", "2",
         "--val-clicks", "8000", "--no-progress"]


def _run(args, timeout=120):
    r = subprocess.run([sys.executable, "-m", "sparseps.cli", "demo", *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _final(out):
    m = re.search(r"training loss ([\d.]+) -> ([\d.]+); validation log-loss ([\d.]+), AUC ([\d.]+)", out)
    assert m, out
    return tuple(float(x) for x in m.groups())


def test_defaults_are_the_documented_model():
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    a = p.parse_args([])
    assert (a.users, a.dim, a.items, a.workers, a.address, a.plot) == (100_000, 32, 20_000, 1, None, None)
    assert a.steps * a.batch >= 1_000_000            # a real amount of clicks


def test_synthetic_clicks_are_reproducible_and_zipf():
    a = demo.synthetic_clicks(5000, 1000, 8, 50_000, seed=3)
    b = demo.synthetic_clicks(5000, 1000, 8, 50_000, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    uid, iid, y, logit = a
    counts = np.sort(np.bincount(iid, minlength=1000))[::-1]
    assert counts[:10].sum() > 0.2 * len(iid)        # a few items take a large share of the clicks
    assert 0.2 < y.mean() < 0.6
    assert demo.auc(y, logit) > 0.75                 # the labels do follow the hidden model


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = np.round(rng.normal(size=300) + y, 1)        # with ties
    pos, neg = s[y], s[~y]
    wins = np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])
    pairwise = wins / (len(pos) * len(neg))
    assert demo.auc(y, s) == pytest.approx(pairwise, abs=1e-12)


def test_one_worker_on_an_address_with_plot(numba_server, unique, tmp_path):
    png = tmp_path / "loss.png"
    out = _run(["--address", numba_server.address, "--name", unique, "--plot", str(png), *SMALL])
    first, last, val_loss, val_auc = _final(out)
    assert last < first and val_loss < 0.69 and val_auc > 0.6
    assert "epoch 1: validation log-loss" in out and "epoch 2: validation log-loss" in out
    assert "truth recovery" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_workers_and_shards(cluster3, unique):
    """3 worker processes on a 3-shard cluster: all steps applied, validation close to one worker's."""
    address = ",".join(s.address for s in cluster3)
    single = _final(_run(["--address", address, "--name", unique + "a", "--max-in-flight", "0", "--no-prefetch",
                          *SMALL]))
    out = _run(["--address", address, "--name", unique + "b", "--workers", "3", *SMALL])
    multi = _final(out)
    assert "3 worker(s); optimizer iterations now 60" in out
    assert multi[1] < multi[0]
    assert abs(multi[2] - single[2]) < 0.01 and abs(multi[3] - single[3]) < 0.02, (single, multi)


def test_starts_its_own_server_and_stops_it(capsys):
    rc = cli.main(["demo", *SMALL, "--steps", "20", "--epochs", "1"])
    out = capsys.readouterr().out
    m = re.search(r"started a local sparseps-server at \S+ \(pid (\d+)\)", out)
    assert m and rc == 0, out
    with pytest.raises(ProcessLookupError):
        os.kill(int(m.group(1)), 0)


def test_default_demo_runs_and_the_loss_goes_down():
    """`sparseps demo` with no arguments: its own server, the 100,000 x 32 LazyAdam table."""
    out = _run([], timeout=300)
    first, last, _, _ = _final(out)
    assert last < first - 0.03


def test_async_pusher_and_prefetcher(numba_client, unique):
    from sparseps import errors
    from sparseps.overlap import AsyncPusher, Prefetcher, first_occurrence_unique
    c = numba_client
    c.create_optimizer(f"{unique}_o", "SGD", learning_rate=1.0)
    table = c.create_variable(f"{unique}_t", initial_value=np.zeros((50, 2), np.float32), optimizer=f"{unique}_o")
    with AsyncPusher(c, max_in_flight=2) as pusher:
        for k in range(20):
            assert pusher.push({table.name: (np.array([k % 5, k % 5]), np.ones((2, 2), np.float32))}) is None
            assert pusher.in_flight <= 2
        assert pusher.flush() == 20 and pusher.pushed == 20
    np.testing.assert_array_equal(table.pull(np.arange(5))[:, 0], -8.0)      # 4 pushes x 2 duplicates x lr 1
    pusher = AsyncPusher(c, max_in_flight=2)
    pusher.push({f"{unique}_missing": np.zeros(3)})
    with pytest.raises(errors.NotFound):
        pusher.flush()
    pusher.close()

    batches = [(np.array([[3, 1], [3, 9]]), k) for k in range(4)]
    seen = []
    for (ids, k), rows in Prefetcher(iter(batches), {"t": (table, lambda b: b[0])}):
        np.testing.assert_array_equal(rows["t"].rows, table.pull(ids.reshape(-1)).reshape(2, 2, 2))
        np.testing.assert_array_equal(rows["t"].take([9, 3]), rows["t"].values[[2, 1]])
        seen.append(k)
    assert seen == [0, 1, 2, 3]
    u, inv = first_occurrence_unique(np.array([7, 2, 7, 5, 2]))
    np.testing.assert_array_equal(u, [7, 2, 5])
    np.testing.assert_array_equal(u[inv], [7, 2, 7, 5, 2])


_REPORT = re.compile(r"step +(\d+): loss ([\d.]+); live rows: wide ([\d,]+) \(the keys of steps \d+-\d+: ([\d,]+); "
                     r"([\d,]+) evicted by age\), deep ([\d,]+) \(capacity ([\d,]+)\)")


def _dynamic_outcome(out):
    """The reports of examples/train_hashed_ctr.py: every wide table size is exactly the keys its age
    policy keeps, the deep table stays within its capacity; the loss falls and beats chance held out."""
    reports = [[int(x.replace(",", "")) if "." not in x else float(x) for x in m.groups()]
               for m in _REPORT.finditer(out)]
    assert len(reports) >= 3, out
    for step, _, wide, kept, _, deep, capacity in reports:
        assert wide == kept, (step, wide, kept)
        assert 0 < deep <= capacity, (step, deep, capacity)
    assert reports[-1][4] > 0, out                     # the age policy removed rows
    m = re.search(r"training loss ([\d.]+) -> ([\d.]+); held-out log-loss ([\d.]+) \(chance, the base rate: "
                  r"([\d.]+)\), AUC ([\d.]+)", out)
    assert m, out
    first, last, held_out, chance, held_auc = (float(x) for x in m.groups())
    assert last < first and held_out < chance - 0.02 and held_auc > 0.6, m.group(0)
    return reports


def test_dynamic_demo_starts_its_own_server_and_learns():
    """`sparseps demo --dynamic` with its defaults: its own server, hashed Zipf ids over 2^62 keys."""
    r = subprocess.run([sys.executable, "-m", "sparseps.cli", "demo", "--dynamic"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    reports = _dynamic_outcome(r.stdout)
    assert reports[-1][0] == 300 and "optimizer iterations 300" in r.stdout
    assert max(rep[5] for rep in reports) > 0.9 * reports[-1][6]     # the deep table did fill to its capacity
    pid = int(re.search(r"started a local sparseps-server at \S+ \(pid (\d+)\)", r.stdout).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_dynamic_demo_on_three_shards(cluster3, unique):
    """On 3 shards: the capacity bound holds per shard (3 x --capacity in all), keys routed by hash."""
    address = ",".join(s.address for s in cluster3)
    out = _run(["--dynamic", "--address", address, "--name", unique, "--steps", "80", "--batch", "512",
                "--capacity", "1500", "--max-age-steps", "20", "--evict-every", "10", "--report-every", "20"],
               timeout=240)
    reports = _dynamic_outcome(out)
    assert "x 3 shard(s)" in out and all(rep[6] == 4500 for rep in reports)
    assert max(rep[5] for rep in reports) > 0.8 * 4500
