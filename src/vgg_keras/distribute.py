"""Which tf.distribute strategy trains, who writes the files, each worker's share of the input, and two fixes that
make Keras 3's fit() work under MultiWorkerMirroredStrategy (keras-team/keras#20585: upstream it fails on the first
batch)."""

import contextlib
import json
import os
import re

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as keras_tf_trainer


# A collective (one step's gradient all-reduce, a broadcast) that waits longer than this for a worker that is alive
# but stuck fails instead of waiting forever; a worker that died is noticed sooner, by the coordination service's
# heartbeats (TensorFlow's default: within ~10 s). It must exceed the longest a worker can lag behind the others,
# e.g. while the chief writes a checkpoint.
COLLECTIVE_TIMEOUT_ENV = "VGG_KERAS_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT = 1800  # seconds


def distribution_strategy():
    """MultiWorkerMirroredStrategy when TF_CONFIG is set (collectives time out after $VGG_KERAS_COLLECTIVE_TIMEOUT
    seconds, default 1800), else MirroredStrategy over the visible GPUs."""
    if os.environ.get("TF_CONFIG"):
        text = os.environ.get(COLLECTIVE_TIMEOUT_ENV, str(DEFAULT_COLLECTIVE_TIMEOUT))
        try:
            timeout = float(text)
            if timeout <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={text!r}: expected a positive number of seconds") from None
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return tf.distribute.MirroredStrategy()


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def fix_keras_for_multi_worker(model, strategy):
    """Keras 3's fit() builds the metrics by eagerly reducing one distributed batch across replicas, which
    fails under MultiWorkerMirroredStrategy (keras-team/keras#20585). The shapes of the local replica's
    batch are all that build needs."""
    if not is_multi_worker(strategy):
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


# ---------------------------------------------------------------------------------------------------------
# The chief decides, the others follow


def broadcast_from_chief(strategy, values):
    """The chief's `values` (a list of tensors or numpy arrays, the same shapes and dtypes on every worker) on every
    worker: one all-reduce in which only the chief's first replica contributes. Returns a list of eager tensors."""
    def contribute(*local):
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)  # replica 0 is the chief's first device
        local = [tf.where(first, v, tf.zeros_like(v)) for v in local]
        summed = [None] * len(local)
        # one all-reduce per dtype (it packs its tensors together), in the same order on every worker
        for dtype in sorted({v.dtype.name for v in local}):
            group = [i for i, v in enumerate(local) if v.dtype.name == dtype]
            for i, value in zip(group, context.all_reduce("SUM", [local[i] for i in group])):
                summed[i] = value
        return summed

    values = [tf.convert_to_tensor(v) for v in values]
    summed = strategy.run(tf.function(contribute), args=tuple(values))
    return [strategy.experimental_local_results(v)[0] for v in summed]


def broadcast_json(strategy, value):
    """The chief's JSON-serialisable `value` on every worker (`value` is ignored on the others)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32) if is_chief(strategy) else None
    (length,) = broadcast_from_chief(strategy, [np.array([0 if data is None else len(data)], np.int64)])
    (received,) = broadcast_from_chief(strategy, [data if data is not None else np.zeros(int(length[0]), np.int32)])
    return json.loads(received.numpy().astype(np.uint8).tobytes().decode())


def on_chief(strategy, fn, errors=(ValueError, FileExistsError, FileNotFoundError)):
    """fn() on the chief only, under MultiWorkerMirroredStrategy; every worker gets its (JSON) result, or raises its
    error (one of `errors`) with the chief's message. Elsewhere simply fn()."""
    if not is_multi_worker(strategy):
        return fn()
    outcome = None
    if is_chief(strategy):
        try:
            outcome = {"value": fn()}
        except errors as err:
            outcome = {"error": type(err).__name__, "message": str(err)}
    outcome = broadcast_json(strategy, outcome)
    if "error" in outcome:
        raise {error.__name__: error for error in errors}[outcome["error"]](outcome["message"])
    return outcome["value"]


def sync_from_chief(strategy, model):
    """Give every worker the chief's weights and optimizer state (after the chief restored a checkpoint or copied
    --init-from/--finetune-from weights): the others need no access to the run directory. The optimizer must be
    built (its variables created on every worker alike). No-op on one worker."""
    if not is_multi_worker(strategy):
        return
    variables = [v for v in model.weights + model.optimizer.variables
                 if v.dtype in ("float16", "bfloat16", "float32", "float64", "int32", "int64")]
    for variable, value in zip(variables, broadcast_from_chief(strategy, [v.value for v in variables])):
        variable.assign(value)


class WorkerLost(ConnectionError):
    """A worker of a multi-worker run stopped (died, or stopped answering): every worker stops."""


