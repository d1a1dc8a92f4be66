"""``ttt_mqar``, ``ttt_phonebook`` and ``ttt_passkey`` as lm-eval tasks: lm-eval's YAML task, plus an
aggregation (mean) and a direction (higher is better) for each per-length metric (``acc@L``,
``exact_match@L``), whose keys depend on the lengths in ``--metadata`` and so cannot be listed in
the YAML's ``metric_list``. Without them lm-eval warns once per key and guesses. A module of its
own: ``recall`` is read by the command line's help, which must not import lm-eval."""

from __future__ import annotations

from typing import Any

from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

PER_LENGTH_METRICS = ("acc", "exact_match")


def _per_length(key: str) -> bool:
    metric, at, length = key.partition("@")
    return metric in PER_LENGTH_METRICS and bool(at) and length.isdigit()


class _PerLengthAggregations(dict):
    def __missing__(self, key: str) -> Any:
        if _per_length(key):
            return mean
        raise KeyError(key)


class _PerLengthHigherIsBetter(dict):
    def __missing__(self, key: str) -> bool:
        if _per_length(key):
            return True
        raise KeyError(key)


class PerLengthTask(ConfigurableTask):
    """lm-eval's ConfigurableTask with the per-length metrics declared."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        # lm-eval hands the YAML's own "class" key to the class it names; ConfigurableTask rejects it
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config)

    def aggregation(self) -> dict[str, Any]:
        return _PerLengthAggregations(super().aggregation())

    def higher_is_better(self) -> dict[str, bool]:
        return _PerLengthHigherIsBetter(super().higher_is_better())
