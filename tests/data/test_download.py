"""Downloader against a local HTTP server: fresh, cached, resume, retry, checksum, crash safety, locking, CLI."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fileserver import FileServer
from helpers import closed_port_url
from typer.testing import CliRunner

from cnncli import data
from cnncli.cli.app import app
from cnncli.data.download import DownloadLimitError, Limits, limits_from_env
from cnncli.host.errors import ConfigError, DataError

FOLDER = "cifar-10-batches-py"
FILES = ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch")
PART = "cifar-10-python.tar.gz.part"
FAST = {"backoff": 0.01, "timeout": 10.0}


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


# ------------------------------------------------------------------------------------------- archives


def make_archive(files: dict[str, bytes], *, extra: list[tarfile.TarInfo] | None = None, gz_level: int = 6,
                 top: str = FOLDER) -> bytes:
    """A .tar.gz holding `top/<name>` for each entry (plus raw `extra` members)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=gz_level) as tar:
        info = tarfile.TarInfo(top)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny() -> dict:
    """Small archive in the official layout (random, incompressible, > 1 read chunk); md5 and size."""
    rng = np.random.default_rng(7)
    files = {name: rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes() for name in FILES}
    archive = make_archive(files)
    return {"files": files, "archive": archive, "md5": hashlib.md5(archive).hexdigest(), "size": len(archive)}


def serve(server: FileServer, archive: dict) -> dict:
    server.files["cifar-10-python.tar.gz"] = archive["archive"]
    return {"url": server.url(), "md5": archive["md5"], "size": archive["size"]}


def assert_tiny_extracted(folder: Path, tiny: dict) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    for name, content in tiny["files"].items():
        assert (folder / name).read_bytes() == content, name


def full_batch(i: int) -> tuple[np.ndarray, list[int]]:
    """Full-size but compressible content: 4 random images tiled 2500 times, random labels."""
    rng = np.random.default_rng(500 + i)
    return np.tile(rng.integers(0, 256, (4, 3072), dtype=np.uint8), (2500, 1)), rng.integers(0, 10, 10000).tolist()


@pytest.fixture(scope="module")
def full() -> dict:
    """An archive the real loader accepts: (10000, 3072) uint8 protocol-2 pickles, as the official ones."""
    files = {}
    for i, name in enumerate(FILES[1:]):
        x, y = full_batch(i)
        record = {b"batch_label": b"built", b"labels": y, b"data": x, b"filenames": [b"f.png"] * 10000}
        files[name] = pickle.dumps(record, protocol=2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    files["batches.meta"] = pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2)
    archive = make_archive(files, gz_level=1)
    return {"archive": archive, "md5": hashlib.md5(archive).hexdigest(), "size": len(archive), "names": names}


def leftovers(data_dir: Path) -> list[str]:
    """Everything in the data folder except the extracted data."""
    return sorted(p.name for p in data_dir.iterdir() if p.name != FOLDER) if data_dir.exists() else []


# ---------------------------------------------------------------------------------------------- tests


