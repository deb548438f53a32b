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


def _cache_state(dirs):
    """{file: (mtime_ns, size)} of numba's cache files (index .nbi, code .nbc) under dirs: a
    compile writes one of them, a cache load writes none."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for d in dirs for p in pathlib.Path(d).rglob("*.nb[ic]")}


def _package_cache_dirs():
    import sparseps.server.backends.fused as fused
    import sparseps.server.keyindex as keyindex
    return sorted({pathlib.Path(m.__file__).parent / "__pycache__" for m in (fused, keyindex)})


def _start_and_stop(env=None):
    from sparseps.local import LocalServer
    srv = LocalServer("--backend", "numba", env=env)   # returns once the shard listens: kernels loaded
    log = srv.log()
    srv.stop()
    return log


def test_compile_kernels_leaves_nothing_for_a_server_start_to_compile():
    """setup.sh and the image build run `--compile-kernels` so a shard starts in a second: every
    kernel a start needs must then load from numba's cache (a cold compile is about a minute).
    Evidence that cannot race with a log: no cache file is written or touched by the start."""
    r = subprocess.run([sys.executable, "-m", "sparseps.server", "--compile-kernels"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "numba kernels compiled or loaded" in r.stdout, r.stdout + r.stderr
    dirs = _package_cache_dirs()
    before = _cache_state(dirs)
    assert len(before) >= 20, f"expected numba's cache files in {dirs}, found {sorted(before)}"
    log = _start_and_stop()
    after = _cache_state(dirs)
    changed = sorted(f for f in after if before.get(f) != after[f])
    assert not changed, f"a server start compiled kernels --compile-kernels missed: {changed}\n{log}"


def test_the_check_sees_a_kernel_compiled_at_start(tmp_path):
    """The check above can fail: with one kernel's cache missing (a --compile-kernels that missed
    it), the start compiles it and writes the cache files the check looks for. The cache is copied
    to a NUMBA_CACHE_DIR of its own, so the package's stays as it is."""
    from numba.core.caching import _CacheLocator
    import sparseps.server.backends.fused as fused
    subprocess.run([sys.executable, "-m", "sparseps.server", "--compile-kernels"], check=True,
                   capture_output=True, timeout=600)
    for d in _package_cache_dirs():
        source = next(d.parent.glob("*.py"))
        mirror = tmp_path / _CacheLocator.get_suitable_cache_subpath(str(source))
        mirror.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.nb[ic]"):
            (mirror / f.name).write_bytes(f.read_bytes())
    fused_dir = tmp_path / _CacheLocator.get_suitable_cache_subpath(fused.__file__)
    removed = sorted(fused_dir.glob("fused._pow_runs_kernel-*"))
    assert removed, sorted(p.name for p in fused_dir.iterdir())
    for f in removed:
        f.unlink()
    before = _cache_state([tmp_path])
    _start_and_stop({"NUMBA_CACHE_DIR": str(tmp_path)})
    after = _cache_state([tmp_path])
    written = sorted(pathlib.Path(f).name for f in after if before.get(f) != after[f])
    assert any(name.startswith("fused._pow_runs_kernel-") for name in written), written

def test_backend_auto_without_a_gpu_never_imports_tensorflow():
    """A CPU shard in an environment that has TensorFlow must not pay its import (seconds, ~700 MB)
    to learn there is no GPU: the shard picks numba, and no TensorFlow library is mapped in it."""
    import pytest
    from sparseps.local import LocalServer
    from sparseps.server.backends import gpu_present
    if gpu_present():
        pytest.skip("this machine has a GPU: --backend auto picks a GPU backend here")
    srv = LocalServer("--backend", "auto")
    try:
        maps = pathlib.Path(f"/proc/{srv.pid}/maps").read_text()
        rss_kb = int(next(ln.split()[1] for ln in pathlib.Path(f"/proc/{srv.pid}/status").read_text().splitlines()
                          if ln.startswith("VmRSS:")))
        log = srv.log()
    finally:
        srv.stop()
    assert "backend=numba" in log, log
    assert "tensorflow" not in maps.lower(), [ln for ln in maps.splitlines() if "tensorflow" in ln.lower()][:3]
    assert rss_kb < 500_000, f"{rss_kb} kB resident: more than a numba shard needs"


def test_gpu_probe_reads_the_driver_and_cuda_visible_devices(tmp_path, monkeypatch):
    """The probe `--backend auto` uses instead of TensorFlow: the NVIDIA driver's /proc entries
    (a stand-in /proc here: this machine has no GPU) and CUDA_VISIBLE_DEVICES."""
    from sparseps.server.backends import gpu_present
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))          # no nvidia-smi to ask
    gpus = tmp_path / "driver" / "nvidia" / "gpus"
    assert gpu_present(str(tmp_path)) is False
    gpus.mkdir(parents=True)
    assert gpu_present(str(tmp_path)) is False         # a driver without devices
    (gpus / "0000:00:1e.0").mkdir()
    assert gpu_present(str(tmp_path)) is True
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_present(str(tmp_path)) is False         # every device hidden from this process
