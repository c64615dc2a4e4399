"""docs/FORMAT.md must describe what the code writes: its examples are checked against real stores."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from crc32c import crc32c

from vlastore.format import check_seal

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "FORMAT.md").read_text()
GOLDEN = ROOT / "tests" / "data" / "golden-v1.vla"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _json_blocks() -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", DOC, flags=re.S)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden store written again by today's code."""
    spec = importlib.util.spec_from_file_location("make_golden_store", ROOT / "tools" / "make_golden_store.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("doc") / "golden-v1.vla"
    module.make_golden_store(out)
    return out


def _without_created(data: dict) -> dict:
    # created, version and the checksum over them differ from run to run; the checksum is checked on its own
    return {k: v for k, v in data.items() if k not in ("created", "vlastore_version", "checksum")}


def test_listed_files_are_the_golden_store_and_what_the_code_writes(fresh: Path) -> None:
    block = re.search(r"<!-- golden-files -->\n```text\n(.*?)```", DOC, flags=re.S)
    assert block is not None
    listed = block.group(1).split()
    assert listed == _files(GOLDEN)
    assert listed == _files(fresh)


def test_json_examples_match_real_metadata(fresh: Path) -> None:
    manifest, values_meta, generation = _json_blocks()
    for root in (GOLDEN, fresh):
        real_manifest = json.loads((root / "zarr.json").read_text())["attributes"]["vlastore"]
        assert _without_created(manifest) == _without_created(real_manifest)
        real_values = json.loads((root / "features/geom/gen-0001/values/zarr.json").read_text())
        assert values_meta == real_values
        real_generation = json.loads((root / "features/vlm/gen-0002/zarr.json").read_text())["attributes"]
        assert _without_created(generation) == _without_created(real_generation["vlastore_generation"])


def test_checksums_are_computed_as_documented(fresh: Path) -> None:
    """The documented examples carry the checksum the documented rule gives; today's stores carry one; the
    golden store (written before checksums) has none and is still read."""
    manifest, _, generation = _json_blocks()
    for example in (manifest, generation):
        body = {k: v for k, v in example.items() if k != "checksum"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        assert example["checksum"] == f"crc32c:{crc32c(canonical):08x}"
        assert check_seal(example, "doc")
    real_manifest = json.loads((fresh / "zarr.json").read_text())["attributes"]["vlastore"]
    real_generation = json.loads((fresh / "features/vlm/gen-0002/zarr.json").read_text())["attributes"]
    assert check_seal(real_manifest, "fresh") and check_seal(real_generation["vlastore_generation"], "fresh")
    golden_manifest = json.loads((GOLDEN / "zarr.json").read_text())["attributes"]["vlastore"]
    assert "checksum" not in golden_manifest and not check_seal(golden_manifest, "golden")


def test_example_shard_size() -> None:
    assert (GOLDEN / "features/vlm/gen-0002/values/c/1/0").stat().st_size == 3 * 36 + 4 * 16 + 4 == 176
    assert "176\nbytes" in DOC or "176 bytes" in DOC.replace("\n", " ")
