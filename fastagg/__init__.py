"""fastagg: a fast server-side aggregator for asynchronous federated learning.

FedAsync and FedBuff merges, and FedADT: stale updates corrected by knowledge distillation
from the latest global model before they are merged. See README.md and DESIGN.md.
"""

from . import errors, schedules, staleness, wire
from .aggregator import Aggregator, Receipt
from .correction import KDCorrection, Teacher
from .distributed import DistributedAggregator
from .rules import FedAsync, FedBuff
from .wire import decode_update, encode_update

__version__ = "0.1.0"

__all__ = [
    "Aggregator", "DistributedAggregator", "Receipt", "KDCorrection", "Teacher", "FedAsync", "FedBuff",
    "encode_update", "decode_update", "errors", "schedules", "staleness", "wire",
]