@contextlib.contextmanager
def worker_failures(strategy, epochs_done):
    """Turn TensorFlow's errors about a lost worker into WorkerLost, naming the worker and what to do next."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
            tf.errors.CancelledError) as err:
        if not is_multi_worker(strategy):
            raise
        raise WorkerLost(f"{lost_worker(strategy, err.message)} stopped: {_first_line(err.message)}. Every worker "
                         f"stops; the run directory keeps epoch {epochs_done()}: start every worker again with the "
                         "same command to resume after it") from None


def lost_worker(strategy, message):
    """'worker 2 of 2 (/job:worker/task:1, 127.0.0.1:2223)' for the task that TensorFlow's error names (the
    unhealthy task, else the remote one), 'a worker' when it names none."""
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    names = re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", message)
    me = (strategy.cluster_resolver.task_type, strategy.cluster_resolver.task_id)
    others = [(job, int(task)) for job, task in names if (job, int(task)) != me] or [
        (job, int(task)) for job, task in names]
    if not others:
        return "a worker"
    job, task = others[-1] if "unhealthy" not in message else others[0]
    order = [(j, t) for j in ("chief", "worker") for t in range(len(cluster.get(j, [])))]
    number = order.index((job, task)) + 1 if (job, task) in order else "?"
    address = cluster.get(job, [])[task] if task < len(cluster.get(job, [])) else "?"
    return f"worker {number} of {len(order)} (/job:{job}/task:{task}, {address})"


def _first_line(message):
    """TensorFlow's message without the op that saw it, its first line."""
    message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", message.strip())
    return message.split("\n")[0].split(" [type.googleapis")[0].rstrip(".")[:300]


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


# ---------------------------------------------------------------------------------------------------------
# Each worker's share of the input


class WorkerShare:
    """A data source as one worker's input pipeline sees it: `records` yields only this pipeline's share of a split
    (`source.records(..., shard=(index, count))`), and counts how far into it the pipeline read (`read`, when there
    are several pipelines).

    input_context: the `tf.distribute.InputContext` of `distribute_datasets_from_function` (or None: one pipeline).
    shuffle_seed: the seed of the split's shuffle, the same on every worker so that the shares partition the split;
    the `seed` that `records` is called with (the pipeline's augmentation seed) may differ per worker.
    """

    def __init__(self, source, input_context=None, shuffle_seed=None):
        self.source, self.shuffle_seed = source, shuffle_seed
        self.index = input_context.input_pipeline_id if input_context else 0
        self.count = input_context.num_input_pipelines if input_context else 1
        self.class_names = source.class_names
        self.read = tf.Variable(0, dtype=tf.int64, trainable=False)  # records of the share read, int64 scalar

    def num_examples(self, split):
        return self.source.num_examples(split)

    def records(self, split, shuffle=False, seed=None):
        seed = self.shuffle_seed if shuffle and self.shuffle_seed is not None else seed
        if self.count == 1:  # one input pipeline reads everything: nothing to shard, nothing to report
            return self.source.records(split, shuffle=shuffle, seed=seed)
        counter = self.read

        def count(position, record):
            # the furthest position reached in the share: a repeated pass (making up for skipped files) re-reads
            with tf.control_dependencies([counter.assign(tf.maximum(counter, position + 1))]):
                return {key: tf.identity(value) for key, value in record.items()}

        shard = (self.index, self.count)
        return self.source.records(split, shuffle=shuffle, seed=seed, shard=shard).enumerate().map(count)

    def describe(self, split):
        """'input: worker 1 of 2 read 1502 of 3000 records this epoch' (1-based worker number)."""
        return (f"input: worker {self.index + 1} of {self.count} read {int(self.read.numpy())} of "
                f"{self.num_examples(split)} records this epoch")


def distributed_epoch(strategy, make_dataset, global_batch):
    """Each input pipeline's (each worker's) own dataset, distributed: `make_dataset(input_context, batch)` builds it
    from its `WorkerShare`, batched by `batch` = global batch / replicas (per replica, so per worker global batch /
    workers on workers of equal size). Nothing is read twice: no auto-sharding of a finished pipeline."""
    return strategy.distribute_datasets_from_function(
        lambda context: make_dataset(context, context.get_per_replica_batch_size(global_batch)))


class InputShareLog(keras.callbacks.Callback):
    """Makes the epoch's `WorkerShare`s and prints, at the epoch's end, how many records each read (one line per
    worker, when there is more than one)."""

    def __init__(self):
        super().__init__()
        self.shares = []

    def share(self, source, input_context=None, shuffle_seed=None):
        share = WorkerShare(source, input_context, shuffle_seed)
        self.shares.append(share)
        return share

    def on_epoch_end(self, epoch, logs=None):
        for share in self.shares:
            if share.count > 1:  # on a line of its own, after Keras's progress bar
                print("\n" + share.describe("train"), flush=True)
        self.shares = []
