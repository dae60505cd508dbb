"""The GPU suite's packing: a run comes back from the device machine as one tarball + summary.md (that machine
returns at most 8 files from $OUT), and ``--import`` unpacks it into the results folder safely."""

import io
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_suite  # noqa: E402


def test_out_env_packs_into_two_files(tmp_path, monkeypatch):
    dest = tmp_path / "OUT"
    monkeypatch.setenv("OUT", str(dest))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "work"))
    monkeypatch.setenv("PLLM_BENCH_RUN_ID", "test-run")
    rc = gpu_suite.main(["--dry-run", "--benches", "none", "--skip", "plots"])
    assert rc == 0
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_suite.tar.gz", "summary.md"]
    with tarfile.open(dest / "gpu_suite.tar.gz") as tar:
        names = tar.getnames()
    tops = {Path(n).parts[0] for n in names}
    assert len(tops) == 1 and tops.pop().startswith("tmp-dryrun-")
    assert any(n.endswith("/summary.md") for n in names) and any(n.endswith("/env.json") for n in names)
    assert any(n.endswith("/logs") for n in names)

    results = tmp_path / "results"
    run_dir = gpu_suite.import_pack(dest / "gpu_suite.tar.gz", results, update_readme=False)
    assert (run_dir / "summary.md").read_text() == (dest / "summary.md").read_text()
    with pytest.raises(FileExistsError, match="tar_path"):
        gpu_suite.import_pack(dest / "gpu_suite.tar.gz", results, update_readme=False)


def test_pack_never_includes_itself(tmp_path):
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "summary.md").write_text("# s\n")
    (out / "logs" / "a.log").write_text("x\n")
    gpu_suite.pack(out, out)  # DIR inside the result folder
    written = gpu_suite.pack(out, out)  # a second pack must not swallow the first tarball
    with tarfile.open(written[0]) as tar:
        assert not any(n.endswith("gpu_suite.tar.gz") for n in tar.getnames())


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_import_refuses_unsafe_members(tmp_path, member):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        data = b"boom"
        ti = tarfile.TarInfo(member)
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(ValueError, match="tar_path"):
        gpu_suite.import_pack(bad, tmp_path / "results", update_readme=False)
    assert not (tmp_path / "evil.txt").exists()
