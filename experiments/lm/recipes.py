"""The language-model suites' budgets: model sizes matched in parameters, data, steps, grids.

One ``Scale`` per (suite, scale).  Every model of a scale is built from the same base shape
(``Scale.base``: width, depth, heads, vocabulary) and gets its own MLP width (``Scale.sizes``)
so that the parameter counts *without the tied embedding* agree within a few percent: the
embedding is the same for every model, and at a 4K vocabulary it would otherwise hide the
difference between the blocks.  ``tests/experiments/test_lm_recipes.py`` checks the matching.

The CPU scale is sized for a 2-core machine (the whole ``compare`` suite in a few hours); the
GPU scale is the recipe for one accelerator host and has not been run by this project.
"""

from __future__ import annotations

import dataclasses

MODELS = ("hope", "titans", "hope_attention", "transformer")

# The paper's ablation table (arXiv Table 5): row name -> HopeLM overrides (hope.py documents
# each flag).  "hope" is the reference row.
ABLATIONS = {
    "hope": {},
    "dgd_to_gd": dict(dgd=False),
    "no_momentum": dict(momentum=False),
    "no_weight_decay": dict(weight_decay=False),
    "no_cms": dict(use_cms=False),
    "static_k": dict(static_k=True),
    "static_v": dict(static_v=True),
    "adaptive_q": dict(adaptive_q=True),
}

# The paper's perplexities for its ablation rows (arXiv ablation table; model size and data are
# not given there), printed beside ours: the scale differs by orders of magnitude, so only the
# ordering can be compared.  The paper's Hope adapts q and ablates "q static" (12.19); this
# project's Hope keeps q static by default (docs/decisions.md #9), so its reference row "hope"
# is the paper's "q static" row and its "adaptive_q" row is the paper's Hope.
PAPER_ABLATION_PPL = {
    "hope": 12.19, "adaptive_q": 12.24, "dgd_to_gd": 13.41, "no_momentum": 13.58,
    "no_weight_decay": 13.71, "no_cms": 13.04, "static_k": 13.77, "static_v": 13.90,
}

OPTIMIZERS = ("adamw", "muon", "m3", "delta_momentum", "deep_momentum")
# The optimizer suite's arms, name -> (optimizer, optim.kwargs): the five optimizers as shipped,
# then the variant the warmup spike study points to (experiments/results/lm_optimizers_spike.md:
# orthogonalized updates of the CMS levels' initial weights drive Muon's and M3's blow-up), the
# CMS levels off Newton-Schulz (Muon: to its Adam; M3: its unorthogonalized update).  A variant
# sweeps its optimizer's grid and never replaces the shipped arm.
OPTIMIZER_ARMS = {**{o: (o, {}) for o in OPTIMIZERS},
                  "muon_cms_off_ns": ("muon", {"ns_skip": ("levels",)}),
                  "m3_cms_off_ns": ("m3", {"ns_skip": ("levels",)})}


@dataclasses.dataclass(frozen=True)
class Scale:
    """One budget.

    Attributes:
      base: model config fields shared by every model (width, depth, heads, max length).
      sizes: per-model overrides that match the parameter counts.
      vocab: SentencePiece vocabulary, trained once on the training split and shared by every
        run of the scale.
      seq_len, batch, steps: the training budget (every model sees the same tokens).
      lrs: the peak learning-rate grid of AdamW (the compare and ablation suites), swept on the
        first seed; further seeds run at the best value only.
      optimizer_lrs: the optimizer suite's grid for each optimizer.  Optimizers differ in the
        scale of their update (Muon's orthogonal update, DMGD's and delta momentum's raw
        momentum), so one grid cannot hold every optimizer's best value: each is centred on
        its best value relative to AdamW's in the tiny-transformer comparison
        (`experiments/results/train_optim_compare.md`: Muon 10x, M3 3x, DMGD and delta
        momentum 30x AdamW's best), then lowered where HopeLM showed more: M3 at 3e-2 on
        HopeLM blew up in warmup (train loss 8.3 -> 11.4 by step 48, gradient norm 6e3; before
        the fix of docs/decisions.md #33, after which it still spikes and recovers), so
        M3 and Muon (whose Adam takes the embedding and vectors at the same rate) are
        centred one step lower.
      warmup: warmup steps; eval_batches: held-out batches per score.
      position_len, position_batches: the length and batches of the loss-by-position curve
        (longer than training: what the model does with context it never trained on).
    """

    base: dict
    sizes: dict
    vocab: int
    seq_len: int
    batch: int
    steps: int
    lrs: tuple[float, ...]
    optimizer_lrs: dict
    warmup: int
    eval_batches: int
    position_len: int
    position_batches: int

    def overrides(self, model: str) -> dict:
        return {**self.base, **self.sizes[model]}

    def grid(self, suite: str, optimizer: str) -> tuple[float, ...]:
        """The learning rates an arm sweeps: the optimizer's own grid in the optimizer suite."""
        return tuple(self.optimizer_lrs[optimizer]) if suite == "optimizers" else self.lrs


SCALES = {
    # ~1.25M parameters without the embedding (+0.52M tied embedding at 4096 pieces);
    # 400 steps of 8 x 256 tokens = 0.8M tokens per run.  Measured on 2 shared CPU cores:
    # HopeLM ~6 s a step, Transformer++ ~1 s.
    "cpu": Scale(
        base=dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=4096),
        sizes=dict(hope=dict(d_ff=512), titans=dict(d_ff=544),
                   hope_attention=dict(cms_d_ff=216), transformer=dict(d_ff=640)),
        vocab=4096, seq_len=256, batch=8, steps=400, lrs=(1e-3, 3e-3, 1e-2),
        # HopeLM's AdamW best is 1e-2 (compare's sweep, which added 3e-2): the AdamW arm's
        # grid is three of compare's runs, reused.
        optimizer_lrs=dict(adamw=(3e-3, 1e-2, 3e-2), muon=(1e-2, 3e-2, 1e-1),
                           m3=(3e-3, 1e-2, 3e-2), delta_momentum=(1e-1, 3e-1, 1.0),
                           deep_momentum=(1e-1, 3e-1, 1.0)),
        warmup=40,
        eval_batches=16, position_len=2048, position_batches=4),
    # The small presets (~23M parameters at 32K pieces; ~15M at 8K), 1024-token sequences.
    "gpu": Scale(
        base=dict(max_seq_len=8192),
        sizes=dict(hope={}, titans={}, hope_attention={}, transformer={}),
        vocab=8192, seq_len=1024, batch=32, steps=20_000,
        lrs=(3e-4, 1e-3, 3e-3),
        optimizer_lrs=dict(adamw=(3e-4, 1e-3, 3e-3), muon=(1e-3, 3e-3, 1e-2),
                           m3=(3e-4, 1e-3, 3e-3), delta_momentum=(1e-2, 3e-2, 1e-1),
                           deep_momentum=(1e-2, 3e-2, 1e-1)),
        warmup=1000, eval_batches=64, position_len=8192,
        position_batches=16),
}
PRESET = {"cpu": "small", "gpu": "small"}  # the preset the base shape overrides
