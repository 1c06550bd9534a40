"""The TPU compile grid's batch rule and report (experiments/tpu_compile_grid.py).

Compiling needs libtpu and minutes per cell, so here: the batch each topology gets is valid
for the trainer's mesh on that many devices, and a logged cell (a real record's shape, built
from ``aot.as_record``) renders into the table and leaves the grid's to-do list.
"""

import pytest

from experiments import tpu_compile_grid as grid
from nested_jax.train import aot, config


@pytest.mark.parametrize("chips, batch, accum", [(8, 128, 16), (16, 128, 8), (32, 128, 4),
                                                 (256, 256, 1)])
def test_one_sequence_per_chip_per_microbatch(chips, batch, accum):
    settings = dict(grid.batch_settings(chips))
    assert settings == {"data.batch_size": batch, "optim.grad_accum": accum}
    assert batch // accum == chips


def test_a_logged_cell_is_a_row_and_leaves_the_todo_list():
    ok = aot.StepReport("train", True, 12.0, argument_bytes=2**30, temp_bytes=2**31)
    bad = aot.StepReport("eval", False, 3.0, error="RESOURCE_EXHAUSTED: 20 GB\nmore")
    rep = aot.CompileReport(
        topology="v5e:4x4", num_slices=1, chips=16, device_kind="TPU v5 lite",
        hbm_bytes=16 * 2**30, hbm_bandwidth=8.2e11, peak_flops=1.97e14, model="hope",
        preset="125M", n_params=126_300_000, mesh={"fsdp": 16}, tokens_per_step=524288,
        model_flops_per_step=1e15, steps=[ok, bad], microbatches=8)
    run = {"model": "hope", "preset": "125M", "topology": "v5e-16", "libtpu": "0.0.42.1",
           "blocks": "scan",
           "settings": dict(grid.batch_settings(16)), "seconds": 15.0,
           "date": "2026-12-01 05:00 UTC", "report": aot.as_record(rep)}
    text = grid.report([run], "python -m experiments.tpu_compile_grid")
    assert "| hope | 126.3 | 125M | v5e-16 | scan | 16 | 128 x 4096, accum 8 | train | yes | " \
           "12 | 3.00 GiB | yes |" in text
    assert "| eval | no | 3 | - | ? | RESOURCE_EXHAUSTED: 20 GB |" in text
    todo = text.split("Cells not yet compiled")[1]
    assert "hope/125M/v5e-16" not in todo and "hope/340M/v5e-16" in todo
    assert "(99 of 100)" in todo
    # A cell logged before the recipe scanned its blocks (no "blocks" field) was a loop: it
    # stays a row but is compiled again.
    old = {k: v for k, v in run.items() if k != "blocks"}
    text = grid.report([old], "python -m experiments.tpu_compile_grid")
    assert "| hope | 126.3 | 125M | v5e-16 | loop | 16 |" in text
    assert "(100 of 100)" in text.split("Cells not yet compiled")[1]


def test_the_recipe_scans_its_blocks():
    cfg, _ = grid.cell_config("transformer", "1.3B", 16)
    assert cfg.model_overrides["scan_layers"] is True and grid.recipe_blocks() == "scan"


def test_multislice_cells_are_data_parallel_across_slices():
    """The mesh's data axis must span the slices (``sharding.make_mesh`` refuses data=1 on two
    slices); FSDP stays inside each slice."""
    cfg, settings = grid.cell_config("transformer", "125M", 32, slices=2)
    assert cfg.mesh.data == 2 and cfg.mesh.fsdp == -1 and ("mesh.data", 2) in settings
    single, _ = grid.cell_config("transformer", "125M", 16)
    assert single.mesh.data == 1


def test_every_recipe_preset_loads():
    for p in grid.PRESETS:
        cfg = config.with_values(config.from_file(f"lm:{p}"), grid.batch_settings(16))
        assert cfg.preset == p and cfg.data.seq_len == 4096


