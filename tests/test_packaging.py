"""The package as users get it: one `sparseps` namespace from three folders, in a wheel and editable."""
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_protobuf_code_is_current():
    r = subprocess.run([sys.executable, "tools/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_sparseps_needs_no_tensorflow():
    code = "import sys, sparseps, sparseps.server.state; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_wheel_holds_the_three_folders_under_one_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("sparseps-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("sparseps/__init__.py", "sparseps/client.py", "sparseps/server/main.py",
                     "sparseps/server/optimizers/lazy_adam.py", "sparseps/server/backends/fused.py",
                     "sparseps/proto/sparseps_pb2.py", "sparseps/proto/sparseps.proto", "sparseps/torch/__init__.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not [n for n in names if n.startswith(("client/", "server/", "proto/", "tests/"))]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sparseps = sparseps.cli:main" in entry and "sparseps-server = sparseps.server.main:main" in entry
    # The wheel's files, first on sys.path, are what gets imported (not the editable checkout).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sparseps, sparseps.server.main, sparseps.proto.sparseps_pb2 as pb; "
            "print(sparseps.__file__); print(pb.DESCRIPTOR.package)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "sparseps.v1"


def test_compile_kernels_leaves_nothing_for_a_server_start_to_compile():
    """setup.sh and the image build run `--compile-kernels` so a shard starts in a second: every
    kernel a start needs must then load from numba's cache (a cold compile is about a minute)."""
    from sparseps.local import LocalServer
    r = subprocess.run([sys.executable, "-m", "sparseps.server", "--compile-kernels"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "numba kernels compiled or loaded" in r.stdout, r.stdout + r.stderr
    srv = LocalServer("--backend", "numba", env={"NUMBA_DEBUG_CACHE": "1"})
    try:
        log = srv.log()
    finally:
        srv.stop()
    assert "[cache] data loaded" in log, log
    assert "[cache] data saved" not in log, f"a server start compiled kernels --compile-kernels missed:\n{log}"
