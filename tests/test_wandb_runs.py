"""Every reproduce job is its own W&B run, even when one worker process runs several jobs: each
run's offline record file, decoded with wandb's own protobuf records, holds one run with its own
name, the invocation's group, its job type, and only its own steps."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from asrbench.reproduce import Job, Runner

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = {"train-clean-100": (2, 1, 6), "dev-clean": (1, 1, 2), "test-clean": (1, 1, 2)}


def wandb_records(path: Path) -> list:
    """The records of an offline run file (``run-<id>.wandb``): wandb's log format, a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1:
    full / first / middle / last), each record a serialized ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pieces, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


@pytest.mark.slow
def test_several_jobs_in_one_worker_process_are_separate_wandb_runs(tmp_path, make_librispeech_tree, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    corpus = make_librispeech_tree(tmp_path / "corpus", SUBSETS, nested=False)
    common = ["data=librispeech", f"data.root={corpus}", "data.train_subsets=[train-clean-100]",
              "data.dev_subsets=[dev-clean]", "data.test_subsets=[test-clean]", "model=lstm_tiny",
              "logger=wandb", "experiment=reproduce-t", "trainer.enable_progress_bar=false", "cluster=simulated",
              "batch_size=2", "trainer.max_epochs=1"]
    jobs = [Job("single", [*common, "strategy=single", "nodes=1", "logger.job_type=baseline"], tmp_path / "a"),
            Job("gtc", [*common, "strategy=gtc", "nodes=2", "logger.job_type=grid"], tmp_path / "b"),
            Job("bmuf", [*common, "strategy=bmuf", "nodes=2", "strategy.block_size=1", "logger.job_type=grid"],
                tmp_path / "c")]
    done = Runner(ROOT / "conf", parallel=1).run(jobs)  # one worker process takes all three
    names = {"single": "single-n1-s0", "gtc": "gtc-n2-s0", "bmuf": "bmuf-n2-s0"}
    seen_ids = set()
    for job in jobs:
        (run_file,) = list((job.path / "wandb").glob("offline-run-*/run-*.wandb"))
        records = wandb_records(run_file)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert {r.display_name for r in runs} == {names[job.name]}
        assert {r.run_group for r in runs} == {"reproduce-t"}
        assert {r.job_type for r in runs} == {"baseline" if job.name == "single" else "grid"}
        seen_ids |= {r.run_id for r in runs}
        steps = [int(float(i.value_json)) for r in records if r.WhichOneof("record_type") == "history"
                 for i in r.history.item if (i.key or "/".join(i.nested_key)) == "trainer/global_step"]
        logged = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
                  for i in r.history.item}
        # the run holds its own training only: no step past its own, no other strategy's final keys
        assert not steps or max(steps) <= done[job.name]["steps"]
        assert "final/wer" in logged and ("final/bmuf_blocks" in logged) == (job.name == "bmuf")
        assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished when its training ended
    assert len(seen_ids) == 3
