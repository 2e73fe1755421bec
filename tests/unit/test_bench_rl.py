"""The pmetal-vs-TRL step benchmarks (benchmarks/bench_rloo.py, bench_distill.py and the shared
benchmarks/_timing.py): the step clock's arithmetic, the worker plumbing, and one real step of each
side of RLOO and GKD on tiny random models, so a change in pmetal or TRL that breaks a benchmark
fails here rather than on a GPU."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their siblings (`_common`, `bench_grpo`)
    import _timing

    return _timing


def test_step_clock_times_steps_and_phases_after_the_warmup(benchmarks):
    events = []
    clock = benchmarks.StepClock("cpu", warmup=1, last=3, on_timed_start=lambda: events.append("start"),
                                 on_timed_end=lambda: events.append("stop"))

    class Engine:
        def sample(self, n):
            time.sleep(0.02)
            return list(range(n))

    engine = Engine()
    clock.wrap(engine, "sample", "generate", counts=lambda out: {"generated": len(out)})
    for step in range(3):
        clock.begin()
        assert engine.sample(step + 1) == list(range(step + 1))  # the wrapped method returns what it returned
        time.sleep(0.01)
        clock.end(rows=2)
    assert events == ["start", "stop"]  # the profiler window: as step 1 begins, as step 3 ends
    timed = clock.timed()
    assert [s["generated"] for s in timed] == [2, 3] and all(s["rows"] == 2 for s in timed)
    assert all(s["step"] > s["generate"] >= 0.02 for s in timed)
    means = clock.phase_means("generate", "teacher")
    assert means["teacher"] == 0.0 and means["generate"] >= 0.02 and means["other"] >= 0.01
    assert means["generate"] + means["other"] == pytest.approx(clock.seconds() / 2)
    assert clock.setup_seconds() > 0


def test_run_workers_reads_each_result_and_reports_a_failed_worker(benchmarks, tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text(textwrap.dedent("""
        import argparse, sys
        sys.path.insert(0, sys.argv.pop(1))
        from _timing import add_worker_arguments, print_result
        p = argparse.ArgumentParser()
        p.add_argument("--size", type=int)
        add_worker_arguments(p)
        args = p.parse_args()
        if args._worker == "broken":
            raise SystemExit("broken worker: no result")
        print("noise")
        print_result({"trainer": args._worker, "size": args.size, "work": args._work})
    """))
    argv = [str(BENCHMARKS), "--size", "3", "--markdown", str(tmp_path / "never.md")]  # --markdown is not passed on
    results = benchmarks.run_workers(str(script), argv, ["pmetal", "broken"], tmp_path)
    assert results[0]["trainer"] == "pmetal" and results[0]["size"] == 3 and results[0]["work"] == str(tmp_path)
    assert results[0]["worker_s"] > 0
    assert results[1]["name"] == "broken" and "no result" in results[1]["error"]


def _args(**values) -> argparse.Namespace:
    return argparse.Namespace(device="cpu", warmup=1, steps=1, **values)


def test_rloo_benchmark_runs_a_step_of_pmetal_and_of_trl(benchmarks, tmp_path):
    """bench_rloo's two workers, in this process (the subprocess plumbing is tested above)."""
    import bench_rloo
    from bench_grpo import prepare, results_table

    args = _args(model="tiny", prompts=2, num_generations=2, prompt_len=8, max_completion_length=4)
    model_dir, prompts = prepare(args, tmp_path)
    results = [bench_rloo.run_pmetal(args, model_dir, prompts), bench_rloo.run_trl(args, model_dir, prompts)]
    for result in results:
        assert result["steps"] == 1 and result["step_s"] > 0 and result["generated_per_step"] == 2 * 2 * 4
        assert result["rollout_tok_s"] > 0 and result["update_tok_s"] > 0 and result["peak_gib"] > 0
    table = results_table([dict(r, worker_s=1.0) for r in results])
    assert "| pmetal RlooModule |" in table and "| TRL RLOOTrainer |" in table and "failed" not in table


def test_distill_benchmark_splits_a_step_of_pmetal_and_of_trl(benchmarks, tmp_path):
    import bench_distill

    args = _args(student="tiny", teacher="tiny-wide", batch_size=2, prompt_len=8, completion_len=4, lmbda=1.0,
                 beta=0.5, lora_r=4, checkpointing=True)
    args.steps = 2  # steps in all for this benchmark: one warmup, one timed
    bench_distill.prepare(args, tmp_path)
    rows = []
    for name, run in (("pmetal", bench_distill.run_pmetal), ("trl", bench_distill.run_trl)):
        clock = benchmarks.StepClock("cpu", warmup=1)
        run(args, tmp_path, clock)
        assert len(clock.timed()) == 1
        phases = clock.phase_means(*bench_distill.PHASES)
        assert phases["generate"] > 0 and phases["teacher"] > 0 and phases["other"] > 0  # every step sampled
        rows.append(dict(trainer=name, step_s=clock.seconds(), tokens_per_s=1.0, peak_gib=1.0, setup_s=1.0,
                         first_step_s=1.0, worker_s=1.0, **phases))
    table = bench_distill.results_table(args, rows)
    assert "| pmetal |" in table and "| trl |" in table and "teacher forward s/step" in table


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
