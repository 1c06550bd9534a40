"""Ahead-of-time compile for TPU topologies (`nested-jax compile`, nested_jax/train/aot.py).

Topology parsing and the missing-libtpu error run everywhere.  Compiling needs libtpu (the
``tpu`` extra, ~700 MB, not in the default install), so those tests are marked slow and skip
without it: ``pip install -e ".[tpu,test]" && pytest -m slow tests/train/test_aot.py``.
"""

import importlib.util
import os

import pytest

from nested_jax.train import aot, config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("spec, name", [
    ("v5e:4x4", "v5e:4x4"), ("v5e-16", "v5e:4x4"), ("v5e-256", "v5e:16x16"),
    ("v6e-8", "v6e:2x4"), ("v5p-32", "v5p:2x2x4"), ("v5p-64", "v5p:2x4x4"),
    ("v4-8", "v4:2x2x1"), ("v5litepod-4", "v5e:2x2"),
])
def test_slice_names_map_to_topologies(spec, name):
    assert aot.topology_name(spec) == name


@pytest.mark.parametrize("spec", ["v5e-3", "v5p-7", "tpu", "v5e:4", "a100-8"])
def test_bad_topology_names_the_option(spec):
    with pytest.raises(ValueError, match="--topology="):
        aot.topology_name(spec)


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here")
def test_missing_libtpu_says_what_to_install():
    with pytest.raises(ImportError, match=r'pip install "jax\[tpu\]=='):
        aot.topology_devices("v5e:2x2")


def _cfg(model, **over):
    pairs = [("model", model), ("preset", "tiny"), ("data.batch_size", 8), ("data.seq_len", 64)]
    return config.with_values(config.TrainConfig(), pairs + list(over.items()))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
@pytest.mark.parametrize("model", ["transformer", "titans", "hope_attention", "hope"])
def test_tiny_presets_compile_for_a_v5e_slice(model):
    """Train, eval and decode steps of every model compile for v5e 2x2 (4 chips, data
    parallel): XLA reports per-chip memory that fits and a positive FLOP count."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    report = aot.compile_for(_cfg(model), "v5e:2x2")
    assert report.chips == 4 and report.mesh["data"] == 4
    for r in report.steps:
        assert r.compiled, (r.step, r.error)
        assert 0 < r.total_bytes < report.hbm_bytes and r.flops > 0, r
    mfu = report.mfu_ceiling()
    if model == "transformer":  # no loop inside the model: XLA counts all of its work
        assert 0 < mfu < 1
    else:  # chunk scans counted once may leave XLA's count below the model's: no ceiling
        assert mfu is None or 0 < mfu < 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_titans_mosaic_kernel_compiles_for_tpu():
    """The linear-memory Titans runs its memory through the Mosaic kernel on TPU: compiled by
    libtpu for real (not only lowered), forward and backward."""
    report = aot.compile_for(_cfg("titans", **{"model.memory": "linear",
                                               "model.memory_impl": "pallas"}), "v5e:2x2",
                             steps=("train",))
    assert report.steps[0].compiled, report.steps[0].error


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_hope_mosaic_kernel_compiles_for_tpu(monkeypatch):
    """HopeLM's linear M_memory (decisions #25) runs through the Mosaic kernel on TPU inside
    the full model (the coupled MLP memories on the XLA dual form beside it): the train step,
    forward and backward, compiled by libtpu for real, and the kernel is what was traced."""
    from nested_jax.memory import pallas

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    kernels, part = [], pallas._kernel_part

    def record(level, pl_, *args):
        kernels.append(pl_.kernel)
        return part(level, pl_, *args)

    monkeypatch.setattr(pallas, "_kernel_part", record)
    report = aot.compile_for(_cfg("hope", **{"model.memory_impl": "pallas"}), "v5e:2x2",
                             steps=("train",))
    assert report.steps[0].compiled, report.steps[0].error
    assert kernels and set(kernels) == {"mosaic"}, kernels


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_batch_that_does_not_split_is_refused_before_compiling():
    with pytest.raises(ValueError, match="data.batch_size"):
        aot.compile_for(_cfg("transformer", **{"data.batch_size": 6}), "v5e:2x2")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_splash_attention_compiles_for_tpu_per_shard():
    """Transformer++ attention through the Pallas splash kernel, compiled by libtpu for a v5e
    2x2 slice (batch split over 4 chips, the kernel inside shard_map): train, eval, decode.
    Head dim 64 (the 125M and 340M presets' width; tiny's is 16).  ("auto" picks the same
    kernel under the TPU target: tests/models/test_splash_attention.py.)"""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    cfg = _cfg("transformer", **{"model.attention_impl": "splash", "model.n_heads": 1,
                                 "data.seq_len": 256})
    report = aot.compile_for(cfg, "v5e:2x2")
    for r in report.steps:
        assert r.compiled, (r.step, r.error)
        assert 0 < r.total_bytes < report.hbm_bytes, r


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
@pytest.mark.parametrize("model", ["hope", "hope_attention"])
def test_tpu_decode_gathers_the_tied_table_a_fixed_number_of_times(model, tmp_path):
    """HopeLM's decode step compiled for v5e 2x2 under FSDP gathered the tied table once per
    CMS level per block (31 gathers at the tiny preset; at 340M on v5e-16 10.95 GiB of
    temporaries a chip).  With the teach head's table asked for whole, the gathers are the
    embedding lookup's, the LM head's and the teach head's: at most 3, for any depth."""
    import re

    import jax

    from nested_jax.kernels import target_platform
    from nested_jax.train import sharding, trainer

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    cfg = _cfg(model, **{"mesh.data": 1, "mesh.fsdp": 4})
    devices = aot.topology_devices("v5e:2x2")
    run = trainer.prepare(cfg, str(tmp_path), devices, for_training=False)
    params, rest = run.abstract_state["params"], run.abstract_state["rest"]
    V, D = jax.tree.leaves(params["embed"])[0].shape
    with target_platform("tpu"), sharding.mesh_context(run.mesh):
        hlo = aot._decode_lowering(run, params, rest, 8).compile().as_text()
    gathers = re.findall(r"= \w+\[(\d+),(\d+)\]\S* all-gather(?:-start)?\(", hlo)
    assert 0 < sum((int(a), int(b)) == (V, D) for a, b in gathers) <= 3


