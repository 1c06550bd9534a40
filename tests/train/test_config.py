"""TrainConfig: --set overrides, coercion, errors naming the field, files, resume checks."""

import dataclasses

import pytest

from nested_jax.train import config as config_lib
from nested_jax.train import trainer
from nested_jax.train.config import TrainConfig


def test_set_overrides_parse_and_coerce():
    cfg = config_lib.apply_overrides(TrainConfig(), [
        "optim.learning_rate=3e-4", "steps=12", "data.path=some/dir", "bf16=true",
        "model.d_model=128", "optim.kwargs.ns_steps=3", "mesh.fsdp=2", "optim.grad_clip=1",
        "model.key_shift=false", "model.cms_first_order=True"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.steps == 12 and cfg.bf16 is True
    assert cfg.data.path == "some/dir" and cfg.mesh.fsdp == 2
    assert isinstance(cfg.optim.grad_clip, float)
    assert cfg.model_overrides == {"d_model": 128, "key_shift": False, "cms_first_order": True}
    assert cfg.optim.kwargs == {"ns_steps": 3}


@pytest.mark.parametrize("assignment, field", [
    ("optim.learnin_rate=1", "optim.learnin_rate"),
    ("steps=ten", "steps"),
    ("steps=0", "steps"),
    ("optim=3", "optim"),
    ("data.seq_len=-4", "data.seq_len"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("optim.schedule=step", "optim.schedule"),
    ("data.batch_size=10", "data.batch_size"),
    ("mesh.data=0", "mesh"),
    ("nonsense", "--set"),
])
def test_bad_values_name_the_field(assignment, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_lib.apply_overrides(TrainConfig(), ["optim.grad_accum=4", assignment])


def test_json_round_trip(tmp_path):
    cfg = config_lib.apply_overrides(TrainConfig(), ["model.n_layers=3", "optim.name=muon"])
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert TrainConfig.load(tmp_path / "c.json") == cfg


def test_python_config_file_with_variants(tmp_path):
    f = tmp_path / "my.py"
    f.write_text(
        "from nested_jax.train.config import TrainConfig\n"
        "def get_config(variant):\n"
        "    return TrainConfig(steps={'short': 5, None: 50}[variant])\n")
    assert config_lib.from_file(f"{f}:short").steps == 5
    assert config_lib.from_file(str(f)).steps == 50
    assert config_lib.from_file("lm:cpu_demo").preset == "small"
    with pytest.raises(ValueError, match="--config"):
        config_lib.from_file("no_such_config")


def test_resume_allows_only_resumable_changes(tmp_path):
    cfg = TrainConfig()
    (tmp_path / "config.json").write_text(cfg.to_json())
    trainer.check_resumable(dataclasses.replace(cfg, steps=5000, eval_every=7), tmp_path)
    changed = config_lib.apply_overrides(cfg, ["model.d_model=64", "optim.learning_rate=1"])
    with pytest.raises(trainer.ConfigMismatchError, match=r"(?s)model_overrides.*learning_rate"):
        trainer.check_resumable(changed, tmp_path)


def test_a_python_config_with_tuples_resumes_after_its_json_round_trip(tmp_path):
    # config.json reads tuples back as lists: a run configured from Python with
    # optim.kwargs.ns_skip=("levels",) must still resume (found by the LM optimizer suite),
    # and a value that really differs must still be refused.
    cfg = TrainConfig(model_overrides={"cms_chunk_sizes": (16, 64)},
                      optim=config_lib.OptimConfig(name="muon", kwargs={"ns_skip": ("levels",)}))
    (tmp_path / "config.json").write_text(cfg.to_json())
    trainer.check_resumable(cfg, tmp_path)
    other = dataclasses.replace(cfg, optim=dataclasses.replace(
        cfg.optim, kwargs={"ns_skip": ("levels", "memory_w")}))
    with pytest.raises(trainer.ConfigMismatchError, match=r"optim\.kwargs"):
        trainer.check_resumable(other, tmp_path)


def test_a_cut_off_config_json_is_named_with_its_fix(tmp_path):
    # (config.json is now written atomically; one cut short by a full disk or an older version
    # must still give the fix, not a JSON traceback)
    from nested_jax import cli

    (tmp_path / "config.json").write_text(TrainConfig().to_json()[:40])
    with pytest.raises(ValueError, match=r"config\.json is not a whole JSON config .*delete "
                       r".*config\.json and run again") as e:
        trainer.check_resumable(TrainConfig(), tmp_path)
    assert cli.exit_code(e.value) == cli.EXIT_CONFIG
