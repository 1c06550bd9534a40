"""`python -m nested_jax.harness ARGS`: lm-eval's command line with "nested_jax" registered.

    python -m nested_jax.harness --model nested_jax --model_args workdir=runs/demo \\
        --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,social_iqa,boolq,lambada_openai

Every argument is lm-eval's own (`lm_eval --help`); this only imports the model first.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import nested_jax.harness.adapter  # noqa: F401  (registers the "nested_jax" model)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:  # pragma: no cover - an lm-eval without this entry point
        raise ImportError("this lm_eval has no lm_eval.__main__.cli_evaluate; install "
                          "'nested_jax[harness]' (lm_eval>=0.4.10)") from e
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "python -m nested_jax.harness"
    cli_evaluate()


if __name__ == "__main__":
    main()