@pytest.mark.parametrize("model", ["transformer", "hope"])
def test_decode_cache_is_split_by_batch_not_replicated(model, tmp_path):
    """The decode step's state is split over the mesh along each leaf's batch axis, wherever it
    sits: Transformer++ stacks its KV cache as [L, B, S, G, K], so the batch is axis 1.  On 4
    simulated CPU devices (data=4); the same lowering serves the TPU compile."""
    import jax

    from nested_jax.train import trainer

    cfg = _cfg(model)
    run = trainer.prepare(cfg, str(tmp_path), jax.devices()[:4], for_training=False)
    params, rest = run.abstract_state["params"], run.abstract_state["rest"]
    lowered = aot._decode_lowering(run, params, rest, 12)  # 12: no other dim has it
    cache_shardings = jax.tree.leaves(lowered.compile().input_shardings[0][2])
    cache = jax.tree.leaves(lowered.args_info[0][2])
    split = 0
    for leaf, sh in zip(cache, cache_shardings, strict=True):
        shape = leaf.shape
        if 12 in shape:
            axis = shape.index(12)
            assert sh.shard_shape(shape)[axis] == 3, (shape, sh)  # 12 sequences over 4 chips
            split += 1
    assert split >= 2


def _report(flops, bytes_, microbatches, model_flops=4e12):
    train = aot.StepReport("train", True, 1.0, flops=flops, bytes_accessed=bytes_)
    return aot.CompileReport(
        topology="v5e:2x2", num_slices=1, chips=4, device_kind="TPU v5 lite",
        hbm_bytes=16 * 2**30, hbm_bandwidth=1e12, peak_flops=1e14, model="transformer",
        preset="tiny", n_params=1, mesh={"data": 4}, tokens_per_step=1,
        model_flops_per_step=model_flops, steps=[train], microbatches=microbatches)


def test_mfu_ceiling_counts_every_microbatch():
    """XLA counts the microbatch scan's body once: the ceiling uses it grad_accum times.
    Per chip the model does 1e12 FLOPs; XLA's body counts 0.6e12 FLOPs and 3e9 bytes, so
    over 2 microbatches the step is compute-bound at 1.2e12 FLOPs: ceiling 1 / 1.2."""
    report = _report(0.6e12, 3e9, 2)
    assert report.train_counts() == (1.2e12, 6e9)
    assert abs(report.mfu_ceiling() - 1 / 1.2) < 1e-12
    # memory-bound: 2 x 2e11 bytes at 1e12 B/s = 0.4 s against 0.012 s of compute
    assert abs(_report(0.6e12, 2e11, 2).mfu_ceiling() - 1e12 / (1e14 * 0.4)) < 1e-12


def test_mfu_ceiling_refused_when_xla_counts_less_than_the_model():
    """A loop inside the model (a chunk scan) counted once, or a Pallas kernel XLA cannot
    see, leaves XLA's count below the model's FLOPs: no ceiling rather than one above 100%."""
    report = _report(0.6e12, 0.3e11, 1)
    assert report.mfu_ceiling() is None
    assert "below the model's" in report.text()
