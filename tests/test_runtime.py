"""The parallel runtime: the draft in its own process, the target here, over torch.distributed (gloo).

Real multi-process tests on tiny models saved to a folder both processes load: the same tokens as
the sequential runtime at T = 0 and the same tokens seed for seed at T > 0; one worker serving many
generations; a worker killed (SIGKILL) or hung (SIGSTOP) mid-generation gives a clear error or, if
asked, an ``ar`` fallback with the exact same output, and never leaves a process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specbranch.config import GenerationConfig, ModelConfig, RuntimeConfig, SamplingConfig, SpeculationConfig
from specbranch.errors import ConfigError, SpecBranchError, WorkerDiedError, WorkerTimeoutError
from specbranch.pipeline import Pipeline
from specbranch.runtime.placement import worker_placements

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux process tools")


@pytest.fixture(scope="module")
def sequential(close_pair):
    return Pipeline(close_pair, progress=False)


@pytest.fixture(scope="module")
def parallel(close_pair):
    with Pipeline(close_pair, progress=False, runtime=RuntimeConfig(runtime="parallel", worker_timeout=20)) as pipe:
        yield pipe


def children() -> set[int]:
    """Live child processes of this one (from /proc)."""
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


PROMPTS = [[1, 2, 3], [7], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
SPECS = [SpeculationConfig(gamma=4, branches=3, tau=0.12), SpeculationConfig(gamma=2, branches=2, tau=0.3),
         SpeculationConfig(gamma=5, branches=1, tau=0.0, after_rollback="wait"),  # pearl waits too
         SpeculationConfig(gamma=3, branches=3, tau=0.2, after_rollback="preverify"),  # specbranch pre-verifies
         SpeculationConfig(gamma=4, branches=3, tau=0.12, rest="always")]  # the draft rests every round it can


def gen(pipe, prompt, n, engine, spec=None, sampling=None, **kw):
    return pipe.generate(prompt, GenerationConfig(max_new_tokens=n, engine=engine), sampling, spec=spec, **kw)


def test_parallel_equals_sequential_at_temperature_zero(sequential, parallel):
    worker = parallel.worker.pid
    assert parallel.worker.alive and worker in children()
    hits = accepted = 0
    for engine in ("pearl", "specbranch"):
        for spec in SPECS:
            for prompt in PROMPTS:
                want = gen(sequential, prompt, 30, "ar").tokens
                seq = gen(sequential, prompt, 30, engine, spec)
                par = gen(parallel, prompt, 30, engine, spec)
                assert seq.tokens == want and par.tokens == want, (engine, spec, prompt)
                m, s = par.metrics, seq.metrics
                # the same rounds happened, counted on either side of the process boundary
                assert (m.num_drafts, m.num_accepted_tokens, m.num_branch_points, m.num_branch_hits) == (
                    s.num_drafts, s.num_accepted_tokens, s.num_branch_points, s.num_branch_hits)
                assert (m.draft_forwards, m.branch_forwards, m.target_forwards) == (
                    s.draft_forwards, s.branch_forwards, s.target_forwards)
                assert m.draft_busy_s > 0 and m.target_busy_s > 0
                assert 0 <= m.target_idle_fraction < 1 and 0 <= m.draft_idle_fraction < 1
                assert m.target_idle_s > 0 and m.draft_idle_s > 0
                hits += m.num_branch_hits
                accepted += m.num_accepted_tokens
    assert hits > 0 and accepted > 0  # branches were taken and drafts accepted: the protocol was exercised
    assert parallel.worker.pid == worker and parallel.worker.starts == 1  # one worker served them all
    # sd has no parallel form: it runs here, loading the draft in this process on first use
    assert gen(parallel, PROMPTS[0], 30, "sd").tokens == gen(sequential, PROMPTS[0], 30, "ar").tokens


@pytest.mark.parametrize("draft_sampling", ["sample", "greedy"])  # rules C and B
def test_parallel_equals_sequential_seed_for_seed(sequential, parallel, draft_sampling):
    spec = SpeculationConfig(gamma=3, branches=3, tau=0.3, draft_sampling=draft_sampling)
    resting = SpeculationConfig(gamma=3, branches=3, tau=0.3, draft_sampling=draft_sampling, rest="always")
    outputs = set()
    for seed in range(6):
        sampling = SamplingConfig(temperature=1.0, top_p=0.95, seed=seed)
        for engine, s in (("pearl", spec), ("specbranch", spec), ("specbranch", resting)):
            seq = gen(sequential, [5, 6, 7], 24, engine, s, sampling)
            par = gen(parallel, [5, 6, 7], 24, engine, s, sampling)
            assert par.tokens == seq.tokens, (seed, engine, s.rest)
            assert par.metrics.num_accepted_tokens == seq.metrics.num_accepted_tokens
        outputs.add(tuple(seq.tokens))
    assert len(outputs) > 3  # the seeds really drive the sampling


def test_inline_hedges_are_the_same_in_both_runtimes(sequential, parallel, monkeypatch):
    """The hedge's protocol (its index and candidates with the block, its rows' tokens the round
    after) carries every path: same tokens as ar at T = 0 and seed for seed at T > 0, same swerves."""
    from specbranch.engines.specbranch import TargetSide

    swerves = []
    settle = TargetSide.settle

    def spy(self, proposal, logits):
        verdict = settle(self, proposal, logits)
        swerves.append(bool(proposal.alternatives) and verdict.branch not in (None, 0))
        return verdict

    monkeypatch.setattr(TargetSide, "settle", spy)
    spec = SpeculationConfig(gamma=4, branches=3, tau=0.05, drafting="inline")
    counts = []
    for pipe in (sequential, parallel):
        swerves.clear()
        for prompt in PROMPTS:
            got = gen(pipe, prompt, 30, "specbranch", spec)
            assert got.tokens == gen(sequential, prompt, 30, "ar").tokens, (pipe.runtime.runtime, prompt)
        counts.append(sum(swerves))
    assert counts[0] == counts[1] > 0, counts
    sampled = SpeculationConfig(gamma=3, branches=3, tau=0.05, drafting="inline")
    for seed in range(3):
        sampling = SamplingConfig(temperature=1.0, seed=seed)
        assert gen(parallel, [5, 6, 7], 24, "specbranch", sampled, sampling).tokens == \
            gen(sequential, [5, 6, 7], 24, "specbranch", sampled, sampling).tokens, seed


def test_stops_anywhere_and_the_worker_stays_in_step(sequential, parallel):
    """Stopping after any token (mid-block, mid-round) and an exception in a callback both leave
    the worker ready for the next generation."""
    spec = SpeculationConfig(gamma=4, branches=3, tau=0.12)
    full = gen(sequential, [9, 9], 20, "ar").tokens
    for n in (1, 2, 3, 5, 8):
        assert gen(parallel, [9, 9], n, "specbranch", spec).tokens == full[:n]

    def boom(tokens):
        raise KeyError("callback failed")

    with pytest.raises(KeyError):
        gen(parallel, [9, 9], 20, "specbranch", spec, on_tokens=boom)
    assert parallel.worker.state == "idle"
    assert gen(parallel, [9, 9], 20, "specbranch", spec).tokens == full


def test_default_placement_gives_each_worker_its_own_core(parallel):
    cores = sorted(os.sched_getaffinity(0))
    target, draft = worker_placements(RuntimeConfig(runtime="parallel"))
    assert set(target.cores) | set(draft.cores) == set(cores)
    if len(cores) >= 2:
        assert not set(target.cores) & set(draft.cores)
        assert os.sched_getaffinity(parallel.worker.pid) == set(draft.cores)
    assert target.threads == len(target.cores) and draft.threads == len(draft.cores)
    before = os.sched_getaffinity(0), torch.get_num_threads()
    gen(parallel, [1], 3, "pearl")
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == before  # the caller's setup is restored


def test_the_worker_reports_what_its_draft_streams(sequential, parallel):
    # the benchmark's weights-read column counts draft forwards at the bytes the worker's model reads
    assert parallel.weight_bytes() == sequential.weight_bytes()
    assert sequential.weight_bytes()["draft"] == sequential.draft.backend.decoder.read_bytes() > 0


def test_proposals_survive_the_wire():
    from specbranch.engines.specbranch import Proposal
    from specbranch.runtime.messages import ChannelError, Counters, Message, decode_proposal, encode_proposal

    cases = [Proposal([4], [[5, 6, 7]], None, [3]),
             Proposal([4, 9, 2], [[5], [], [8, 8]], None, [1, 0, 1]),
             Proposal([4], [[5, 6, 7]], None, [3], hedge=[1, 6, 11, 12]),
             Proposal([4], [[5, 6]], None, [2], alternatives=[[1, 2, 3], []]),
             Proposal([], [], None, [], rests=True)]
    for p in cases:
        msg = encode_proposal(p, Counters(1, 2, 0.5, 0.25))
        got, counters = decode_proposal(msg)
        assert got == p and counters == Counters(1, 2, 0.5, 0.25)
        with pytest.raises(ChannelError, match="malformed"):
            decode_proposal(Message(msg.kind, msg.ints[:-1], extra=msg.extra))


def test_verdicts_survive_the_wire():
    from specbranch.engines.specbranch import Verdict
    from specbranch.runtime.messages import ChannelError, Kind, Message, decode_verdict, encode_verdict

    for v in [Verdict([3, 4], None), Verdict([7], 2, 3, force_branch=True), Verdict([], 0, 5)]:
        assert decode_verdict(encode_verdict(v)) == v
    with pytest.raises(ChannelError, match="malformed verdict"):
        decode_verdict(Message(Kind.VERDICT, [1, 2]))


def test_placement_flags_are_checked():
    with pytest.raises(ConfigError, match="core number"):
        RuntimeConfig(target_cores="0-x")
    with pytest.raises(ConfigError, match="cuda:N"):
        RuntimeConfig(draft_device="gpu0")
    with pytest.raises(ConfigError, match="not available"):
        worker_placements(RuntimeConfig(runtime="parallel", draft_cores="4096"))
    target, draft = worker_placements(RuntimeConfig(runtime="parallel", target_cores="0", target_threads=3))
    assert target.cores == (0,) and target.threads == 3
    if len(os.sched_getaffinity(0)) > 1:
        assert 0 not in draft.cores and draft.threads == len(draft.cores)


def kill_after_first_round(pipe, sig):
    fired = []

    def on_tokens(tokens):
        if not fired:
            fired.append(pipe.worker.pid)
            os.kill(pipe.worker.pid, sig)

    return fired, on_tokens


def test_killed_worker_raises_then_restarts(close_pair, sequential):
    spec = SpeculationConfig(gamma=3, branches=2, tau=0.2)
    with Pipeline(close_pair, progress=False, runtime=RuntimeConfig(runtime="parallel", worker_timeout=20)) as pipe:
        fired, on_tokens = kill_after_first_round(pipe, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match="signal 9"):
            gen(pipe, [3, 1, 4], 40, "specbranch", spec, on_tokens=on_tokens)
        assert time.monotonic() - t0 < 10  # a dead peer is noticed at once, not after the timeout
        assert gone(fired[0]) and fired[0] not in children()  # killed for good, and reaped
        # the next generation starts a fresh worker and is exact again
        want = gen(sequential, [3, 1, 4], 40, "ar").tokens
        assert gen(pipe, [3, 1, 4], 40, "specbranch", spec).tokens == want
        assert pipe.worker.starts == 2 and pipe.worker.pid != fired[0]
        worker = pipe.worker.pid
    assert gone(worker) and worker not in children()  # close() shut the worker down
    with pytest.raises(SpecBranchError, match="closed"):
        gen(pipe, [3, 1, 4], 4, "specbranch")
    assert gen(pipe, [3, 1, 4], 4, "ar").tokens == want[:4]  # in-process engines still work


def test_killed_worker_falls_back_to_ar(close_pair, sequential):
    want = gen(sequential, [2, 7, 1, 8], 40, "ar").tokens
    cfg = RuntimeConfig(runtime="parallel", worker_timeout=20, on_worker_failure="ar")
    with Pipeline(close_pair, progress=False, runtime=cfg) as pipe:
        fired, on_tokens = kill_after_first_round(pipe, signal.SIGKILL)
        with pytest.warns(RuntimeWarning, match="finishing this generation with ar"):
            got = gen(pipe, [2, 7, 1, 8], 40, "pearl", on_tokens=on_tokens)
        assert got.tokens == want  # the fallback is exact too
        assert gone(fired[0]) and fired[0] not in children()


def test_hung_worker_times_out(close_pair):
    cfg = RuntimeConfig(runtime="parallel", worker_timeout=1.5)
    with Pipeline(close_pair, progress=False, runtime=cfg) as pipe:
        fired, on_tokens = kill_after_first_round(pipe, signal.SIGSTOP)  # alive, but never answers
        t0 = time.monotonic()
        with pytest.raises(WorkerTimeoutError, match="did not answer within 1.5 s"):
            gen(pipe, [1, 2], 40, "specbranch", on_tokens=on_tokens)
        assert time.monotonic() - t0 < 8
        assert gone(fired[0]) and fired[0] not in children()  # the stopped process was killed and reaped


def test_cli_parallel_runtime_prints_the_same_text(close_pair):
    def run(*extra):
        args = ["generate", "def add(a, b):", "--target", close_pair.target, "--draft", close_pair.draft,
                "--precision", "fp64", "--max-new-tokens", "16", "--no-chat-template", "--engine", "specbranch", *extra]
        r = subprocess.run([sys.executable, "-m", "specbranch.cli", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r

    seq, par = run(), run("--runtime", "parallel", "-q")
    assert par.stdout == seq.stdout and par.stdout.strip()
    assert "idle target" in par.stderr and "16 tokens" in par.stderr


ORPHAN_SCRIPT = """
import os, signal, sys
from specbranch.config import ModelConfig, RuntimeConfig
from specbranch.pipeline import Pipeline
pipe = Pipeline(ModelConfig(target=sys.argv[1], draft=sys.argv[2], precision="fp64", threads=1), progress=False,
                runtime=RuntimeConfig(runtime="parallel"))
