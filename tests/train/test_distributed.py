"""Whole runs in subprocesses: `python -m cheers.train.cli` (one process) and `torchrun --nproc-per-node 2` (gloo).

* DDP and FSDP2 with 2 processes x micro-batch 1 reproduce one process x micro-batch 2 on the same global batches:
  losses within 1e-5 relative, gradient norms within 1e-4 relative (float32 on CPU; the differences come from
  different reduction orders / thread counts, measured around 1e-7 and 1e-6).
* A run killed with SIGKILL resumes exactly: single process bit-identical to an uninterrupted run (the kill lands
  while a checkpoint is staged but not committed, so the previous checkpoint must survive the crash); DDP killed
  after the log shows a committed checkpoint, resumed losses within 1e-6 relative of the uninterrupted DDP run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

STEPS = 4
EMA = ("ema.decay=0.5", "ema.start=1")  # an average of the weights that differs from the last ones in 4 steps
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    from cheers.shapes.smoke import make_dataset, make_tokenizer

    root = tmp_path_factory.mktemp("dist")
    files = make_dataset(root / "data", n_understanding=4, n_generation=4, n_edit=2, n_text=2)
    make_tokenizer(root / "tok")
    cfg = {
        "stage": "dist-test", "steps": STEPS, "micro_batch_size": 2,
        "model": {"preset": "cheers-tiny", "tokenizer": str(root / "tok")},
        "schedule": {"warmup": 0}, "log": {"interval": 1, "progress": False},
        "ckpt": {"interval": 2, "keep": 0, "export_final": False},
        "data": {"sources": [{"path": str(files[k]), "weight": w}
                             for k, w in (("understanding", 3), ("generation", 6), ("text", 1), ("edit", 1))]},
    }
    import yaml

    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _cmd(root: Path, out: Path, nproc: int, *overrides: str) -> list[str]:
    args = [str(root / "cfg.yaml"), f"output_dir={out}", *overrides]
    if nproc == 1:
        # one thread, like each torchrun worker: on a shared 2-core machine two spinning OpenMP threads per
        # process are much slower than one
        return [sys.executable, "-m", "cheers.train.cli", *args, "threads=1"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "cheers.train.cli", *args]


def _run(cmd: list[str], timeout: float = 300) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


def _records(out: Path) -> list[dict]:
    p = out / "log.jsonl"
    if not p.exists():
        return []
    recs = []
    for line in p.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed writer
            pass
    return recs


def _steps(out: Path) -> dict[int, dict]:
    """Step records by step number; a resumed run's records replace the killed run's."""
    return {r["step"]: r for r in _records(out) if r["event"] == "step"}


def _launch_and_kill(cmd: list[str], out: Path, event: str, step: int, timeout: float = 240) -> None:
    """Start a run in its own session, wait until the log shows `event` for `step`, SIGKILL the whole group."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if any(r["event"] == event and r.get("step") == step for r in _records(out)):
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc {proc.returncode}) before '{event}' at step {step}:\n{proc.stdout.read()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timeout waiting for '{event}' at step {step}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        # torchrun starts its workers in sessions of their own: killing the launcher's group orphans them, and
        # they would go on training into `out` beside the resumed run. Kill them too, as a crash would.
        _kill_runs_writing_to(out)
    assert proc.returncode == -signal.SIGKILL


def _kill_runs_writing_to(out: Path) -> None:
    mark = f"output_dir={out}".encode()
    victims = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
                    victims.append(entry)
            except OSError:
                pass  # gone already
    deadline = time.monotonic() + 30
    while any(_alive(v) for v in victims) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(entry: Path) -> bool:
    """The process of /proc/<pid> still runs (a zombie has finished: pid 1 of a container may never reap it)."""
    try:
        return b"(zombie)" not in (entry / "status").read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="module")
def reference(setup_dir):
    out = setup_dir / "ref"
    _run(_cmd(setup_dir, out, 1))
    return _steps(out)


@pytest.fixture(scope="module")
def ddp_run(setup_dir):
    out = setup_dir / "ddp"
    _run(_cmd(setup_dir, out, 2, "micro_batch_size=1", "distributed.strategy=ddp"))
    return _steps(out)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _compare(got: dict[int, dict], want: dict[int, dict], steps, loss_rtol: float, norm_rtol: float) -> dict:
    worst = {"loss": 0.0, "grad_norm": 0.0}
    for s in steps:
        for key in ("loss", "ce_loss", "flow_loss"):
            err = _rel(got[s][key], want[s][key])
            worst["loss"] = max(worst["loss"], err)
            assert err < loss_rtol, (s, key, got[s][key], want[s][key])
        err = _rel(got[s]["grad_norm"], want[s]["grad_norm"])
        worst["grad_norm"] = max(worst["grad_norm"], err)
        assert err < norm_rtol, (s, "grad_norm", got[s]["grad_norm"], want[s]["grad_norm"])
        assert got[s]["samples"] == want[s]["samples"]
    return worst


