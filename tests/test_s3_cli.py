"""Every `vlastore` command on an s3:// store (moto on loopback), with --storage-option or the AWS variables.

The commands run in this process (``main([...])``); usage mistakes exit 2, an unreachable endpoint or a
missing bucket exit 1 with what, where and the fix, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ingest_helpers import bits, make_pt_cache, robot_csvs
from s3_server import MotoS3

pytest.importorskip("botocore", reason="pip install 'vlastore[s3]'")

from vlastore.cli import main  # noqa: E402
from vlastore.demo import make_demo_store  # noqa: E402
from vlastore.storage import ObjectStorage  # noqa: E402
from vlastore.storage.settings import OPTIONS_ENV  # noqa: E402
from vlastore.store import VLAStore  # noqa: E402

EPISODES = {"episode_20251030_025119": 11, "episode_20251030_031502": 8}


def flags(options: dict[str, str]) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage mistakes
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def upload(folder: Path, url: str, options: dict[str, str]) -> None:
    """Copy a local store to ``url`` file by file (what `aws s3 sync` would do)."""
    remote = ObjectStorage(url, options)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            remote.put(path.relative_to(folder).as_posix(), path.read_bytes())


@pytest.fixture(scope="module")
def demo_local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.vla"
    make_demo_store(path, episodes=3, hidden=64, token_hidden=16)
    return path


def test_demo_info_verify_on_s3_with_options(s3_url: str, s3_options: dict[str, str], capsys) -> None:
    code, out, err = run(capsys, "demo", "--out", s3_url, *flags(s3_options))
    assert code == 0, err
    assert "training batch" in out
    code, out, err = run(capsys, "info", s3_url, "--json", *flags(s3_options))
    assert code == 0, err
    info = json.loads(out)
    assert set(info["families"]) == {"qwen_vl", "qwen_vl_tokens"}
    code, out, err = run(capsys, "verify", s3_url, "-q", *flags(s3_options))
    assert code == 0 and "OK: no corruption found" in out, err
    # the options reached no process-wide state that outlives the command
    import os

    assert OPTIONS_ENV not in os.environ
    # a second demo onto the same store: refused (exit 2), nothing replaced
    code, _, err = run(capsys, "demo", "--out", s3_url, *flags(s3_options))
    assert code == 2 and "already holds a vlastore store" in err


def test_aws_environment_variables_are_enough(
    moto_s3: MotoS3, s3_url: str, demo_local: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(demo_local, s3_url, moto_s3.options())
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "info", s3_url)
    assert code == 0, err
    assert "qwen_vl" in out


def test_verify_on_s3_finds_a_corrupt_shard(s3_url: str, s3_options: dict[str, str], demo_local: Path, capsys) -> None:
    upload(demo_local, s3_url, s3_options)
    remote = ObjectStorage(s3_url, s3_options)
    key = next(k for k, _ in remote.list("features/qwen_vl") if "/values/c/" in k)
    data = bytearray(remote.get(key) or b"")
    data[10] ^= 0xFF
    remote.put(key, bytes(data))
    code, out, err = run(capsys, "verify", s3_url, "-q", *flags(s3_options))
    assert code == 1 and "CORRUPT" in out and "Traceback" not in err


def test_ingest_robot_out_and_pt_cache_into_s3(s3_url: str, s3_options: dict[str, str], tmp_path: Path, capsys) -> None:
    tables = robot_csvs(tmp_path / "csv", EPISODES)
    args = [
        "ingest",
        "robot",
        str(tmp_path / "csv"),
        "--out",
        s3_url,
        "--series",
        "state=joint_*,gripper",
        "--series",
        "action=action_*",
        "-q",
        *flags(s3_options),
    ]
    code, _, err = run(capsys, *args, "--verify")
    assert code == 0, err
    store = VLAStore.open(s3_url, storage_options=s3_options)
    for name, table in tables.items():
        assert np.array_equal(store.series("state", name), table[:, :4].astype(np.float32))
    code, _, err = run(capsys, *args)  # the same again: the store already holds exactly this
    assert code == 0, err
    values = make_pt_cache(tmp_path / "cache", {name: -(-steps // 3) for name, steps in EPISODES.items()})
    code, _, err = run(
        capsys, "ingest", "pt-cache", str(tmp_path / "cache"), "--into", s3_url, "--verify", "-q", *flags(s3_options)
    )
    assert code == 0, err
    store = VLAStore.open(s3_url, storage_options=s3_options)
    reader = store.reader("vl_features")
    for (name, vlm_idx), value in values.items():
        assert np.array_equal(reader.row(store.row("vl_features", name, vlm_idx)), bits(value).reshape(-1))


def test_usage_mistakes_exit_2(s3_url: str, capsys) -> None:
    for bad in (
        ["--storage-option", "endpoint"],
        ["--storage-option", "=x"],
        ["--storage-option", "colour=red"],
        ["--storage-option", "max_retries=-1"],
        ["--storage-option", "cache_max_bytes=lots"],
    ):
        for command in (
            ["info", s3_url],
            ["verify", s3_url],
            ["ingest", "robot", "x", "--out", s3_url],
            ["build-features", s3_url, "--data-root", "x"],
            ["demo", "--out", s3_url],
        ):
            code, _, err = run(capsys, *command, *bad)
            assert code == 2, (command, bad, err)
            assert "Traceback" not in err and err.strip()


def test_unreachable_endpoint_and_missing_bucket_exit_1(s3_url: str, s3_options: dict[str, str], capsys) -> None:
    dead = {**s3_options, "endpoint": "http://127.0.0.1:9", "max_retries": "1", "retry_backoff_s": "0.01"}
    for command in (["info", s3_url], ["verify", s3_url, "-q"]):
        code, _, err = run(capsys, *command, *flags(dead))
        assert code == 1, err
        assert "http://127.0.0.1:9" in err and "check the endpoint" in err and "Traceback" not in err
    missing = s3_url.replace("s3://vlastore-test/", "s3://no-such-bucket-here/")
    for command in (["info", missing], ["verify", missing, "-q"]):
        code, _, err = run(capsys, *command, *flags(s3_options))
        assert code == 1, err
        assert "no-such-bucket-here" in err and "does not exist" in err and "create it" in err
    code, _, err = run(capsys, "info", s3_url, *flags(s3_options))  # nothing there: a usage mistake
    assert code == 2 and "Traceback" not in err


def test_build_features_on_s3(s3_url: str, s3_options: dict[str, str], tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers", reason="pip install vlastore[transformers]")
    from vlastore.features.tiny import make_tiny_episodes, make_tiny_qwen2vl  # noqa: PLC0415 - heavy imports

    model = make_tiny_qwen2vl(tmp_path / "model")
    store_path, data = make_tiny_episodes(tmp_path / "store.vla", tmp_path / "data", episodes=2)
    upload(store_path, s3_url, s3_options)
    common = [
        "--data-root",
        str(data),
        "--model",
        str(model),
        "--rows-per-shard",
        "2",
        "-q",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    code, _, err = run(capsys, "build-features", s3_url, *common, *flags(s3_options))
    assert code == 0, err
    code, out, err = run(capsys, "verify", s3_url, "-q", *flags(s3_options))
    assert code == 0 and "OK" in out, err
    store = VLAStore.open(s3_url, storage_options=s3_options)
    assert store.coverage("qwen_vl").all()
    assert store.generation("qwen_vl").producer.model == str(model)


def test_a_living_store_on_s3_appends_removes_reopens_snapshots_and_collects(
    s3_url: str, s3_options: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11 on object storage: the format-2 operations through conditional puts, not local links."""
    from vlastore.family import FamilySpec
    from vlastore.store import EpisodeData, SnapshotNotFoundError

    def episode(i: int, steps: int) -> EpisodeData:
        return EpisodeData(f"e{i}", {"state": np.arange(steps * 3, dtype=np.float32).reshape(steps, 3) + 100 * i})

    def fill(store: VLAStore) -> int:
        writer = store.writer("f")
        rows = writer.pending_rows()
        for row in rows.tolist():
            writer.write_rows([row], np.full((1, 4), row, np.float32))
        writer.close()
        return len(rows)

    VLAStore.create(s3_url, [episode(0, 4), episode(1, 3)], format_version=2, storage_options=s3_options)
    store = VLAStore.open(s3_url, writable=True, storage_options=s3_options)
    store.add_family("f", FamilySpec((4,), "float32", vlm_reuse_count=2, rows_per_shard=2))
    assert fill(store) == 4
    store.add_episodes([episode(2, 5)])
    assert fill(store) == 3  # only the new episode's rows: ceil(5 / 2)
    store.remove_episodes(["e0"])
    head = VLAStore.open(s3_url, storage_options=s3_options)
    assert head.datasets == ("e1", "e2") and head.coverage("f").all()
    np.testing.assert_array_equal(head.series("state", "e2"), episode(2, 5).series["state"])
    first = VLAStore.open(s3_url, snapshot=1, storage_options=s3_options)
    assert first.datasets == ("e0", "e1")
    np.testing.assert_array_equal(first.series("state", "e0"), episode(0, 4).series["state"])
    assert [entry["changes"][0].split()[0] for entry in head.log()][-2:] == ["append", "remove"]
    store.gc(retention_s=0, compact=True)
    with pytest.raises(SnapshotNotFoundError):
        VLAStore.open(s3_url, snapshot=1, storage_options=s3_options)
    after = VLAStore.open(s3_url, storage_options=s3_options)
    assert after.datasets == ("e1", "e2") and after.coverage("f").all()
    np.testing.assert_array_equal(after.series("state", "e1"), episode(1, 3).series["state"])
    code, _, err = run(capsys, "verify", "-q", s3_url, *flags(s3_options))
    assert code == 0, err
