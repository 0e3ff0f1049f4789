"""The private ``trl.GRPOTrainer`` methods SoftPPOGRPOTrainer overrides or calls still have the parameters
it relies on (``r4t_fast.train.rl_trainer.OVERRIDDEN_TRL_HOOKS``), so a trl upgrade that changes them fails
here, by name, instead of silently dropping the soft-PPO terms or the KL metric."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from r4t_fast.train import rl_trainer

trl = pytest.importorskip("trl")


def _expected(spec: tuple) -> tuple[tuple[str, ...], bool]:
    """(parameter names, whether more may follow) of one OVERRIDDEN_TRL_HOOKS entry."""
    if spec and spec[-1] is Ellipsis:
        return tuple(spec[:-1]), True
    return tuple(spec), False


@pytest.mark.parametrize("hook", sorted(rl_trainer.OVERRIDDEN_TRL_HOOKS))
def test_trl_hook_signature_unchanged(hook: str) -> None:
    expected, open_ended = _expected(rl_trainer.OVERRIDDEN_TRL_HOOKS[hook])
    method = getattr(trl.GRPOTrainer, hook, None)
    assert method is not None, (
        f"trl {trl.__version__}: GRPOTrainer.{hook} no longer exists; SoftPPOGRPOTrainer overrides or calls "
        f"it with parameters {expected} (see r4t_fast.train.rl_trainer.OVERRIDDEN_TRL_HOOKS)"
    )
    actual = tuple(inspect.signature(method).parameters)
    got = actual[: len(expected)] if open_ended else actual
    assert got == expected, (
        f"trl {trl.__version__}: GRPOTrainer.{hook} changed its signature: expected parameters "
        f"{expected}{' followed by any others' if open_ended else ' exactly'}, got {actual}; "
        "update SoftPPOGRPOTrainer (r4t_fast.train.rl_trainer) and OVERRIDDEN_TRL_HOOKS"
    )


def test_every_trl_override_is_listed() -> None:
    """Each private GRPOTrainer method the subclass defines is checked above."""
    cls = rl_trainer.trainer_class()
    overridden = {
        name
        for name, value in vars(cls).items()
        if callable(value)
        and name.startswith("_")
        and not name.startswith("__")
        and hasattr(trl.GRPOTrainer, name)
    }
    missing = sorted(overridden - set(rl_trainer.OVERRIDDEN_TRL_HOOKS))
    assert not missing, f"SoftPPOGRPOTrainer overrides {missing}; add them to OVERRIDDEN_TRL_HOOKS"


def test_trl_config_fields_read_exist() -> None:
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    missing = [name for name in rl_trainer.TRL_CONFIG_FIELDS_READ if name not in fields]
    assert not missing, (
        f"trl {trl.__version__}: GRPOConfig has no field(s) {missing}, which SoftPPOGRPOTrainer reads "
        "from self.args (r4t_fast.train.rl_trainer.TRL_CONFIG_FIELDS_READ)"
    )