def test_hope_is_compiled_with_the_memory_kernel_on_and_off():
    on, _ = grid.cell_config("hope", "125M", 16)
    off, settings = grid.cell_config("hope_xla", "125M", 16)
    assert on.model == off.model == "hope"
    assert "memory_impl" not in on.model_overrides  # the preset's "auto": the kernel on TPU
    assert off.model_overrides["memory_impl"] == "xla"
    assert ("model.memory_impl", "xla") in settings


def test_set_adds_a_setting_as_a_further_row():
    """``--set`` (a cell that does not fit as shipped, compiled again with what it needs): the
    setting reaches the config, replaces the batch rule's value for the same key, is shown in
    the batch column, and the recipe's row and the new one are each skipped only by
    themselves."""
    cfg, settings = grid.cell_config("hope_attention", "1.3B", 16,
                                     extra=config.parse_assignments(["mesh.tensor=2"]))
    assert cfg.mesh.tensor == 2 and settings[-1] == ("mesh.tensor", 2)
    cfg, settings = grid.cell_config("transformer", "125M", 16,
                                     extra=[("optim.grad_accum", 16)])
    assert cfg.optim.grad_accum == 16 and dict(settings)["optim.grad_accum"] == 16
    assert [k for k, _ in settings].count("optim.grad_accum") == 1

    recipe = grid.cell_config("hope_attention", "1.3B", 16)[1]
    tensor = grid.cell_config("hope_attention", "1.3B", 16, extra=[("mesh.tensor", 2)])[1]
    ok = aot.StepReport("train", True, 12.0, argument_bytes=2**30, temp_bytes=2**31)
    rep = aot.CompileReport(
        topology="v5e:4x4", num_slices=1, chips=16, device_kind="TPU v5 lite",
        hbm_bytes=16 * 2**30, hbm_bandwidth=8.2e11, peak_flops=1.97e14,
        model="hope_attention", preset="1.3B", n_params=1_318_000_000, mesh={"fsdp": 8},
        tokens_per_step=524288, model_flops_per_step=1e15, steps=[ok], microbatches=8)
    run = {"model": "hope_attention", "preset": "1.3B", "topology": "v5e-16", "blocks": "scan",
           "libtpu": "0.0.42.1", "settings": dict(tensor[1:]), "seconds": 15.0,
           "date": "2026-12-06 05:00 UTC", "report": aot.as_record(rep)}
    assert grid.logged([run], "hope_attention", "1.3B", "v5e-16", tensor)
    assert not grid.logged([run], "hope_attention", "1.3B", "v5e-16", recipe)
    assert not grid.logged([run], "hope_attention", "1.3B", "v5p-32", tensor)
    text = grid.report([run], "python -m experiments.tpu_compile_grid")
    assert "| 128 x 4096, accum 8, tensor=2 | train | yes |" in text


def test_a_bad_set_names_the_option():
    with pytest.raises(Exception, match="--set"):
        config.parse_assignments(["mesh.tensor"])
    with pytest.raises(Exception, match="mesh.tensr"):
        grid.cell_config("transformer", "125M", 16, extra=[("mesh.tensr", 2)])


