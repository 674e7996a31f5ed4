"""Bounded read-ahead for medseg's Ray Datasets, in place of Ray Data's per-operator budgets.

Why: Ray 2.60's per-operator budgets (`ReservationOpResourceAllocator`) size themselves from
the autoscaling coordinator's reservation, which on a fixed cluster reads 0 CPUs while fewer
read tasks run than there are CPUs; on 2 CPUs that held the read tasks to ~1.25 at a time and
left the CPUs a third idle (README, "Performance: ingest"). With the budgets off
(`DataContext.op_resource_reservation_enabled = False`) nothing else limits an operator: it
submits every read task of the epoch at once, and the finished blocks pile up in the object
store behind a consumer slower than the reads.

`ReadAheadCap` bounds the work an operator has in flight, counted in tasks: its submitted
tasks (running or queued at the raylet) plus its finished blocks that wait in the executor's
queues for the consumer (what the iterator has already fetched is bounded by its own
`prefetch_batches`); medseg's read tasks emit one block each.
A new task is admitted while that count is under `read_ahead` x the cluster's task slots (its
CPUs, less those excluded for Ray Train's workers, over the CPUs one task asks for). So memory
stays within that many blocks however large the archive, and a factor above 1 keeps a task
queued at each raylet, which starts the moment a CPU frees instead of a scheduling round trip
later.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.data._internal.execution.backpressure_policy import (
    ENABLED_BACKPRESSURE_POLICIES,
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    BackpressurePolicy,
)
from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer

from pipelines.cluster import cluster_resources, task_slots

FACTOR_KEY = "medseg.read_ahead"
_SLOTS_REFRESH_S = 10.0   # the cluster may autoscale


class ReadAheadCap(BackpressurePolicy):
    """Admit a task while the operator's tasks in flight + unconsumed blocks < factor x slots."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resources: dict[str, float] = {}
        self._resources_at = -math.inf

    @property
    def name(self) -> str:
        return "MedsegReadAheadCap"

    def _slots(self, op: Any) -> int:
        now = time.monotonic()
        if now - self._resources_at > _SLOTS_REFRESH_S:  # one cluster query per interval
            self._resources, self._resources_at = cluster_resources(), now
        # what Ray Train's DataConfig holds back for its workers; deprecated in Ray 2.60 (to
        # go after January 2027): without it the slots count those CPUs too, nothing breaks
        held = getattr(self._data_context.execution_options, "exclude_resources", None)
        excluded = getattr(held, "cpu", None) or 0.0
        return task_slots(op.per_task_resource_allocation().cpu or 1.0,
                          resources=self._resources, exclude_cpus=excluded)

    def can_add_input(self, op: Any) -> bool:
        factor = self._data_context.get_config(FACTOR_KEY)
        if factor is None or isinstance(op, InputDataBuffer):
            return True
        queued = self._topology[op].total_enqueued_output_blocks()
        return op.num_active_tasks() + queued + 1 <= max(1.0, float(factor) * self._slots(op))


def cap_read_ahead(context: Any, factor: float | None) -> None:
    """Turn Ray Data's per-operator reservations off on `context` (a Dataset's DataContext)
    and bound each operator's read-ahead at `factor` x task slots instead (None: no bound)."""
    context.op_resource_reservation_enabled = False
    context.set_config(FACTOR_KEY, None if factor is None else float(factor))
    policies = list(context.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                                       ENABLED_BACKPRESSURE_POLICIES))
    if ReadAheadCap not in policies:
        context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*policies, ReadAheadCap])
