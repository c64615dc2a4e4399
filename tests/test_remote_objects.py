"""ObjectStorage against a real S3 server (moto on loopback), through a fault-injecting proxy where it matters."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_contract import StorageContract

if TYPE_CHECKING:
    from s3_server import FaultProxy, MotoS3

pytest.importorskip("botocore", reason="pip install 'vlastore[s3]'")

from vlastore.storage import ObjectStorage, StorageError  # noqa: E402
from vlastore.storage.base import AlreadyExistsError, coalesce_ranges  # noqa: E402
from vlastore.storage.settings import S3Settings, parse_s3_url  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_children(script: str, args: list[list[str]], timeout: float = 120) -> list[str]:
    """Start one Python process per argument list at once; return their stdout (each must exit 0)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *a],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        outs.append(out)
    return outs


class TestObjectStorageContract(StorageContract):
    @pytest.fixture
    def storage(self, s3_url: str, s3_options: dict[str, str]) -> ObjectStorage:
        return ObjectStorage(s3_url, s3_options)


# ------------------------------------------------------------------ settings


def test_url_parsing() -> None:
    assert parse_s3_url("s3://my-bucket/team/store.vla/") == ("my-bucket", "team/store.vla")
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    for bad in ["my-bucket/x", "s3://b/x", "s3://Upper/x", "s3://bucket/../x", "gs://bucket/x"]:
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_settings_from_environment_and_options() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:10",
        "AWS_ACCESS_KEY_ID": "env-key",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "tok",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    s = S3Settings.resolve({}, env)
    assert (s.endpoint, s.access_key_id, s.session_token, s.region) == (
        "http://127.0.0.1:10",
        "env-key",
        "tok",
        "eu-west-1",
    )
    assert s.addressing_style == "path"  # a custom endpoint: path-style, as MinIO and friends want
    s = S3Settings.resolve(
        {
            "AWS_REGION": "us-west-2",
            "endpoint_url": "https://s3.example.com",
            "max_retries": "2",
            "retry_backoff_s": "0.5",
            "coalesce_gap": "4096",
        },
        env,
    )
    assert (s.region, s.endpoint, s.max_retries, s.retry_backoff_s, s.coalesce_gap) == (
        "us-west-2",
        "https://s3.example.com",
        2,
        0.5,
        4096,
    )
    assert S3Settings.resolve({}, {"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "x"}).region == "ap-south-1"
    assert S3Settings.resolve({}, {}).endpoint is None and S3Settings.resolve({}, {}).addressing_style == "auto"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"endpiont": "http://x"}, "unknown storage option 'endpiont'"),
        ({"max_retries": "many"}, "must be a int"),
        ({"max_retries": "-1"}, "at least 0"),
        ({"anonymous": "perhaps"}, "true or false"),
        ({"endpoint": "http://127.0.0.1:9", "allow_http": "false"}, "plain HTTP"),
        ({"endpoint": "127.0.0.1:9"}, "http(s)://host"),
        ({"access_key_id": "k"}, "both access_key_id and secret_access_key"),
        ({"addressing_style": "sideways"}, "path, virtual or auto"),
    ],
)
def test_bad_options_say_what(options: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        S3Settings.resolve(options, {})


def test_credentials_from_environment(moto_s3: MotoS3, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    storage = ObjectStorage(s3_url)
    storage.put("k", b"via env")
    assert storage.get("k") == b"via env"


def test_wrong_credentials_are_not_retried(moto_s3: MotoS3, s3_proxy: FaultProxy, s3_url: str) -> None:
    moto_s3_auth = pytest.importorskip("moto.s3")  # moto checks signatures only with auth enabled; use a bad bucket
    del moto_s3_auth
    storage = ObjectStorage(
        "s3://no-such-bucket-here/x", {**moto_s3.options(s3_proxy.endpoint), "retry_backoff_s": "0.01"}
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.put("k", b"1")
    assert len(s3_proxy.requests("PUT")) == 1  # a 404 is final: one request


def test_pickles_without_connections(s3_url: str, s3_options: dict[str, str]) -> None:
    storage = ObjectStorage(s3_url, s3_options)
    storage.put("k", b"1")
    again = pickle.loads(pickle.dumps(storage))
    assert again.location == storage.location and again.get("k") == b"1"


# ------------------------------------------------------------ ranged reads


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=20), st.integers(0, 16))
def test_coalesce_ranges_covers_every_range_once(spans: list[tuple[int, int]], gap: int) -> None:
    ranges = [(a, a + n) for a, n in spans]
    runs = coalesce_ranges(ranges, gap)
    members = sorted(i for _, _, m in runs for i in m)
    assert members == [i for i, (a, b) in enumerate(ranges) if b > a]
    for start, end, m in runs:
        assert all(start <= ranges[i][0] and ranges[i][1] <= end for i in m)
    for (_, end, _), (start, _, _) in zip(runs, runs[1:]):
        assert start > end + gap  # runs that could merge did


def test_get_ranges_one_request_per_run(s3_proxy: FaultProxy, proxy_options: dict[str, str], s3_url: str) -> None:
    storage = ObjectStorage(s3_url, proxy_options)
    data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    storage.put("shard", data)
    rows = [(i * 1000, (i + 1) * 1000) for i in range(10)]  # ten adjacent rows
    far = [(50_000, 51_000), (51_000, 52_500), (90_000, 90_100)]  # two more runs
    s3_proxy.reset()
    assert storage.get_ranges("shard", rows) == [data[a:b] for a, b in rows]
    assert len(s3_proxy.requests("GET")) == 1
    s3_proxy.reset()
    assert storage.get_ranges("shard", [*far, *rows[::-1]]) == [data[a:b] for a, b in [*far, *rows[::-1]]]
    assert sorted(r.range for r in s3_proxy.requests("GET")) == [
        "bytes=0-9999",
        "bytes=50000-52499",
        "bytes=90000-90099",
    ]


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize(
    ("fault", "read"),
    [
        ("500", "get"),
        ("reset_before", "get_range"),
        ("reset_after", "get_ranges"),
        ("short", "get"),
        ("short", "get_range"),
        ("short", "download"),
        ("lie", "get"),
        ("lie", "get_ranges"),
        ("lie", "download"),
    ],
)
def test_faulty_reads_are_retried_to_the_right_bytes(
    s3_proxy: FaultProxy, proxy_options: dict[str, str], s3_url: str, fault: str, read: str, tmp_path: Path
) -> None:
    storage = ObjectStorage(s3_url, proxy_options)
    data = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    storage.put("obj", data)
    s3_proxy.reset()
    s3_proxy.inject([fault, fault], method="GET", key_contains="obj")
    if read == "get":
        assert storage.get("obj") == data
    elif read == "get_range":
        assert storage.get_range("obj", 1000, 250_000) == data[1000:250_000]
    elif read == "get_ranges":
        assert storage.get_ranges("obj", [(0, 10), (10, 5000), (200_000, 200_001)]) == [
            data[:10],
            data[10:5000],
            data[200_000:200_001],
        ]
    else:
        with open(tmp_path / "out", "w+b") as out:
            info = storage.download("obj", out)
        assert info.size == len(data) and (tmp_path / "out").read_bytes() == data
    gets = s3_proxy.requests("GET")
    assert [r.fault for r in gets[:2]] == [fault, fault] and gets[-1].fault is None


def test_download_resumes_where_the_connection_broke(
    s3_proxy: FaultProxy, proxy_options: dict[str, str], s3_url: str, tmp_path: Path
) -> None:
    storage = ObjectStorage(s3_url, proxy_options)
    data = np.random.default_rng(2).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    storage.put("big", data)
    s3_proxy.reset()
    s3_proxy.inject(["short"], method="GET", key_contains="big")
    with open(tmp_path / "out", "w+b") as out:
        storage.download("big", out)
    assert (tmp_path / "out").read_bytes() == data
    ranges = [r.range for r in s3_proxy.requests("GET")]
    assert ranges[0] == "bytes=0-"
    assert ranges[1] is not None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"  # resumed mid-way


def test_persistent_faults_give_a_clear_error(s3_proxy: FaultProxy, proxy_options: dict[str, str], s3_url: str) -> None:
    storage = ObjectStorage(s3_url, {**proxy_options, "max_retries": "2"})
    storage.put("obj", b"payload")
    s3_proxy.reset()
    s3_proxy.inject(["lie"] * 3, method="GET")
    with pytest.raises(StorageError, match=r"reading .*/obj failed 3 times.*rerun"):
        storage.get("obj")
    s3_proxy.inject(["500"] * 3, method="PUT")
    with pytest.raises(StorageError, match=r"writing .*/k failed 3 times, last with HTTP 500"):
        storage.put("k", b"1")
    assert storage.get("k") is None


def test_lost_answers_to_conditional_writes(s3_proxy: FaultProxy, proxy_options: dict[str, str], s3_url: str) -> None:
    """The PUT lands but its answer is lost; the retry meets a 412 from our own write, not another writer's."""
    storage = ObjectStorage(s3_url, proxy_options)
    s3_proxy.inject(["reset_after"], method="PUT")
    storage.put_if_absent("shard", b"mine")  # no AlreadyExistsError
    assert storage.get("shard") == b"mine"
    with pytest.raises(AlreadyExistsError):
        storage.put_if_absent("shard", b"again")  # a genuine second writer still fails loudly
    _, version = storage.get_versioned("shard")  # type: ignore[misc]
    s3_proxy.inject(["reset_after"], method="PUT")
    new_version = storage.put_if_version("shard", b"updated", version)
    assert storage.get_versioned("shard") == (b"updated", new_version)


# --------------------------------------------------------- many processes

RACE = """
import os, sys, time
from vlastore.storage import ObjectStorage, AlreadyExistsError
url, endpoint, barrier = sys.argv[1], sys.argv[2], sys.argv[3]
s = ObjectStorage(url, {"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing"})
s.size("warm-up")  # connect before the start line
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.time() + 60
while len(os.listdir(barrier)) < 3 and time.time() < deadline:  # all three at the start line
    time.sleep(0.002)
try:
    s.put_if_absent("shard/0.bin", sys.argv[4].encode())
    print("won")
except AlreadyExistsError:
    print("lost")
"""

COUNTER = """
import sys
from vlastore.storage import ObjectStorage, VersionMismatchError
url, endpoint = sys.argv[1], sys.argv[2]
s = ObjectStorage(url, {"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing"})
conflicts = 0
for _ in range(50):
    while True:
        data, version = s.get_versioned("counter")
        try:
            s.put_if_version("counter", str(int(data) + 1).encode(), version)
            break
        except VersionMismatchError:
            conflicts += 1
print(conflicts)
"""


def test_put_if_absent_from_processes_one_winner(moto_s3: MotoS3, s3_url: str, tmp_path: Path) -> None:
    outs = run_children(RACE, [[s3_url, moto_s3.endpoint, str(tmp_path), f"writer {i}"] for i in range(3)])
    assert sorted(o.strip() for o in outs) == ["lost", "lost", "won"]
    winner = [i for i, o in enumerate(outs) if o.strip() == "won"][0]
    assert ObjectStorage(s3_url, moto_s3.options()).get("shard/0.bin") == f"writer {winner}".encode()


def test_compare_and_swap_counter_from_two_processes(moto_s3: MotoS3, s3_url: str) -> None:
    storage = ObjectStorage(s3_url, moto_s3.options())
    storage.put("counter", b"0")
    run_children(COUNTER, [[s3_url, moto_s3.endpoint]] * 2, timeout=240)
    assert storage.get("counter") == b"100"


def test_works_in_a_forked_child_after_the_parent_used_it(s3_url: str, s3_options: dict[str, str]) -> None:
    """DataLoader workers are forked; obstore hangs there, this must not."""
    import zarr

    storage = ObjectStorage(s3_url, s3_options)
    storage.put("k", b"parent")
    assert storage.get_ranges("k", [(0, 2), (4, 6)]) == [b"pa", b"nt"]  # starts the parent's thread pool too
    zarr.create_array(store=storage.zarr_store(), name="arr", shape=(4,), dtype="int16")[:] = [1, 2, 3, 4]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            signal_alarm = __import__("signal")
            signal_alarm.alarm(30)
            ok = storage.get("k") == b"parent" and storage.get_ranges("k", [(0, 2), (4, 6)]) == [b"pa", b"nt"]
            ok = ok and zarr.open_array(store=storage.zarr_store(), path="arr", mode="r")[:].tolist() == [1, 2, 3, 4]
            storage.put("child", b"child")
            os.write(write, b"ok" if ok else b"wrong")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 10) == b"ok" and status == 0
    assert storage.get("child") == b"child"


def test_listing_skips_names_that_are_not_keys(s3_url: str, s3_options: dict[str, str]) -> None:
    storage = ObjectStorage(s3_url, s3_options)
    storage.put("good/a", b"1")
    for odd in ("good//b", "good/../c", "good/./d"):  # another tool can upload any name
        storage._client.put_object(Bucket=storage.bucket, Key=storage._root + odd, Body=b"x")
    assert sorted(storage.list("good")) == [("good/a", 1)]
    storage.delete_prefix("good")  # deletion still reaches every object under the prefix
    assert storage._client.list_objects_v2(Bucket=storage.bucket, Prefix=storage._root).get("KeyCount") == 0