def test_ddp_matches_one_process(reference, ddp_run):
    assert sorted(reference) == list(range(1, STEPS + 1))
    worst = _compare(ddp_run, reference, range(1, STEPS + 1), LOSS_RTOL, NORM_RTOL)
    print("ddp vs 1 process, max relative error:", worst)


def test_fsdp2_matches_one_process_across_a_resume(setup_dir, reference):
    """FSDP2, stopped after 2 steps (checkpoint of sharded model + optimizer) and resumed: every step matches."""
    out = setup_dir / "fsdp2"
    common = ("micro_batch_size=1", "distributed.strategy=fsdp2", "ckpt.interval=1", *EMA)
    _run(_cmd(setup_dir, out, 2, *common, "debug.max_steps_this_run=2"))
    assert (out / "ckpt" / "latest").read_text().strip() == "step_2"
    _run(_cmd(setup_dir, out, 2, *common, "ckpt.export_final=true") + ["--resume"])
    worst = _compare(_steps(out), reference, range(1, STEPS + 1), LOSS_RTOL, NORM_RTOL)
    print("fsdp2 vs 1 process, max relative error:", worst)
    from cheers.checkpoint import load_model

    load_model(out / "export")  # the consolidated export of a sharded model loads as an official directory
    # the average, kept per shard and carried through the sharded checkpoint across the resume, is the average of
    # the weights of steps 1-4 (read back from the sharded checkpoints of every step)
    from cheers.train.ckpt import load_checkpoint_model

    steps = [{k: v for k, v in load_checkpoint_model(out / "ckpt" / f"step_{s}").state_dict().items()
              if v.is_floating_point()} for s in range(1, STEPS + 1)]
    want = steps[0]
    for w in steps[1:]:
        want = {k: 0.5 * want[k] + 0.5 * w[k] for k in want}
    got, plain = load_model(out / "export_ema").state_dict(), load_model(out / "export").state_dict()
    assert max(float((got[k] - plain[k]).abs().max()) for k in got) > 1e-5  # the average is not the last weights
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-7, rtol=1e-6), k


def test_single_process_kill_during_save_then_resume_is_exact(setup_dir, reference):
    out = setup_dir / "kill1"
    cmd = _cmd(setup_dir, out, 1, "debug.ckpt_pause_at_step=4", "debug.ckpt_pause_seconds=120")
    _launch_and_kill(cmd, out, "checkpoint_staged", 4)
    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_2"  # the staged step-4 save never committed
    assert (ckpt / "step_4.tmp").is_dir() and not (ckpt / "step_4").exists()
    _run(_cmd(setup_dir, out, 1) + ["--resume"])
    got = _steps(out)
    for s in range(1, STEPS + 1):
        for key in ("loss", "ce_loss", "flow_loss", "grad_norm"):
            assert got[s][key] == reference[s][key], (s, key)  # bit-identical
    assert not (ckpt / "step_4.tmp").exists() and (ckpt / "latest").read_text().strip() == "step_4"
    resumes = [r for r in _records(out) if r["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 2


def test_ddp_kill_after_checkpoint_then_resume(setup_dir, ddp_run):
    out = setup_dir / "kill_ddp"
    common = ("micro_batch_size=1", "distributed.strategy=ddp")
    _launch_and_kill(_cmd(setup_dir, out, 2, *common, "debug.sleep_per_step=2"), out, "checkpoint", 2)
    assert (out / "ckpt" / "latest").read_text().strip() == "step_2"
    _run(_cmd(setup_dir, out, 2, *common) + ["--resume"])
    got = _steps(out)
    worst = _compare(got, ddp_run, range(3, STEPS + 1), 1e-6, 1e-6)
    print("ddp resumed vs uninterrupted, max relative error:", worst)


def test_fsdp2_loads_an_official_model_shard_by_shard_and_matches_one_process(setup_dir, tmp_path):
    """FSDP2 from `model.init` = an official directory: the model is built on the meta device, sharded, and each
    rank reads only its own shards (the log names the sharded load); the losses equal one process loading the
    directory whole."""
    from cheers.checkpoint import save_model
    from cheers.config import preset
    from cheers.model.cheers import CheersModel
    from cheers.tokenizer import CheersTokenizer

    tok = CheersTokenizer.from_dir(setup_dir / "tok")
    cfg = preset("cheers-tiny")
    cfg.tokens = tok.token_ids
    cfg.text.vocab_size = max(cfg.text.vocab_size, tok.vocab_size)
    torch.manual_seed(3)
    init = tmp_path / "init"
    save_model(CheersModel(cfg.validate()), init, max_shard_bytes=2_000_000)  # several shards + an index
    overrides = (f"model.init={init}", "model.preset=null", "steps=2", "ckpt.interval=0")
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_cmd(setup_dir, one, 1, *overrides))
    _run(_cmd(setup_dir, two, 2, *overrides, "micro_batch_size=1", "distributed.strategy=fsdp2"))
    a, b = _steps(one), _steps(two)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= LOSS_RTOL * abs(a[step]["loss"]), (step, a[step], b[step])
    starts = [r for r in _records(two) if r["event"] in ("start", "run")]
    assert any("sharded load per rank" in json.dumps(r) for r in starts), starts
