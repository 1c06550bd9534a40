r"""Language-model training configs; `--config lm:VARIANT`.

Variants:

  cpu_demo   the README run: HopeLM at the small preset on the embedded Wikipedia
             paragraphs, byte-level, ~25 min on a 2-core CPU (~26 s a step); held-out perplexity
             is printed before and after.  Any other model with --model:

               nested-jax train --config lm:cpu_demo --workdir runs/demo
               nested-jax train --config lm:cpu_demo --model transformer --workdir runs/tf

  tiny       a smoke test in well under a minute.

               nested-jax train --config lm:tiny --workdir runs/tiny

  125M, 340M, 760M, 1.3B   the paper's recipe (Titans/Hope setup: AdamW 4e-4 cosine,
             weight decay 0.1, 0.5M-token batches of 4K tokens, 32k SentencePiece
             vocabulary, bf16) on your data, FSDP over all devices.  Sized for a v5e-16
             slice (16 GiB per chip): 8 microbatches (one 4K sequence per chip on 16 chips; on
             N chips 128 / optim.grad_accum must be a multiple of N, e.g. --set
             optim.grad_accum=4 on 32), every block rematerialised, the blocks run as
             one lax.scan (model.scan_layers: XLA compiles one block, not L), and the
             presets' attention_impl="auto" (splash attention on TPU).  Transformer++,
             Hope-Attention and HopeLM 125M fit so (train, eval, decode; per chip to train
             2.17, 2.75 and 5.58 GiB with the blocks looped,
             experiments/results/tpu_compile.md; scanned, 1.31, 4.17 and 6.08 GiB, the
             train step compiled 1.9x, 1.4x and 1.7x faster,
             experiments/results/bench_compile.md).  Hope-Attention 1.3B on v5e-16 needs
             --set model.cms_remat_chunks=16 (8.67 GiB a chip; 16.00 as shipped, which does
             not fit), and so on two v5e-16 slices (8.56; 16.14 as shipped); v5e-256 fits as
             shipped (12.92; docs/training.md, experiments/results/tpu_compile_grid.md).
             HopeLM 1.3B on v5e-16 needs the same setting (13.46 GiB a chip, 11.61 with the
             Mosaic kernel off; 18.72 as shipped with it off), and so on two v5e-16 slices
             (11.69 with the kernel off; 18.93 as shipped) and on v5e-256 with the kernel on
             (10.08; with it off 15.90 as shipped, which leaves no margin):

               nested-jax train --config lm:760M --model hope \
                   --data /mnt/data/train.array_record-* \
                   --workdir gs://BUCKET/runs/hope-760m --steps 60000
"""

from nested_jax.train.config import DataConfig, MeshConfig, OptimConfig, TrainConfig

PAPER_SIZES = ("125M", "340M", "760M", "1.3B")


def get_config(variant: str | None = None) -> TrainConfig:
    variant = variant or "cpu_demo"
    if variant == "cpu_demo":
        # 50 steps of 16 x 128 bytes: HopeLM small takes ~26 s a step on 2 cores of the CI VM
        # (25 min in all, held-out perplexity 146.7 -> 12.7; README).
        return TrainConfig(
            model="hope", preset="small", steps=50, log_every=5, eval_every=25, eval_batches=8,
            checkpoint_every=25,
            data=DataConfig(tokenizer="byte", seq_len=128, batch_size=16, eval_fraction=0.01),
            optim=OptimConfig(learning_rate=3e-3, warmup_steps=10, weight_decay=0.1))
    if variant == "tiny":
        return TrainConfig(
            preset="tiny", steps=50, log_every=5, eval_every=25, eval_batches=4,
            checkpoint_every=25,
            data=DataConfig(tokenizer="byte", seq_len=128, batch_size=16),
            optim=OptimConfig(learning_rate=3e-3, warmup_steps=5))
    if variant in PAPER_SIZES:
        return TrainConfig(
            preset=variant, steps=60_000, bf16=True, log_every=50, eval_every=2000,
            eval_batches=16, checkpoint_every=1000, keep_checkpoints=3,
            data=DataConfig(tokenizer="mistral", seq_len=4096, batch_size=128,
                            eval_fraction=0.005),
            model_overrides={"remat": True, "scan_layers": True},
            optim=OptimConfig(learning_rate=4e-4, warmup_steps=2000, weight_decay=0.1,
                              b2=0.95, grad_clip=1.0, grad_accum=8),
            mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
    raise ValueError(f"--config lm:{variant}: unknown variant; use cpu_demo, tiny or one of "
                     f"{list(PAPER_SIZES)}")