def test_fresh_download_then_loads(server: FileServer, full: dict, tmp_path: Path) -> None:
    src = serve(server, full)
    calls: list[tuple[int, int | None]] = []
    data_dir = tmp_path / "cache" / "cnncli"  # created on demand
    try:
        folder = data.ensure_cifar10(data_dir, src["url"], lambda d, t: calls.append((d, t)),
                                     md5=src["md5"], size=src["size"], **FAST)
        assert folder == data_dir / FOLDER
        assert leftovers(data_dir) == []  # no archive, .part, lock or temp folder left
        assert calls[-1] == (src["size"], src["size"])
        assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))
        assert {t for _, t in calls} == {src["size"]}
        d = data.load_cifar10(folder)
        for i in range(5):
            x, y = full_batch(i)
            assert np.array_equal(d.train_x[i * 10000 : (i + 1) * 10000].reshape(10000, 3072), x)
            assert d.train_y[i * 10000 : (i + 1) * 10000].tolist() == y
        x, y = full_batch(5)
        assert np.array_equal(d.test_x.reshape(10000, 3072), x) and d.test_y.tolist() == y
        assert d.classes == tuple(n.decode() for n in full["names"])
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_second_run_touches_no_network(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    first = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    assert len(server.gets()) == 1
    calls: list[object] = []
    second = data.ensure_cifar10(tmp_path, src["url"], lambda *a: calls.append(a), md5=src["md5"],
                                 size=src["size"], **FAST)
    assert second == first == tmp_path / FOLDER
    assert len(server.gets()) == 1 and calls == []
    assert_tiny_extracted(second, tiny)


def test_checksum_mismatch_deletes_download(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    with pytest.raises(DataError, match="md5") as e:
        data.ensure_cifar10(tmp_path, src["url"], md5="0" * 32, size=src["size"], **FAST)
    assert src["url"] in str(e.value) and tiny["md5"] in str(e.value)
    assert not (tmp_path / FOLDER).exists()
    assert leftovers(tmp_path) == []
    assert len(server.gets()) == 1


def test_wrong_size_announced_is_refused(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    with pytest.raises(DataError, match=f"{src['size']:,} bytes, expected {src['size'] + 1:,}") as e:
        data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"] + 1, **FAST)
    assert src["url"] in str(e.value)
    assert leftovers(tmp_path) == [] and not (tmp_path / FOLDER).exists()


def test_dropped_connection_resumes_with_range(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    server.drop_first = 1
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    gets = server.gets()
    half = src["size"] // 2
    assert [g["status"] for g in gets] == [200, 206]
    assert gets[0]["range"] is None and gets[0]["sent"] == half
    assert gets[1]["range"] == f"bytes={half}-" and gets[1]["sent"] == src["size"] - half
    assert_tiny_extracted(folder, tiny)
    assert leftovers(tmp_path) == []


def test_partial_file_from_earlier_run_is_resumed(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    third = src["size"] // 3
    (tmp_path / PART).write_bytes(tiny["archive"][:third])
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    gets = server.gets()
    assert len(gets) == 1 and gets[0]["range"] == f"bytes={third}-" and gets[0]["status"] == 206
    assert gets[0]["sent"] == src["size"] - third
    assert_tiny_extracted(folder, tiny)


def test_server_ignoring_range_restarts(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    server.ignore_range = True
    (tmp_path / PART).write_bytes(b"junk" * 1000)  # would spoil the file if appended to
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    gets = server.gets()
    assert len(gets) == 1 and gets[0]["range"] == "bytes=4000-" and gets[0]["status"] == 200
    assert_tiny_extracted(folder, tiny)


def test_complete_partial_with_unknown_size(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    """A finished .part (e.g. killed during extraction) and size=None: the server answers 416."""
    src = serve(server, tiny)
    (tmp_path / PART).write_bytes(tiny["archive"])
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=None, **FAST)
    assert [g["status"] for g in server.gets()] == [416]
    assert_tiny_extracted(folder, tiny)


def test_ctrl_c_leaves_resumable_part(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)

    def interrupt(done: int, total: int | None) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.ensure_cifar10(tmp_path, src["url"], interrupt, md5=src["md5"], size=src["size"], **FAST)
    assert leftovers(tmp_path) == [PART] and not (tmp_path / FOLDER).exists()
    kept = (tmp_path / PART).read_bytes()
    assert 0 < len(kept) < src["size"] and tiny["archive"].startswith(kept)
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    assert server.gets()[-1]["range"] == f"bytes={len(kept)}-"
    assert_tiny_extracted(folder, tiny)
    assert leftovers(tmp_path) == []


def test_crash_during_extraction_leaves_no_half_folder(
    server: FileServer, tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = serve(server, tiny)
    original = tarfile.TarFile.extractall

    def crash_after_three(self: tarfile.TarFile, path: object = ".", members: object = None, **kw: object):
        original(self, path, members=self.getmembers()[:3], **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    monkeypatch.undo()
    assert not (tmp_path / FOLDER).exists() and data.find_extracted(tmp_path) is None
    assert leftovers(tmp_path) == [PART]  # verified download kept, temp folder removed
    assert (tmp_path / PART).read_bytes() == tiny["archive"]
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    assert len(server.gets()) == 1  # the complete .part is verified and extracted without a new request
    assert_tiny_extracted(folder, tiny)


def test_stale_temp_folder_is_cleaned(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    stale = tmp_path / f".{FOLDER}.extract-killed"
    (stale / FOLDER).mkdir(parents=True)
    (stale / FOLDER / "data_batch_1").write_bytes(b"half")
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    assert_tiny_extracted(folder, tiny)
    assert leftovers(tmp_path) == []


def test_server_error_retried_then_fails(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    server.fail_first = 100
    with pytest.raises(DataError) as e:
        data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], retries=2, **FAST)
    msg = str(e.value)
    assert "HTTP 500" in msg and src["url"] in msg and "--data-dir" in msg and "CNNCLI_CIFAR10_URL" in msg
    assert "\n" not in msg
    assert len(server.gets()) == 3
    assert leftovers(tmp_path) == [] and not (tmp_path / FOLDER).exists()


def test_server_error_once_then_success(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    server.fail_first = 1
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    assert [g["status"] for g in server.gets()] == [500, 200]
    assert_tiny_extracted(folder, tiny)


def test_retry_backoff_is_applied(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = serve(server, tiny)
    server.fail_first = 2
    t0 = time.monotonic()
    data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], backoff=0.2, retries=3)
    assert time.monotonic() - t0 >= 0.2 + 0.4  # waits 0.2 s, then 0.4 s


def test_not_found_is_not_retried(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    serve(server, tiny)
    url = server.url("nothing-here.tar.gz")
    with pytest.raises(DataError, match="HTTP 404") as e:
        data.ensure_cifar10(tmp_path, url, md5=tiny["md5"], size=tiny["size"], **FAST)
    assert url in str(e.value)
    assert len(server.gets()) == 1


def test_no_server_one_line_with_ways_out(tmp_path: Path) -> None:
    url = closed_port_url()
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        data.ensure_cifar10(tmp_path, url)  # default back-off: a refused connection is not retried
    assert time.monotonic() - t0 < 1.0
    msg = str(e.value)
    assert "\n" not in msg
    assert url in msg and "refused" in msg
    assert "--data-dir" in msg and FOLDER in msg and "CNNCLI_CIFAR10_URL" in msg
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_downloads_share_one(server: FileServer, tiny: dict, tmp_path: Path, how: str) -> None:
    src = serve(server, tiny)
    server.delay = 0.02  # ~30 pieces: the download takes ~0.6 s, so the two runs overlap
    data_dir = tmp_path / "data"
    results: list[object] = []
    if how == "threads":
        barrier = threading.Barrier(2)

        def run() -> None:
            barrier.wait()
            try:
                results.append(data.ensure_cifar10(data_dir, src["url"], md5=src["md5"], size=src["size"],
                                                   **FAST))
            except Exception as e:  # reported below
                results.append(e)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    else:
        code = (
            "import sys; from pathlib import Path; from cnncli.data import ensure_cifar10; "
            "print(ensure_cifar10(Path(sys.argv[1]), sys.argv[2], md5=sys.argv[3], size=int(sys.argv[4]), "
            "backoff=0.01))"
        )
        args = [sys.executable, "-c", code, str(data_dir), src["url"], src["md5"], str(src["size"])]
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(Path(out.strip()))
    assert results == [data_dir / FOLDER] * 2
    assert len(server.gets()) == 1  # the second run waited for the lock, then found the data
    assert_tiny_extracted(data_dir / FOLDER, tiny)
    assert leftovers(data_dir) == []


def test_data_dir_named_like_the_folder(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    """--data-dir .../cifar-10-batches-py that does not exist yet: the data lands exactly there."""
    src = serve(server, tiny)
    target = tmp_path / FOLDER
    folder = data.ensure_cifar10(target, src["url"], md5=src["md5"], size=src["size"], **FAST)
    assert folder == target
    assert_tiny_extracted(target, tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER]


def _member(name: str, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member(f"{FOLDER}/../../escaped.txt", size=3),
        _member(f"{FOLDER}/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        _member(f"{FOLDER}/link", type=tarfile.SYMTYPE, linkname="../../escaped.txt"),
        _member(f"{FOLDER}/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
    ],
    ids=["dotdot", "abs-symlink", "rel-symlink-out", "device"],
)
def test_unsafe_archive_is_refused(
    server: FileServer, tiny: dict, tmp_path: Path, member: tarfile.TarInfo
) -> None:
    archive = make_archive(tiny["files"], extra=[member])
    server.files["evil.tar.gz"] = archive
    data_dir = tmp_path / "a" / "b"
    with pytest.raises(DataError, match="cannot extract"):
        data.ensure_cifar10(data_dir, server.url("evil.tar.gz"), md5=hashlib.md5(archive).hexdigest(),
                            size=len(archive), **FAST)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a" / "escaped.txt").exists()
    assert not (data_dir / FOLDER).exists()
    assert [p for p in data_dir.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_archive_without_the_folder(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    archive = make_archive(tiny["files"], top="something-else")
    server.files["other.tar.gz"] = archive
    with pytest.raises(DataError, match=f"does not contain a complete {FOLDER}"):
        data.ensure_cifar10(tmp_path, server.url("other.tar.gz"), md5=hashlib.md5(archive).hexdigest(),
                            size=len(archive), **FAST)
    assert not (tmp_path / FOLDER).exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unwritable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    target = tmp_path / "a-file" / "data"  # cannot be created, even by root
    with pytest.raises(DataError, match=f"cannot write to the data folder {target}") as e:
        data.ensure_cifar10(target, closed_port_url())
    assert "--data-dir" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_download_without_network(tmp_path: Path) -> None:
    url = closed_port_url()
    result = CliRunner().invoke(app, ["download", "--data-dir", str(tmp_path)],
                                env={"CNNCLI_CIFAR10_URL": url, "CNNCLI_DATA": None})
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert url in lines[0] and "--data-dir" in lines[0] and "CNNCLI_CIFAR10_URL" in lines[0]
    assert "Traceback" not in result.output


def test_cli_download_with_data_present(tmp_path: Path) -> None:
    folder = tmp_path / FOLDER
    folder.mkdir()
    for name in FILES:
        (folder / name).write_bytes(b"")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["download", "--data-dir", str(tmp_path)],
                                env={"CNNCLI_CIFAR10_URL": closed_port_url(), "CNNCLI_DATA": None})
    assert result.exit_code == 0, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------- trickling servers


def _trickling(server: FileServer, tiny: dict) -> dict:
    """The server sends the first 5,000 bytes at once, then one byte every 20 ms (50 bytes/s)."""
    src = serve(server, tiny)
    server.trickle, server.trickle_after = 0.02, 5000
    return src


def _assert_resumes_after_limit(server: FileServer, tiny: dict, src: dict, tmp_path: Path) -> None:
    """After a limit stopped the download: the .part holds a prefix of the archive and the next run resumes it."""
    assert leftovers(tmp_path) == [PART] and not (tmp_path / FOLDER).exists()
    kept = (tmp_path / PART).read_bytes()
    assert 5000 <= len(kept) < src["size"] and tiny["archive"].startswith(kept)
    server.trickle = 0.0
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], **FAST)
    assert server.gets()[-1]["range"] == f"bytes={len(kept)}-" and server.gets()[-1]["status"] == 206
    assert_tiny_extracted(folder, tiny)
    assert leftovers(tmp_path) == []


def test_trickle_stopped_by_the_deadline_then_resumed(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = _trickling(server, tiny)
    limits = Limits(deadline=1.0, min_rate=0.0, rate_window=30.0)  # only the deadline can stop it
    with pytest.raises(DownloadLimitError) as e:
        data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], limits=limits, **FAST)
    msg = str(e.value)
    assert e.value.limit == "deadline"
    assert "deadline of 1 s" in msg and "CNNCLI_DOWNLOAD_DEADLINE" in msg and "minimum rate" not in msg
    assert src["url"] in msg and str(tmp_path / PART) in msg and "resume" in msg and "\n" not in msg
    assert len(server.gets()) == 1  # a limit is not retried
    _assert_resumes_after_limit(server, tiny, src, tmp_path)


def test_trickle_stopped_by_the_minimum_rate_then_resumed(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    src = _trickling(server, tiny)
    limits = Limits(deadline=None, min_rate=2000.0, rate_window=0.5)  # only the rate can stop it
    with pytest.raises(DownloadLimitError) as e:
        data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], limits=limits, **FAST)
    msg = str(e.value)
    assert e.value.limit == "rate"
    assert "minimum rate" in msg and "2,000 bytes/s" in msg and "CNNCLI_DOWNLOAD_MIN_RATE" in msg
    assert "deadline" not in msg and "\n" not in msg
    _assert_resumes_after_limit(server, tiny, src, tmp_path)


def test_fast_download_passes_the_same_limits(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    """The limits of the two tests above do not stop a download that does not trickle."""
    src = serve(server, tiny)
    server.delay = 0.01  # several reads, spread over more than one rate window
    limits = Limits(deadline=30.0, min_rate=2000.0, rate_window=0.02)
    folder = data.ensure_cifar10(tmp_path, src["url"], md5=src["md5"], size=src["size"], limits=limits, **FAST)
    assert_tiny_extracted(folder, tiny)


def test_limits_from_environment() -> None:
    assert limits_from_env({}) == Limits(deadline=7200.0, min_rate=1024.0, rate_window=30.0)
    env = {"CNNCLI_DOWNLOAD_DEADLINE": "0", "CNNCLI_DOWNLOAD_MIN_RATE": "1e4", "CNNCLI_DOWNLOAD_RATE_WINDOW": " 5 "}
    assert limits_from_env(env) == Limits(deadline=None, min_rate=10000.0, rate_window=5.0)
    for name, value in [("CNNCLI_DOWNLOAD_DEADLINE", "soon"), ("CNNCLI_DOWNLOAD_DEADLINE", "-1"),
                        ("CNNCLI_DOWNLOAD_MIN_RATE", "nan"), ("CNNCLI_DOWNLOAD_RATE_WINDOW", "0")]:
        with pytest.raises(ConfigError, match=f"{name}='{value}'"):
            limits_from_env({name: value})


def test_cli_download_trickle_deadline_from_environment(server: FileServer, tiny: dict, tmp_path: Path) -> None:
    """The real `cnn download` in a subprocess (MNIST: its files have no fixed size, so any content is fetched
    until the md5 check): the deadline comes from the environment; one line; the .part is kept."""
    name = "train-images-idx3-ubyte.gz"
    server.files[f"mnist/{name}"] = tiny["archive"]
    server.trickle, server.trickle_after = 0.02, 5000
    exe = Path(sys.executable).parent / "cnn"
    env = {**os.environ, "CNNCLI_MNIST_URL": server.url("mnist/"), "CNNCLI_DOWNLOAD_DEADLINE": "1"}
    env.pop("CNNCLI_DATA", None)
    proc = subprocess.run([str(exe), "download", "--dataset", "mnist", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("MNIST:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "deadline of 1 s" in lines[0] and "CNNCLI_DOWNLOAD_DEADLINE" in lines[0] and name in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [f"{name}.part"]
    kept = (tmp_path / "mnist" / f"{name}.part").read_bytes()
    assert len(kept) >= 5000 and tiny["archive"].startswith(kept)