def test_a_cell_another_shard_logged_meanwhile_is_not_compiled_again(tmp_path, monkeypatch):
    """Two shards side by side: a cell that the other process logs while this one compiles is
    skipped when this one reaches it, and the report covers both processes' cells."""
    import json

    monkeypatch.setattr(grid, "RESULTS", str(tmp_path))
    monkeypatch.setattr(aot, "check_libtpu", lambda: "0.0.42.1")
    monkeypatch.setattr(grid, "chips_of", lambda topology, slices: 8)  # v6e-8, without libtpu
    log = tmp_path / f"{grid.STEM}_runs.jsonl"

    def record(preset, settings):
        ok = aot.StepReport("train", True, 12.0, argument_bytes=2**30, temp_bytes=2**31)
        rep = aot.CompileReport(
            topology="v6e:2x4", num_slices=1, chips=8, device_kind="TPU v6 lite",
            hbm_bytes=32 * 2**30, hbm_bandwidth=1.6e12, peak_flops=9.2e14, model="transformer",
            preset=preset, n_params=123_700_000, mesh={"fsdp": 8}, tokens_per_step=524288,
            model_flops_per_step=1e15, steps=[ok], microbatches=16)
        return {"model": "transformer", "preset": preset, "topology": "v6e-8",
                "settings": dict(settings[1:]), "seconds": 1.0, "blocks": grid.recipe_blocks(),
                "date": "2026-12-06 05:00 UTC", "libtpu": "0.0.42.1",
                "report": aot.as_record(rep)}

    compiled = []

    def fake_compile(model, preset, topology, cfg, settings):
        compiled.append(preset)
        other = grid.cell_settings("transformer", "340M", "v6e-8")[1]
        with open(log, "a") as f:  # the other shard finishes 340M meanwhile
            f.write(json.dumps(record("340M", other)) + "\n")
        return record(preset, settings)

    monkeypatch.setattr(grid, "compile_cell", fake_compile)
    grid.main(["--models", "transformer", "--presets", "125M", "340M", "--topologies", "v6e-8"])
    assert compiled == ["125M"]
    assert len(log.read_text().splitlines()) == 2
    text = (tmp_path / f"{grid.STEM}.md").read_text()
    assert "| transformer | 123.7 | 125M | v6e-8 |" in text
    assert "| transformer | 123.7 | 340M | v6e-8 |" in text


def test_recompile_replaces_only_the_named_step_of_logged_cells(tmp_path, monkeypatch):
    """``--recompile decode``: the logged cell's decode step is compiled again and replaced,
    dated in its row and the table; its train step, other cells' rows and cells never logged
    are left alone."""
    import json

    monkeypatch.setattr(grid, "RESULTS", str(tmp_path))
    monkeypatch.setattr(aot, "check_libtpu", lambda: "0.0.42.1")
    monkeypatch.setattr(grid, "chips_of", lambda topology, slices: 8)  # v6e-8, without libtpu

    def compiled(steps, temp_gib):
        reports = [aot.StepReport(s, True, 5.0, argument_bytes=2**30, temp_bytes=temp_gib * 2**30)
                   for s in steps]
        return aot.CompileReport(
            topology="v6e:2x4", num_slices=1, chips=8, device_kind="TPU v6 lite",
            hbm_bytes=32 * 2**30, hbm_bandwidth=1.6e12, peak_flops=9.2e14, model="hope",
            preset="125M", n_params=126_300_000, mesh={"fsdp": 8}, tokens_per_step=524288,
            model_flops_per_step=1e15, steps=reports, microbatches=16)

    def row(preset, model="hope"):
        settings = grid.cell_settings(model, preset, "v6e-8")[1]
        return {"model": model, "preset": preset, "topology": "v6e-8",
                "settings": dict(settings[1:]), "seconds": 1.0, "blocks": grid.recipe_blocks(),
                "date": "2026-12-06 05:00 UTC", "libtpu": "0.0.42.1",
                "report": aot.as_record(compiled(("train", "decode"), 8))}

    log = tmp_path / f"{grid.STEM}_runs.jsonl"
    before = [row("125M"), row("125M", "hope_xla")]
    log.write_text("".join(json.dumps(r) + "\n" for r in before))
    asked = []

    def fake_compile_for(cfg, topology, slices, steps):
        asked.append((cfg.preset, steps))
        return compiled(steps, 1)

    monkeypatch.setattr(aot, "compile_for", fake_compile_for)
    grid.main(["--models", "hope", "--presets", "125M", "340M", "--topologies", "v6e-8",
               "--recompile", "decode"])
    assert asked == [("125M", ("decode",))]  # 340M was never logged: not compiled
    after = [json.loads(line) for line in log.read_text().splitlines()]
    assert after[1] == before[1]
    train, decode = after[0]["report"]["steps"]
    assert train == before[0]["report"]["steps"][0]
    assert decode["temp_bytes"] == 2**30 and set(after[0]["recompiled"]) == {"decode"}
    text = (tmp_path / f"{grid.STEM}.md").read_text()
    assert f"| decode (recompiled {after[0]['recompiled']['decode']}) | yes |" in text
