"""Which tf.distribute strategy trains, who writes the files, and two fixes that make Keras 3's fit()
work under MultiWorkerMirroredStrategy (keras-team/keras#20585: upstream it fails on the first batch)."""

import os

import tensorflow as tf
from keras.src.backend.tensorflow import trainer as keras_tf_trainer


def distribution_strategy():
    """MultiWorkerMirroredStrategy when TF_CONFIG is set, else MirroredStrategy over the visible GPUs."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()


def fix_keras_for_multi_worker(model, strategy):
    """Keras 3's fit() builds the metrics by eagerly reducing one distributed batch across replicas, which
    fails under MultiWorkerMirroredStrategy (keras-team/keras#20585). The shapes of the local replica's
    batch are all that build needs."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    _average_scalar_logs_across_workers()
    original = model._maybe_symbolic_build

    def build_from_local_batch(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0],
                                                   next(batches))
                break
        return original(data_batch=data_batch)

    model._maybe_symbolic_build = build_from_local_batch


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not os.environ.get("TF_CONFIG"):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())


def _average_scalar_logs_across_workers():
    """Keras reduces each step's logs with strategy.reduce("MEAN", v, axis=0), which fails on scalar metric
    values under MultiWorkerMirroredStrategy: reduce them with axis=None instead (the mean over replicas)."""
    original = keras_tf_trainer.reduce_per_replica
    if getattr(original, "fixed_for_multi_worker", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.fixed_for_multi_worker = True
    keras_tf_trainer.reduce_per_replica = reduce_per_replica
