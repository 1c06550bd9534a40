"""`NestedJaxLM`: a trained run as an lm-evaluation-harness model, registered as "nested_jax".

    python -m nested_jax.harness --model nested_jax \\
        --model_args workdir=runs/demo,batch_size=8 --tasks piqa,hellaswag

lm-eval finds models only in its own registry (it has no plugin entry point), so the model
is registered when this module is imported: `python -m nested_jax.harness` does that and
then runs lm-eval's own command line, and from Python `import nested_jax.harness.adapter`
before `lm_eval.simple_evaluate(model="nested_jax", ...)`, or pass a `NestedJaxLM(...)`.

model_args (`key=value,...`; see `model_args.py`): workdir (required), batch_size (default 8;
it wins over lm-eval's --batch_size, whose default of 1 lm-eval always passes), max_length,
max_gen_toks, freeze, device.
Requires the `harness` extra: pip install 'nested_jax[harness]'.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-evaluation-harness model needs the optional extra: "
                      "pip install 'nested_jax[harness]'") from e

from nested_jax.config_checks import fail
from nested_jax.harness import model_args
from nested_jax.harness.scorer import Scorer

MAX_GEN_TOKS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@register_model("nested_jax")
class NestedJaxLM(LM):
    """lm-eval's LM interface over `nested_jax.harness.scorer.Scorer` (see the module doc)."""

    def __init__(self, **args: Any):
        super().__init__()
        args = model_args.parse(args)
        self.max_gen_toks = args["max_gen_toks"]
        device = model_args.jax_device(args["device"])
        self.scorer = Scorer.from_workdir(
            args["workdir"], batch_size=args["batch_size"], max_length=args["max_length"],
            freeze=args["freeze"], devices=None if device is None else [device], progress=True)
        self._device = device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """model_args, then lm-eval's own settings for keys model_args leaves unset (its
        --batch_size default of 1 is always passed and must not clash with batch_size=)."""
        from lm_eval import utils

        return cls._merged(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        return cls._merged(dict(arg_dict), additional_config)

    @classmethod
    def _merged(cls, args: dict, extra: dict | None):
        for k, v in (extra or {}).items():
            if v is not None and k not in args:
                args[k] = v
        return cls(**args)

    # ---- what lm-eval reads -------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.scorer.tokenizer.spec

    # ---- the three request types -----------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scores = self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])
        out = [(s.logprob, s.is_greedy) for s in scores]
        for r, o in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, o)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = self.scorer.loglikelihood_rolling([r.args[0] for r in requests])
        for r, o in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, o)
        return out

    def generate_until(self, requests) -> list[str]:
        out = self.scorer.generate_until(
            [(r.args[0], *self._gen_kwargs(r.args[1])) for r in requests])
        for r, o in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", r.args, o)
        return out

    def _gen_kwargs(self, kwargs: dict | None) -> tuple[list[str], int]:
        """(stop strings, max_gen_toks) of a request's generation kwargs; greedy only."""
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = next((kwargs[k] for k in MAX_GEN_TOKS_KEYS if kwargs.get(k) is not None),
                       self.max_gen_toks)
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
            fail("gen_kwargs", {k: kwargs.get(k) for k in ("do_sample", "temperature")},
                 "nested_jax decodes greedily only; pass --gen_kwargs do_sample=false,"
                 "temperature=0 or choose a task that does not sample")
        return until, int(max_gen)
