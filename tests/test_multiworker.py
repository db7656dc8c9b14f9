"""Training on several workers (MultiWorkerMirroredStrategy): each worker reads and decodes only its share of the
records, a lost worker stops the others with a message that names it, and a restart resumes on every worker."""

import csv
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

import vgg_keras
from vgg_keras.data import prepare
from vgg_keras.data.sources import FolderSource, load_source
from vgg_keras.data.tfrecords import TFRecordSource
from vgg_keras.distribute import WorkerShare, lost_worker

from test_data_sources import fake_ilsvrc
from test_train import ENV, make_folder_dataset


# --- each worker's share --------------------------------------------------------------------------------

def _shares(source, workers, seed=7):
    """The ids each worker's pipeline reads in one epoch, and what its counter says it read."""
    shares = [WorkerShare(source, tf.distribute.InputContext(workers, index, workers), shuffle_seed=seed)
              for index in range(workers)]
    # the records' seed is the worker's augmentation seed, different on each: the shuffle must not depend on it
    ids = [[record["id"] for record in share.records("train", shuffle=True, seed=100 + i).as_numpy_iterator()]
           for i, share in enumerate(shares)]
    return ids, [int(share.read.numpy()) for share in shares]


@pytest.mark.parametrize("kind", ["folders", "tfrecords by file", "tfrecords by record", "tfds"])
def test_worker_shares_partition_the_split(tmp_path, kind):
    if kind == "tfds":  # a fixed third of the records each (tfds.even_splits), shuffled anew each epoch
        fake_ilsvrc(tmp_path / "manual", wnids=("n01440764", "n01443537", "n01484850"), per_class=9)
        source = load_source("tfds:imagenet2012", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    else:
        source = FolderSource(make_folder_dataset(tmp_path / "data", classes=3, per_class=9))  # 27 training images
    if kind.startswith("tfrecords"):  # 9 shards split 3 + 3 + 3 over 3 workers; 2 shards cannot: split by record
        shards = 9 if kind == "tfrecords by file" else 2
        prepare(source, tmp_path / "records", shards=shards)
        source = TFRecordSource(tmp_path / "records")
    workers = 3
    ids, read = _shares(source, workers)
    everything = sorted(record["id"] for record in source.records("train").as_numpy_iterator())
    assert sorted(sum(ids, [])) == everything  # each record in exactly one share
    assert [len(share) for share in ids] == [9, 9, 9] and read == [9, 9, 9]
    again, _ = _shares(source, workers)
    assert again == ids  # the shuffle is seeded: every worker draws the same permutation
    other_epoch, _ = _shares(source, workers, seed=8)
    assert other_epoch != ids and sorted(sum(other_epoch, [])) == everything


def test_a_shuffled_share_needs_a_seed(tmp_path):
    source = FolderSource(make_folder_dataset(tmp_path / "data", classes=2, per_class=2))
    with pytest.raises(ValueError, match="give it a seed"):
        source.records("train", shuffle=True, shard=(0, 2))
    with pytest.raises(ValueError, match="shard \\(2, 2\\)"):
        source.records("train", shard=(2, 2))


def test_the_lost_worker_is_named():
    cluster = {"worker": ["127.0.0.1:1111", "127.0.0.1:2222"]}
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type="worker", task_id=0)
    strategy = type("Strategy", (), {"cluster_resolver": resolver})()
    heartbeat = ("{{function_node __wrapped__CollectiveReduceV2_device_/job:worker/replica:0/task:0/device:CPU:0}} "
                 "Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
                 "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.")
    assert lost_worker(strategy, heartbeat) == "worker 2 of 2 (/job:worker/task:1, 127.0.0.1:2222)"
    resolver.task_id = 1
    leader_gone = ("Failed to send RPC to coordination service. Additional GRPC error information from remote "
                   "target /job:worker/replica:0/task:0 while calling /tensorflow.CoordinationService/Heartbeat")
    assert lost_worker(strategy, leader_gone) == "worker 1 of 2 (/job:worker/task:0, 127.0.0.1:1111)"
    assert lost_worker(strategy, "Socket closed") == "a worker"


# --- two workers on 127.0.0.1: shares, a kill, a restart --------------------------------------------------

def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# One worker: the same training (config A at crop 32) on every worker; each saves the weights it ends with.
WORKER = textwrap.dedent("""
    import sys, numpy as np
    from vgg_keras.train import TrainConfig, train
    cfg = TrainConfig(config="A", data=sys.argv[1], run_dir=sys.argv[2], scale=(36, 44), crop=32, epochs=2,
                      batch_size=8, lr=0.001, init="glorot", seed=3)
    model, state = train(cfg, return_model=True)
    np.savez(sys.argv[3], *model.get_weights())
""")


def _start_workers(tmp_path, data, ports):
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}}
        log = open(tmp_path / f"w{index}.log", "w")
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(data), str(tmp_path / "run"), str(tmp_path / f"w{index}.npz")],
            env={**ENV, "TF_CONFIG": json.dumps(tf_config)}, stdout=log, stderr=subprocess.STDOUT))
    return workers


def _wait(workers, timeout):
    deadline = time.time() + timeout
    for worker in workers:
        worker.wait(timeout=max(1, deadline - time.time()))


@pytest.mark.slow
def test_two_workers_read_their_shares_survive_a_kill_and_resume(tmp_path):
    """Two workers, 25 training files (one empty) in batches of 8 (4 per worker): each reads its half. Worker 2 is
    killed in epoch 2: worker 1 stops within seconds, naming it; the same command on both resumes after epoch 1
    and ends with equal weights and epochs 1 and 2 in log.csv once each."""
    data = make_folder_dataset(tmp_path / "data", classes=3, per_class=8)
    (data / "train" / "class_0" / "empty.jpg").write_bytes(b"")  # skipped by one worker: the steps still agree
    ports = _free_ports(2)
    workers = _start_workers(tmp_path, data, ports)
    first_checkpoint = tmp_path / "run" / "checkpoints" / "epoch_0001.weights.h5"
    deadline = time.time() + 240
    while not first_checkpoint.exists() and all(w.poll() is None for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert first_checkpoint.exists(), (tmp_path / "w0.log").read_text()[-3000:]
    workers[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _wait(workers, 120)
    stopped_after = time.time() - killed
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert workers[0].returncode not in (0, None), logs[0][-3000:]
    assert stopped_after < 90  # the coordination service's heartbeats: ~10 s, however long a step waits
    assert f"worker 2 of 2 (/job:worker/task:1, 127.0.0.1:{ports[1]}) stopped" in logs[0], logs[0][-3000:]

    for index, log in enumerate(logs):  # epoch 1 ran to its end on both
        reads = [int(n) for n in re.findall(rf"input: worker {index + 1} of 2 read (\d+) of 25 records this epoch",
                                            log)]
        assert reads and abs(reads[0] - 12.5) <= 4, log[-3000:]  # its half, within one worker's batch
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epoch"] == 1

    ports = _free_ports(2)
    workers = _start_workers(tmp_path, data, ports)
    _wait(workers, 300)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for log in logs:
        assert f"Resuming {tmp_path / 'run'} after epoch {state['epoch']}" in log
    with open(tmp_path / "run" / "log.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2]
    first, second = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    initial = vgg_keras.build_vgg("A", num_classes=3, input_shape=(32, 32, 3), init="glorot", seed=3)
    assert not np.allclose(first["arr_0"], initial.get_weights()[0])  # they trained
    for key in first.files:
        np.testing.assert_allclose(first[key], second[key], atol=1e-6)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["replicas"] == 2
