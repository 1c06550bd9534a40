"""Log-likelihoods and greedy generation of a trained run, batched (no lm_eval needed).

`Scorer.from_workdir("runs/demo")` restores the newest checkpoint model-only (as
`nested-jax eval` does) and answers the three questions a benchmark harness asks:

  loglikelihood          log p(continuation | context) and whether the continuation is the
                         model's greedy choice at every token;
  loglikelihood_rolling  log p(document) over disjoint windows of `max_length` tokens;
  generate_until         greedy text after a context, cut at the first stop string or after
                         `max_gen_toks` tokens, through the model's streaming decode state
                         (`model.decode_step`, as `nested-jax generate` runs it).

Scoring runs the model's plain forward pass on right-padded batches: every model here is
causal (a chunked memory pads a ragged last chunk itself), so padding after a sequence
never changes its scores.  Batches are `batch_size` rows of a power-of-two length, so a
whole task compiles a handful of shapes.  Log-probabilities are taken in the widest float
JAX has enabled (float64 under `jax_enable_x64`, else float32) and summed in float64.
The token conventions (document-start token, joint encoding, windows) are in `requests.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nested_jax.config_checks import fail
from nested_jax.harness import requests as req
from nested_jax.harness.model_args import positive_int
from nested_jax.train import evaluate, sharding, trainer
from nested_jax.train.generate import sample

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # shortest padded length: short requests share one compiled shape


@dataclasses.dataclass(frozen=True)
class Score:
    """log p(continuation | context) (nats) and whether greedy decoding yields it."""

    logprob: float
    is_greedy: bool


def _has_checkpoint(workdir) -> bool:
    """Whether WORKDIR/checkpoints holds a committed step (a directory named by its number)."""
    ckpts = workdir / "checkpoints"
    try:
        return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    except OSError:
        return True  # let the restore report what is wrong with the directory


def load(workdir, *, freeze: Sequence[str] = (),
         devices: Sequence[jax.Device] | None = None) -> tuple[trainer.Run, dict, int]:
    """(run, model-only state, step) of the newest checkpoint, with clear errors for a
    directory that holds no trained run."""
    path = trainer.workdir_path(workdir)
    if not path.is_dir():
        fail("workdir", str(workdir), "no such directory; pass the --workdir of a run "
             "trained with `nested-jax train`")
    if not _has_checkpoint(path):
        fail("workdir", str(workdir), f"holds no checkpoint (nothing in {path / 'checkpoints'}"
             "); train the run first (`nested-jax train --workdir ...`), wait for its first "
             "save (checkpoint_every), or pass the workdir of a trained run")
    overrides = {}
    if freeze:
        overrides = evaluate.freeze_overrides(trainer.saved_config(path).model, freeze)
    return trainer.load_run(path, devices=devices, for_training=False,
                            model_overrides=overrides)


class Scorer:
    """A restored run's log-likelihoods and greedy continuations, `batch_size` at a time.

    `max_length` (default: the model's `max_seq_len`, at most that) is the longest input
    the model reads: longer requests keep their last tokens (left truncation).
    """

    def __init__(self, run: trainer.Run, state: dict, *, batch_size: int = 8,
                 max_length: int | None = None, progress: bool = False):
        self.run, self.state = run, state
        self.tokenizer = run.tokenizer
        self.batch_size = positive_int("batch_size", batch_size, "batch_size=8")
        limit = run.model_cfg.max_seq_len
        self.max_length = limit if max_length is None else positive_int(
            "max_length", max_length, f"max_length={limit}")
        if self.max_length > limit:
            fail("max_length", self.max_length, f"exceeds the model's max_seq_len={limit}; "
                 f"pass max_length <= {limit}")
        ways = int(np.prod([run.mesh.shape[a] for a in run.eval_sharding.spec[0] or ()]))
        if self.batch_size % ways:
            fail("batch_size", self.batch_size, f"must be divisible by the {ways} devices the "
                 "batch is split over")
        self.progress = progress
        graphdef = run.graphdef

        def score(params, rest, inputs_BxT, targets_BxT):
            logits_BxTxV = nnx.merge(graphdef, params, rest)(inputs_BxT)
            wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
            logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(wide), axis=-1)
            logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
            return logp_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT

        self._score = sharding.under_mesh(jax.jit(score), run.mesh)

        def advance(params, rest, cache, tokens_B):
            logits_BxV, cache = nnx.merge(graphdef, params, rest).decode_step(cache, tokens_B)
            return sample(logits_BxV, jax.random.key(0), 0.0, 0), cache  # greedy

        self._advance = jax.jit(advance, donate_argnums=2)

    @classmethod
    def from_workdir(cls, workdir, *, batch_size: int = 8, max_length: int | None = None,
                     freeze: Sequence[str] = (), devices: Sequence[jax.Device] | None = None,
                     progress: bool = False) -> Scorer:
        """The newest checkpoint in `workdir`, restored model-only on `devices` (default: the
        first device).  `freeze` names memories scored with inner learning rates at 0
        ("self_modifying", "cms"; as `nested-jax eval --freeze`)."""
        positive_int("batch_size", batch_size, "batch_size=8")
        run, state, step = load(workdir, freeze=freeze, devices=devices)
        log.info("scoring %s at step %d (%s, tokenizer %s)", run.workdir, step, run.cfg.model,
                 run.tokenizer.spec)
        return cls(run, state, batch_size=batch_size, max_length=max_length, progress=progress)

    # ---- tokens ----------------------------------------------------------------------------------

    @property
    def start_id(self) -> int:
        """The document-start token every context opens with (the end-of-document id)."""
        return int(self.tokenizer.eos_id)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return req.encode_pair(self.tokenizer.encode, self.start_id, context, continuation)

    # ---- log-likelihoods ----------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return min(self.max_length, max(MIN_BUCKET, 1 << (n - 1).bit_length()))

    def _bar(self, total: int, what: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=what, disable=not self.progress, dynamic_ncols=True)

    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                             ) -> list[Score]:
        """Scores of (context ids, continuation ids) pairs; contexts must be non-empty."""
        windows = [req.score_window(c, x, self.max_length) for c, x in pairs]
        out: list[Score | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        B = self.batch_size
        params, rest = self.state["params"], self.state["rest"]
        with self._bar(len(windows), "loglikelihood") as bar:
            for start in range(0, len(order), B):
                rows = order[start:start + B]
                T = self._bucket(len(windows[rows[0]][0]))
                inputs = np.full((B, T), self.start_id, np.int32)
                targets = np.zeros((B, T), np.int32)
                for r, i in enumerate(rows):
                    x, y, _ = windows[i]
                    inputs[r, :len(x)], targets[r, :len(y)] = x, y
                put = lambda a: jax.device_put(a, self.run.eval_sharding)
                logp, greedy = jax.device_get(self._score(params, rest, put(inputs),
                                                          put(targets)))
                logp = np.asarray(logp, np.float64)
                for r, i in enumerate(rows):
                    n, k = len(windows[i][0]), windows[i][2]
                    out[i] = Score(float(logp[r, n - k:n].sum()), bool(greedy[r, n - k:n].all()))
                bar.update(len(rows))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Score]:
        """Scores of (context, continuation) text pairs (see `requests.encode_pair`)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def rolling_windows(self, text: str, context_len: int = 1):
        return list(req.rolling_windows(self.encode(text), self.start_id, self.max_length,
                                        context_len))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log p(text) of each whole text (after the document-start token), every token
        predicted exactly once, over the disjoint windows of `requests.rolling_windows`."""
        windows = [self.rolling_windows(t) for t in texts]
        scores = iter(self.loglikelihood_tokens([w for ws in windows for w in ws]))
        return [float(sum(next(scores).logprob for _ in ws)) for ws in windows]

    # ---- generation ------------------------------------------------------------------------------

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy continuations of (context, stop strings, max_gen_toks) requests.

        Each context is opened with the document-start token and keeps its last
        `max_length - max_gen_toks` tokens; generation stops at the end-of-document token,
        after `max_gen_toks` tokens, or at a stop string (the text is cut before it).
        Rows of a batch advance in step through `model.decode_step`: a row still reading its
        prompt feeds its next prompt token, a row past it feeds its last greedy token.
        """
        prompts = []
        for context, _, max_gen in requests:
            max_gen = positive_int("max_gen_toks", max_gen, "max_gen_toks=256")
            if max_gen >= self.max_length:
                fail("max_gen_toks", max_gen, f"leaves no room for the context in max_length="
                     f"{self.max_length}; lower max_gen_toks")
            ids = [self.start_id] + self.encode(context)
            prompts.append(ids[-(self.max_length - max_gen):])
        out: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        with self._bar(len(requests), "generate_until") as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                texts = self._greedy([prompts[i] for i in rows],
                                     [tuple(requests[i][1]) for i in rows],
                                     [int(requests[i][2]) for i in rows])
                for i, text in zip(rows, texts, strict=True):
                    out[i] = text
                bar.update(len(rows))
        return out  # type: ignore[return-value]

    def _greedy(self, prompts: list[list[int]], stops: list[tuple[str, ...]],
                max_gens: list[int]) -> list[str]:
        B, eos = self.batch_size, int(self.tokenizer.eos_id)
        n = len(prompts)
        repl = sharding.replicated(self.run.mesh)
        # Copy once: a model may return one buffer twice (equal zero caches), which cannot be
        # donated twice; every later state comes out of jit in fresh buffers.
        cache = jax.device_put(
            jax.tree.map(lambda x: jnp.array(x, copy=True),
                         self.run.model(self.state).init_state(B)), repl)
        generated: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        nxt = np.zeros(B, np.int32)
        steps = max(len(p) + g - 1 for p, g in zip(prompts, max_gens, strict=True))
        for t in range(steps):
            feed = np.full(B, eos, np.int32)
            for r in range(n):
                feed[r] = prompts[r][t] if t < len(prompts[r]) else nxt[r]
            nxt, cache = self._advance(self.state["params"], self.state["rest"], cache,
                                       jax.device_put(feed, repl))
            nxt = np.asarray(nxt)
            for r in range(n):
                if done[r] or t < len(prompts[r]) - 1:
                    continue
                token = int(nxt[r])
                if token == eos:
                    done[r] = True
                    continue
                generated[r].append(token)
                _, stopped = req.cut_at_stop(self.tokenizer.decode(generated[r]), stops[r])
                done[r] = stopped or len(generated[r]) >= max_gens[r]
            if all(done):
                break
        return [req.cut_at_stop(self.tokenizer.decode(g), s)[0]
                for g, s in zip(generated, stops, strict=True)]