print(pipe.worker.pid, flush=True)
if sys.argv[3] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no finalizer: the worker must notice by itself
"""


@pytest.mark.parametrize("how", ["exits", "killed"])
def test_worker_never_outlives_its_parent(close_pair, how):
    r = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT, close_pair.target, close_pair.draft, how],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == (0 if how == "exits" else -signal.SIGKILL), r.stderr
    worker = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker)


def test_hrad_drafting_is_the_same_in_both_runtimes(sequential, parallel, close_pair, tmp_path):
    """The H-RAD class is decided on the target side and travels in the verdict (keep, force-branch):
    with an arbitrary predictor, the parallel runtime still follows the sequential one round for round."""
    from test_engines import random_predictor
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(close_pair.target)
    pred = random_predictor(target)
    pred.cfg = type(pred.cfg)(**{**pred.cfg.__dict__, "target": close_pair.target, "draft": close_pair.draft})
    pred.save(tmp_path / "hrad")
    for drafting in ("hybrid", "hrad"):
        spec = SpeculationConfig(gamma=4, branches=3, tau=0.3, drafting=drafting, hrad_predictor=str(tmp_path / "hrad"))
        for prompt in PROMPTS:
            want = gen(sequential, prompt, 30, "ar").tokens
            seq = gen(sequential, prompt, 30, "specbranch", spec)
            par = gen(parallel, prompt, 30, "specbranch", spec)
            assert seq.tokens == want and par.tokens == want, (drafting, prompt)
            assert (par.metrics.num_drafts, par.metrics.draft_forwards, par.metrics.branch_forwards) == (
                seq.metrics.num_drafts, seq.metrics.draft_forwards, seq.metrics.branch_forwards)
    pred.cfg = type(pred.cfg)(**{**pred.cfg.__dict__, "draft": "another-draft"})
    pred.save(tmp_path / "other")
    with pytest.raises(ConfigError, match="trained for target"):
        gen(sequential, PROMPTS[0], 5, "specbranch", SpeculationConfig(drafting="hybrid",
                                                                        hrad_predictor=str(tmp_path / "other")))


def test_each_worker_borrows_the_other_core_at_int8(close_pair):
    """At int8 (the kernels' precision) each worker lends its core to the other while it waits
    (runtime/lending.py): the target's helper runs on the draft's core, the draft worker's (int4 draft) on the
    target's. The same tokens as ar in this process, with pearl and specbranch, waiting or pre-verifying after a
    rollback; both shared pages are removed on close. Switched off, neither is set up."""
    from dataclasses import replace

    int8 = replace(close_pair, precision="int8")
    want = {tuple(p): gen(Pipeline(int8, progress=False), p, 30, "ar").tokens for p in PROMPTS}
    with Pipeline(int8, progress=False, runtime=RuntimeConfig(runtime="parallel", worker_timeout=20)) as pipe:
        lender, offer = pipe.worker.lender, pipe.worker.offer
        if lender is None:
            pytest.skip("lending is unavailable here (needs Linux, the native kernels and two cores)")
        assert offer is not None and offer.cores == pipe.target_placement.cores
        assert pipe.draft_precision == "int4"
        for prompt in PROMPTS:
            for engine, spec in (("pearl", None), ("pearl", SPECS[2]), ("specbranch", SPECS[0]),
                                 ("specbranch", SPECS[3])):
                assert gen(pipe, prompt, 30, engine, spec).tokens == want[tuple(prompt)], (engine, prompt, spec)
    assert not os.path.exists(lender.path) and not os.path.exists(offer.path)
    off = RuntimeConfig(runtime="parallel", worker_timeout=20, lend_draft_cores=False, lend_target_cores=False)
    with Pipeline(int8, progress=False, runtime=off) as pipe:
        assert pipe.worker.lender is None and pipe.worker.offer is None
        assert gen(pipe, PROMPTS[0], 30, "pearl").tokens == want[tuple(PROMPTS[0])]
