"""Never lose an acknowledged push, never apply one twice: crash, retry and restart, for real.

Every test runs real sparseps-server processes on 127.0.0.1 with a --data-dir, kills them with
SIGKILL where the scenario says so, and checks the state row by row: with SGD, learning rate 1 and
unit gradients, a row's value is exactly minus the number of pushes that touched it.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import sparseps
from sparseps.local import LocalServer
from sparseps.proto import sparseps_pb2 as pb
from sparseps.proto import sparseps_pb2_grpc as pb_grpc
from sparseps.tensors import to_tensor

ROWS, DIM = 64, 4


def sgd_table(client, name="emb", rows=ROWS, dim=DIM):
    client.create_optimizer("sgd", "SGD", learning_rate=1.0)
    return client.create_variable(name, initial_value=np.zeros((rows, dim), np.float32), optimizer="sgd")


def raw_push(address, ids, client_id, sequence, name="emb", stub=None):
    import grpc
    req = pb.PushRequest(client_id=client_id, sequence=sequence, gradients=[pb.Gradient(
        variable=name, ids=to_tensor(np.asarray(ids, np.int64)), values=to_tensor(np.ones((len(ids), DIM), np.float32)))])
    if stub is not None:
        return stub.Push(req, timeout=10)
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.ParameterServerStub(ch).Push(req, timeout=10)


def test_retry_of_an_applied_push_applies_nothing(tmp_path):
    """Same (client id, sequence) twice: the second answer is the first one; also after a restart."""
    with LocalServer("--data-dir", str(tmp_path)) as srv:
        client = sparseps.connect(srv.address)
        sgd_table(client)
        first = raw_push(srv.address, [1, 2, 2], "trainer-a", 7)
        again = raw_push(srv.address, [1, 2, 2], "trainer-a", 7)
        assert not first.duplicate and again.duplicate
        assert [(i.optimizer, i.iterations) for i in again.iterations] == [("sgd", 1)]
        other = raw_push(srv.address, [1], "trainer-a", 8)
        assert other.iterations[0].iterations == 2
        np.testing.assert_array_equal(client.pull("emb", [1, 2])[:, 0], [-2, -2])
        port = srv.port
        srv.kill()
    # restarted from the write-ahead log only (no checkpoint was written before the SIGKILL)
    with LocalServer("--data-dir", str(tmp_path), port=port) as srv:
        client = sparseps.connect(srv.address)
        again = raw_push(srv.address, [1, 2, 2], "trainer-a", 7)
        assert again.duplicate and again.iterations[0].iterations == 1
        np.testing.assert_array_equal(client.pull("emb", [1, 2])[:, 0], [-2, -2])
        assert client.optimizer("sgd").iterations == 2
        client.checkpoint()
        port = srv.port
    # restarted from a checkpoint (graceful stop writes one too): the answers survive in it
    with LocalServer("--data-dir", str(tmp_path), port=port) as srv:
        again = raw_push(srv.address, [1], "trainer-a", 8)
        assert again.duplicate and again.iterations[0].iterations == 2


def test_a_retry_older_than_the_remembered_window_is_refused_not_applied_again(tmp_path):
    """Each client's last 512 answers are kept; a retry of an older sequence is refused with
    FAILED_PRECONDITION (it was applied, or came after 512 later pushes), never applied twice;
    also after a restart from a checkpoint."""
    import grpc

    from sparseps.server.pushes import WINDOW
    with LocalServer("--data-dir", str(tmp_path), "--wal-sync", "none") as srv:   # (the checkpoint keeps it)
        client = sparseps.connect(srv.address)
        sgd_table(client)
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ParameterServerStub(ch)
            for seq in range(1, WINDOW + 2):
                raw_push(srv.address, [0], "trainer-b", seq, stub=stub)
            with pytest.raises(grpc.RpcError) as e:
                raw_push(srv.address, [0], "trainer-b", 1, stub=stub)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not applied" in e.value.details()
            assert raw_push(srv.address, [0], "trainer-b", 2, stub=stub).duplicate   # still in the window
        assert client.pull("emb", [0])[0, 0] == -(WINDOW + 1)
        client.checkpoint()
        client.close()
    with LocalServer("--data-dir", str(tmp_path)) as srv, sparseps.connect(srv.address) as client:
        with pytest.raises(grpc.RpcError) as e:
            raw_push(srv.address, [0], "trainer-b", 1)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert client.pull("emb", [0])[0, 0] == -(WINDOW + 1)
        assert client.optimizer("sgd").iterations == WINDOW + 1


@pytest.mark.parametrize("policy", ["fsync", "group"])
def test_kill9_during_pushes_loses_and_duplicates_nothing(tmp_path, policy):
    """4 workers push while the shard is SIGKILLed and restarted: every acknowledged push, once."""
    srv = LocalServer("--data-dir", str(tmp_path), "--wal-sync", policy, "--checkpoint-every-steps", "40")
    port = srv.port
    client = sparseps.connect(srv.address)
    sgd_table(client)
    acked = np.zeros(ROWS, np.int64)
    lock = threading.Lock()
    stop = threading.Event()
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        c = sparseps.connect(f"127.0.0.1:{port}", retry_deadline=60)
        n = 0
        while not stop.is_set() and n < 1500:
            ids = rng.choice(ROWS, size=3, replace=False)
            try:
                c.push({"emb": (ids, np.ones((3, DIM), np.float32))})
            except sparseps.Error as e:
                errors.append(e)
                return
            with lock:
                acked[ids] += 1
            n += 1

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while acked.sum() < 3 * 300 and time.monotonic() < deadline:   # ~300 pushes acknowledged
            time.sleep(0.01)
        srv.kill()
        killed_at = acked.sum()
        time.sleep(0.3)
        srv = LocalServer("--data-dir", str(tmp_path), "--wal-sync", policy, port=port)
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    try:
        assert not errors, errors[:3]
        assert killed_at > 0 and acked.sum() > killed_at, "the kill must land in the middle of the pushes"
        client = sparseps.connect(srv.address)
        values = client.pull("emb")
        np.testing.assert_array_equal(values, -acked[:, None].astype(np.float32) * np.ones((1, DIM)))
        assert client.optimizer("sgd").iterations == acked.sum() // 3
    finally:
        srv.stop()


def test_worker_killed_in_the_middle_of_a_step_leaves_nothing(tmp_path):
    """A chunked push whose sender dies after some chunks is never applied, not even in part."""
    with LocalServer("--data-dir", str(tmp_path)) as srv:
        client = sparseps.connect(srv.address)
        sgd_table(client)
        script = textwrap.dedent(f"""
            import time, grpc, numpy as np
            from sparseps.proto import sparseps_pb2 as pb, sparseps_pb2_grpc as pb_grpc
            from sparseps.tensors import to_tensor
            def chunks():
                for k in range(1000):
                    yield pb.PushRequest(client_id="dying", sequence=1, gradients=[pb.Gradient(
                        variable="emb", ids=to_tensor(np.array([k % {ROWS}])),
                        values=to_tensor(np.ones((1, {DIM}), np.float32)))])
                    print("sent", k, flush=True)
                    time.sleep(0.01)
            ch = grpc.insecure_channel("{srv.address}")
            pb_grpc.ParameterServerStub(ch).PushChunked(chunks())
        """)
        # (a complete stream marks its last chunk; this one never gets there)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(20):
            proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)
        assert not client.pull("emb").any()
        assert client.optimizer("sgd").iterations == 0
        client.push({"emb": (np.array([0]), np.ones((1, DIM), np.float32))})   # and it keeps serving
        assert client.optimizer("sgd").iterations == 1


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate the failing disk (needs root): {r.stderr.strip()}")


@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_failing_checkpoint_directory_gives_a_clear_error_and_the_shard_keeps_serving(tmp_path, failure):
    ckpt_dir = tmp_path / "checkpoints"
    with LocalServer("--data-dir", str(tmp_path)) as srv:
        client = sparseps.connect(srv.address)
        sgd_table(client, rows=50_000, dim=8)   # 1.6 MB per array: more than the 64 KiB disk
        _mount_tmpfs(str(ckpt_dir), "size=64k" if failure == "full" else "size=1m,ro")
        try:
            with pytest.raises(sparseps.FailedPrecondition) as e:
                client.checkpoint()
            reason = "No space left on device" if failure == "full" else "Read-only file system"
            assert "checkpoint failed, the shard keeps serving" in str(e.value) and reason in str(e.value)
            assert client.push({"emb": (np.array([5]), np.ones((1, 8), np.float32))}) == 1
            assert client.pull("emb", [5])[0, 0] == -1
        finally:
            subprocess.run(["umount", str(ckpt_dir)], check=False)
        client.checkpoint()   # the disk is back: checkpoints work again


@pytest.mark.parametrize("old, new", [(2, 3), (3, 1)])
def test_restore_onto_a_different_number_of_shards(tmp_path, old, new):
    """Checkpoints of an old cluster loaded by a cluster of another size: rows re-partitioned, every
    variable, slot and iteration as before, and training goes on from there."""
    from sparseps.local import start_cluster
    rng = np.random.default_rng(5)
    servers = start_cluster(old, data_dir=str(tmp_path / "old"))
    try:
        c = sparseps.connect(",".join(s.address for s in servers))
        c.create_optimizer("o", "LazyAdam", learning_rate=0.1)
        c.create_variable("emb", initial_value=rng.normal(size=(101, 4)).astype(np.float32), optimizer="o")
        c.create_variable("div", initial_value=rng.normal(size=(37, 2)).astype(np.float32), optimizer="o",
                          partition="div")
        c.create_variable("bias", initial_value=np.zeros(3, np.float32), optimizer="o")
        for _ in range(4):
            c.push({"emb": (rng.integers(0, 101, 20), rng.normal(size=(20, 4)).astype(np.float32)),
                    "div": (rng.integers(0, 37, 5), rng.normal(size=(5, 2)).astype(np.float32)),
                    "bias": rng.normal(size=3).astype(np.float32)})
        before = {n: c.pull(n) for n in ("emb", "div", "bias")}
        slots = {n: c.optimizer("o").get_slot(n, "m") for n in ("emb", "div", "bias")}
        paths = [p for _, p, _ in c.checkpoint()]
    finally:
        for s in servers:
            s.stop()
    servers = start_cluster(new, "--restore", ",".join(paths), data_dir=str(tmp_path / "new"))
    try:
        c = sparseps.connect(",".join(s.address for s in servers))
        assert c.optimizer("o").iterations == 4
        for n in ("emb", "div", "bias"):
            np.testing.assert_array_equal(c.pull(n), before[n])
            np.testing.assert_array_equal(c.optimizer("o").get_slot(n, "m"), slots[n])
        assert c.push({"emb": (np.array([100]), np.ones((1, 4), np.float32))}) == 5
    finally:
        for s in servers:
            s.stop()


def test_log_replay_of_data_plane_and_grpc_pushes_rebuilds_the_same_state(tmp_path):
    """The log holds data-plane pushes as received (message + raw bytes, record kind F) and gRPC
    pushes as serialized requests (kind P). A shard restarted from the log alone (no checkpoint)
    ends bit-identical, values, slots and iterations, to a shard that never stopped."""
    rng = np.random.default_rng(7)
    steps = []
    for i in range(12):
        ids = rng.integers(0, 40, 24)                         # duplicates included
        steps.append(({"emb": (ids, rng.standard_normal((24, 4)).astype(np.float32)),
                       "w64": rng.standard_normal((3, 2)),          # dense, float64
                       "t3": (ids[:5], rng.standard_normal((5, 2, 3)).astype(np.float32))},   # rows of rank 2
                      rng.integers(0, 40, 6), i % 3))

    def setup(c):
        c.create_optimizer("opt", "LazyAdam", learning_rate=0.01)
        c.create_optimizer("opt64", "Adam", learning_rate=0.02, amsgrad=True)
        c.create_variable("emb", initial_value=np.ones((40, 4), np.float32), optimizer="opt")
        c.create_variable("t3", initial_value=np.ones((40, 2, 3), np.float32), optimizer="opt")
        c.create_variable("w64", initial_value=np.zeros((3, 2)), optimizer="opt64")

    def run(c_dp, c_grpc):
        for grads, nxt, how in steps:
            if how == 0:
                c_dp.push(grads)
            elif how == 1:
                c_dp.push_pull(grads, {"emb": nxt})
            else:
                c_grpc.push(grads)

    def state(c):
        out = [c.pull(n) for n in ("emb", "t3", "w64")]
        for o in ("opt", "opt64"):
            opt = c.optimizer(o)
            out += [np.array(opt.iterations)] + [np.asarray(w) for w in opt.get_weights()]
        return out

    with LocalServer("--backend", "numba") as ref:
        with sparseps.connect(ref.address) as c:
            setup(c)
            run(c, c)
            want = state(c)
    srv = LocalServer("--backend", "numba", "--data-dir", str(tmp_path))
    try:
        port = srv.port
        with sparseps.connect(srv.address) as c, sparseps.connect(srv.address, data_plane=False) as g:
            assert c.data_plane[0] is not None
            setup(g)
            run(c, g)
            assert all(np.array_equal(a, b) for a, b in zip(state(c), want))
        os.kill(srv.pid, signal.SIGKILL)   # no final checkpoint: the restart must replay the log
        srv.proc.wait(10)
    finally:
        srv.stop()
    kinds = set()
    for name in sorted(os.listdir(tmp_path / "wal")):
        data = (tmp_path / "wal" / name).read_bytes()
        pos = 0
        while pos + 16 <= len(data):
            length = int.from_bytes(data[pos:pos + 4], "little")
            kinds.add(data[pos + 16:pos + 17])
            pos += 16 + length
    assert {b"F", b"P"} <= kinds, kinds            # both record kinds are in the log
    with LocalServer("--backend", "numba", "--data-dir", str(tmp_path), port=port) as srv:
        with sparseps.connect(srv.address) as c:
            got = state(c)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_log_records_of_both_checksum_layouts_replay_and_corruption_stops_replay(tmp_path):
    """Records now carry crc32(payload + lsn), computed outside the shard lock; logs written before
    carry crc32(lsn + payload). Replay reads both, and stops at the first record that matches neither."""
    import struct
    import zlib

    from sparseps.server.wal import WriteAheadLog
    wal = WriteAheadLog(str(tmp_path), "none")
    wal.open()
    wal.append(b"P-first", b"|second part")
    wal.close()
    (seg,) = [p for p in tmp_path.iterdir() if p.name.startswith("wal-")]
    old_body = struct.pack("<Q", 2) + b"P-old layout"
    old = struct.pack("<II", len(old_body) - 8, zlib.crc32(old_body)) + old_body
    bad_body = struct.pack("<Q", 3) + b"P-corrupt"
    bad = struct.pack("<II", len(bad_body) - 8, zlib.crc32(bad_body) ^ 1) + bad_body
    late_body = struct.pack("<Q", 4) + b"P-after the corrupt one"
    late = struct.pack("<II", len(late_body) - 8, zlib.crc32(late_body)) + late_body
    seg.write_bytes(seg.read_bytes() + old + bad + late)
    got = [(lsn, bytes(p)) for lsn, p in WriteAheadLog(str(tmp_path), "none").replay(0)]
    assert got == [(1, b"P-first|second part"), (2, b"P-old layout")]


def test_log_reads_for_a_replica_resume_at_their_cursor_and_match_replay(tmp_path):
    """A follower far behind reads the leader's log in batches (server/replication.py): batch by
    batch, across a segment boundary, with the cursor of each read, or a stale one, or none, it
    gets exactly the records replay sees, in order; a record still being written is left for the
    next read. Both checksum layouts are accepted, as replay accepts them."""
    import struct
    import zlib

    from sparseps.server.wal import WriteAheadLog
    wal = WriteAheadLog(str(tmp_path), "none")
    wal.open()
    for i in range(1, 41):
        wal.append(b"P", bytes([i]) * (i * 7))
        if i == 25:
            wal.rotate(0)   # a second segment from record 26; the first one stays (checkpoint at 0)
    wal.close()
    segs = wal.segments()
    assert [first for first, _ in segs] == [1, 26]
    body = struct.pack("<Q", 41) + b"P-old layout"
    with open(segs[-1][1], "ab") as f:   # one record in the old checksum layout, then a half-written one
        f.write(struct.pack("<II", len(body) - 8, zlib.crc32(body)) + body + struct.pack("<IIQ", 100, 0, 42) + b"torn")
    want = [(lsn, bytes(p)) for lsn, p in WriteAheadLog(str(tmp_path), "none").replay(0)]
    assert [lsn for lsn, _ in want] == list(range(1, 42))
    for use_cursor in (True, False):
        got, lsn, cursor = [], 0, None
        while True:
            batch, cursor = wal.read(lsn, 300, cursor if use_cursor else None)
            if not batch:
                break
            assert sum(len(p) for _, p in batch[:-1]) < 300, "a batch stops once it holds max_bytes"
            got += batch
            lsn = batch[-1][0]
        assert got == want
    records, cursor = wal.read(10, 1, None)
    assert records == want[10:11]
    stale = (cursor[0], cursor[1], 5)   # a cursor for another position is not used
    assert wal.read(17, 50, stale)[0][0] == want[17]
    assert wal.read(41, 1 << 20, None) == ([], None)


def test_overlapping_checkpoints_each_get_their_own_number(tmp_path):
    """Checkpoint calls that overlap (a cron `sparseps checkpoint`, the periodic thread, the final
    save on SIGTERM) are written one after the other: distinct numbers, each complete, and the
    shard restarts from the newest."""
    with LocalServer("--data-dir", str(tmp_path), "--checkpoint-every-steps", "1") as srv:
        client = sparseps.connect(srv.address)
        sgd_table(client, rows=20000, dim=64)   # 5 MiB of values: each save takes a moment
        results = [None] * 6

        def save(k):
            with sparseps.connect(srv.address) as c:
                c.push({"emb": (np.array([k]), np.ones((1, 64), np.float32))})   # due for a periodic one
                results[k] = c.checkpoint()
        threads = [threading.Thread(target=save, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None for r in results), results
        paths = [r[0][1] for r in results]
        assert len(set(paths)) == 6, paths
        expected = client.pull("emb")
        client.close()
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names and not [n for n in names if n.endswith(".tmp")], names
    with LocalServer("--data-dir", str(tmp_path)) as srv, sparseps.connect(srv.address) as c:
        np.testing.assert_array_equal(c.pull("emb"), expected)
        assert c.optimizer("sgd").iterations == 6
