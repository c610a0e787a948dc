"""Federated learning on Flower: partitions, client and server apps, secure aggregation (SecAgg+),
simulation on one machine. Flower is an optional dependency: ``pip install 'veil[fl]'``."""

from veil.fl.apps import STRATEGIES, RoundRecord, RoundRecorder, ServerSettings, client_app, server_app
from veil.fl.partition import (
           PartitionSpec,
           dirichlet_partition,
           iid_partition,
           label_histogram,
           partition,
           shard_partition,
)
from veil.fl.simulate import FLResult, simulate
from veil.fl.task import FLError, FLTask, build_model, check_update, local_train

__all__ = ["STRATEGIES", "FLError", "FLResult", "FLTask", "PartitionSpec", "RoundRecord", "RoundRecorder",
           "ServerSettings", "build_model", "check_update", "client_app", "dirichlet_partition", "iid_partition",
           "label_histogram", "local_train", "partition", "server_app", "shard_partition", "simulate"]
