"""Optuna searches (`search:` in a study file) through Ray Tune's OptunaSearch."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import optuna
from ray.tune.search.optuna import OptunaSearch

from . import results
from .spec import config_hash

if TYPE_CHECKING:
    from .spec import StudySpec


class MultiObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch whose warm start also works with several objectives.

    Ray 2.60 hands a list of rewards to `optuna.trial.create_trial(value=...)`, which accepts one
    number only; several objectives go to `values=`.
    """

    def on_trial_complete(self, trial_id, result=None, error=False):
        """A trial whose objectives are missing or NaN is told to Optuna as FAIL (Optuna refuses NaN
        values, and Ray would only log its complaint): the sampler learns nothing from it."""
        values = [(result or {}).get(m) for m in self.metric] if isinstance(self.metric, list) else None
        if values and not error and result and any(v is None or not math.isfinite(v) for v in values) \
                and trial_id not in self._completed_trials:
            self._ot_study.tell(self._ot_trials[trial_id], None, state=optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def add_evaluated_point(self, parameters, value, error=False, pruned=False, intermediate_values=None):
        if not isinstance(value, (list, tuple)):
            return super().add_evaluated_point(parameters, value, error, pruned, intermediate_values)
        state = optuna.trial.TrialState.COMPLETE
        if error:
            state = optuna.trial.TrialState.FAIL
        elif pruned:
            state = optuna.trial.TrialState.PRUNED
        trial = optuna.trial.create_trial(
            state=state, values=None if state == optuna.trial.TrialState.FAIL else list(value),
            params=parameters, distributions=self._space,
        )
        self._ot_study.add_trial(trial)


def search_setup(spec: StudySpec, context, storage: str, max_concurrent: int | None):
    """Optuna over the search space, warm-started with the results this study already has."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .metrics import summary_metrics
    from .trainable import trial_config

    space = {
        key: (tune.loguniform if rng.get("log") else tune.uniform)(float(rng["low"]), float(rng["high"]))
        for key, rng in spec.search.space.items()
    }
    points, rewards = [], []
    table = results.own_evaluation(results.load(spec.name, storage))
    for chash, rows in table.groupby("config_hash") if len(table) else []:
        config = json.loads(rows["config_json"].iloc[0])
        point = {k: config[k] for k in spec.search.space}
        if config_hash(trial_config(point, context)) != chash:
            continue  # a result of different fixed settings: not a sample of this search
        summary = summary_metrics(config, rows.to_dict("records"))
        reward = [summary[o] for o in spec.search.objectives]
        if not all(math.isfinite(r) for r in reward):
            continue  # an objective it does not define (e.g. no ε_test >= ε_train): nothing to learn
        points.append(point)
        rewards.append(reward)
    searcher = MultiObjectiveOptunaSearch(
        metric=list(spec.search.objectives), mode=["max"] * len(spec.search.objectives),
        points_to_evaluate=points or None, evaluated_rewards=rewards or None,
        # A new seed per warm-start size: a re-run must not replay the samples it already has.
        seed=spec.seeds[0] * 10_007 + len(points),
    )
    limiter = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent or spec.search.max_concurrent)
    remaining = max(spec.search.num_samples - len(points), 0)
    return space, limiter, remaining, len(points)
