"""Hyperparameter search for the Siamese head (keras-tuner): embedding size, margin, learning rate, mining, hidden width.

    from tf_retrieval.tuning import tune
    result = tune(base_config, inputs[protocol.train], labels[protocol.train], "artifacts/tuning/run")
    # result.config_path: a TrainConfig JSON for `tfr train --config`

Needs the `tuning` extra (keras-tuner) and, for the plot, matplotlib. `tuning` imports `tf_retrieval`, never the reverse.
"""
from tf_retrieval.tuning.hypermodel import OBJECTIVE, SearchSpace, SiameseHyperModel
from tf_retrieval.tuning.tune import TuneResult, make_tuner, measure_index_cost, tune

__all__ = ["OBJECTIVE", "SearchSpace", "SiameseHyperModel", "TuneResult", "make_tuner", "measure_index_cost", "tune"]
