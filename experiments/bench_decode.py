"""Decode cost per token at growing positions: the cost of one decode step does not grow with
the position (issue 4).

    python experiments/bench_decode.py                    # tiny preset, positions 0, 256, 1024
    python experiments/bench_decode.py --preset small --positions 0,512

For each model, ``model.decode_step(state, tokens_B)`` is jitted as a ``lax.scan`` over a
window of ``--window`` consecutive steps (one compiled program per model; the window covers
every chunk / CMS-period phase of the tiny preset, so a step that happens to fall on a chunk
boundary is neither favoured nor missed).  The state is advanced from position 0 with random
tokens (the "prompt") by running that same program; at each measured position p the window
p .. p + W - 1 is timed from the same saved state (median of ``--repeats`` after warm-up,
blocking on the result; the rounds interleave the positions), and ms/step = median / W.

Transformer++ and Hope-Attention decode against a KV cache preallocated at ``max_seq_len``
slots and masked past the position, so their per-step cost is flat in the position but
proportional to ``max_seq_len`` (they pay for the whole cache from the first token); the second
table shows that by growing ``max_seq_len`` at position 0.  HopeLM and TitansLM carry a
fixed-size recurrent state.  Writes experiments/results/bench_decode.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchlib beside this file
import benchlib  # noqa: E402

from nested_jax import models  # noqa: E402

OUT = pathlib.Path(__file__).parent / "results" / "bench_decode.md"
DEFAULT_MODELS = "hope,hope_attention,titans,transformer"
KV_CACHE_MODELS = ("transformer", "hope_attention")


class Decoder:
    """One model's compiled W-step decode window and its state."""

    def __init__(self, name: str, preset: str, max_seq_len: int, args):
        self.name = name
        model = models.create(name, preset, rngs=nnx.Rngs(0), max_seq_len=max_seq_len,
                              dtype=args.dtype)
        self.max_seq_len = max_seq_len
        self.params = models.count_params(model)
        graphdef, weights = nnx.split(model)
        self.weights = weights
        self.state0 = model.init_state(args.batch)
        self.state_mib = sum(x.nbytes for x in jax.tree.leaves(self.state0)) / 2**20
        self.window = args.window
        self.vocab = model.config.vocab_size
        self.batch = args.batch

        def run(weights, state, tokens_WxB):
            m = nnx.merge(graphdef, weights)

            def body(s, tok_B):
                logits_BxV, s = m.decode_step(s, tok_B)
                return s, jnp.argmax(logits_BxV, axis=-1)  # greedy: needs every logit

            state, greedy_WxB = jax.lax.scan(body, state, tokens_WxB)
            return greedy_WxB, state

        self.run = jax.jit(run)

    def tokens(self, seed: int) -> jax.Array:
        return jax.random.randint(jax.random.key(seed), (self.window, self.batch), 0, self.vocab)

    def advance(self, state, to_pos: int, from_pos: int):
        """Feed random tokens from from_pos to to_pos (both multiples of the window)."""
        for i, _ in enumerate(range(from_pos, to_pos, self.window)):
            _, state = self.run(self.weights, state, self.tokens(1000 + from_pos + i))
        return jax.block_until_ready(state)

    def ms_per_step(self, states: list, repeats: int) -> list[float]:
        """ms/step of the window starting at each state; the rounds interleave the states, so a
        shared machine's changing load hits every position alike."""
        tokens = self.tokens(7)
        for s in states:
            benchlib.timeit(self.run, self.weights, s, tokens, repeats=1, warmup=1)
        times = [[] for _ in states]
        for _ in range(repeats):
            for s, ts in zip(states, times, strict=True):
                ts.append(benchlib.timeit(self.run, self.weights, s, tokens, repeats=1, warmup=0))
        return [1e3 * statistics.median(ts) / self.window for ts in times]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--positions", default="0,256,1024",
                   help="positions to time (rounded up to multiples of --window)")
    p.add_argument("--window", type=int, default=64, help="decode steps per timed call")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cache-scales", default="1,4",
                   help="max_seq_len multiples timed at position 0 for the KV-cache models "
                        "('' to skip)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    positions = sorted({_round_up(int(x), args.window) for x in args.positions.split(",")})
    need = positions[-1] + args.window  # the KV cache must hold the last timed window
    rows, cache_rows = [], []
    for name in args.models.split(","):
        base = models.make_config(name, args.preset).max_seq_len
        S = max(base, need)
        dec = Decoder(name, args.preset, S, args)
        states, at = [dec.state0], 0
        for pos in positions[1:]:
            states.append(dec.advance(states[-1], pos, at))
            at = pos
        ms = dec.ms_per_step(states, args.repeats)
        for pos, t in zip(positions, ms, strict=True):
            print(f"{name}: position {pos}: {t:.3f} ms/step", flush=True)
        kv = S if name in KV_CACHE_MODELS else "-"
        rows.append([name, f"{dec.params / 1e6:.2f}M", kv, f"{dec.state_mib:.3g}", *ms,
                     f"{ms[-1] / ms[0]:.2f}"])
        if name in KV_CACHE_MODELS and args.cache_scales:
            for k in (int(x) for x in args.cache_scales.split(",")):
                big = Decoder(name, args.preset, k * S, args) if k != 1 else dec
                t = ms[0] if k == 1 else big.ms_per_step([big.state0], args.repeats)[0]
                print(f"{name}: max_seq_len {k * S}: {t:.3f} ms/step at position 0", flush=True)
                cache_rows.append([name, k * S, f"{big.state_mib:.3g}", t])
        del dec, states

    header = ["model", "params", "KV slots S", "state MiB",
              *[f"ms/step @{q}" for q in positions], f"@{positions[-1]} / @{positions[0]}"]
    table = benchlib.markdown_table(header, rows)
    print(table)
    parts = [
        f"Command: `{' '.join(['python experiments/bench_decode.py', *sys.argv[1:]])}`",
        f"Preset {args.preset}, batch {args.batch}, {args.dtype}; ms/step = median of "
        f"{args.repeats} timed {args.window}-step decode windows (one jitted lax.scan of "
        "decode_step) starting at the position, / window; the timing rounds interleave the "
        "positions.  The state is advanced to each position by decoding random tokens.",
        table,
    ]
    if cache_rows:
        cache_table = benchlib.markdown_table(
            ["model", "max_seq_len (KV slots)", "state MiB", "ms/step @0"], cache_rows)
        print(cache_table)
        parts += ["KV-cache models at position 0 with a larger preallocated cache: the step "
                  "attends over all max_seq_len slots (masked past the position), so the "
                  "cost is flat in the position but grows with the cache size.", cache_table]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    parts.append(f"Load average at the end: {load} (2-core machine shared with other jobs).")
    benchlib.write_result(args.out, "Decode cost per step vs position", "\n\n".join(parts))


if __name__ == "__main__":
    main()
