"""Train a suite's run to its last step, or stop the suite: an interrupted run is never scored.

`nested_jax.train.trainer.train` returns, rather than raises, when SIGTERM or Ctrl-C stops it:
it checkpoints first so that the next call resumes. A suite that went on to score the returned
run would log a half-trained model as a finished one, and the sweep would skip it from then on
(a SIGTERM to `experiments.lm.run` on 2026-12-05 set it scoring a 17-step run, killed before it
logged). Every language-model suite
trains through `train_to_end`, so a stopped run exits before anything is scored or logged.
"""

from __future__ import annotations


def train_to_end(cfg, workdir: str, **kwargs) -> dict:
    """`trainer.train(cfg, workdir, progress=False, **kwargs)`; exits (status 1) if a signal
    stopped it before `cfg.steps`, naming the run and how to resume it."""
    from nested_jax.train import trainer

    summary = trainer.train(cfg, workdir, progress=False, **kwargs)
    if summary["preempted"]:
        raise SystemExit(
            f"{workdir}: stopped by {summary['stopped_by'] or 'preemption'} at step "
            f"{summary['final_step']} of {cfg.steps}, so it is neither scored nor logged; "
            "run the same command again to resume it from its checkpoint")
    return summary
