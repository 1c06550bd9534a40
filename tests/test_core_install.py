"""The light core install (pyproject.toml: jax, optax, chex, numpy) serves the optimizers, the
memory engine and the kernels; the CLI names the `train` extra when its imports are missing.

Each check runs in a fresh interpreter whose import system refuses the `train` extra's
packages, as a core-only environment would."""

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    EXTRA = ("flax", "orbax", "grain", "tqdm", "tensorboardX", "matplotlib", "etils")

    class NoExtra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in EXTRA:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoExtra())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_optimizers_engine_and_kernels_import_and_run_without_the_train_extra():
    r = _run("""
        import jax, jax.numpy as jnp, optax
        from nested_jax import kernels, memory as nm, optim
        params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
        tx = optim.delta_momentum(1e-2)
        upd, _ = tx.update(params, tx.init(params), params)
        assert float(optax.global_norm(upd)) > 0
        level = nm.Level(nm.LinearMemory(4, 4), "l2", nm.DELTA)
        st = nm.broadcast_state(nm.init_state(level, jax.random.key(0), 1), 1)
        x = jnp.ones((1, 3, 1, 4)) / 2
        g = nm.Gates(*(jnp.full((1, 3, 1), 0.5) for _ in range(3)))
        o, _ = nm.apply(level, st, x, x, x, g, chunk_size=2)
        assert o.shape == (1, 3, 1, 4)
        assert not [m for m in sys.modules if m.split(".")[0] in EXTRA]
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_cli_names_the_train_extra_when_it_is_missing():
    r = _run("""
        from nested_jax import cli
        raise SystemExit(cli.main(["presets", "--model", "hope"]))
    """)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "pip install 'nested_jax[train]'" in r.stderr
