"""The scheduler replicas behind one gateway (DESIGN §9): each new request goes to the SERVING replica
with the fewest requests this gateway has in flight on it (exact counts, no polling), ties broken
round-robin, and travels on the gateway's Attach stream to that replica (gateway/attached.py); a request that fails
UNAVAILABLE before its first token is retried at once on another SERVING replica, and otherwise (or should that fail
too) waits for a SERVING replica within unavailable_retry_s of the first failure (a restarted scheduler, say) and is
submitted there again; a request sent when none is SERVING waits the same way. Abort goes to the replica that holds
the request. Each replica's GetStats feeds the dashboard, the readiness (a replica whose engine stopped stepping with
requests running is not ready) and the degraded state (its CPU pool is lost), its GetMetrics the gateway's /metrics."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from prometheus_client.metrics_core import Metric

from apex_serve import convert, metric_families, rpc, tracing
from apex_serve.errors import Unavailable
from apex_serve.types import WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, scheduler_pb2, scheduler_pb2_grpc
from gateway.attached import AttachedCall, AttachedScheduler

logger = logging.getLogger(__name__)

HEALTH_RETRY_S = 0.5  # between attempts to re-open the health watch of a replica that went away
# before a request is submitted again after a failure with no other replica to go to: the failed replica's health
# watch notices its loss meanwhile, and a replica that stays SERVING but fails every Submit is not hammered
RETRY_PAUSE_S = 0.5
PROGRESS_POLL_S = 1.0  # between the GetStats calls that watch a replica's engine for progress
# A replica that comes back is reconnected within seconds, not gRPC's default of up to two minutes.
_CHANNEL_OPTIONS = [*rpc.CHANNEL_OPTIONS, ("grpc.max_reconnect_backoff_ms", 2000)]
_SAME_MODEL_FIELDS = ("model_config_hash", "vocab_size", "max_model_len")


class ReplicaMismatch(ValueError):
    """The replicas do not serve the same model; the message names the replica and the field."""


@dataclass
class Replica:
    """One scheduler replica, and what this gateway knows of it without asking it."""

    address: str
    scheduler: AttachedScheduler  # a stub whose Submit rides the gateway's Attach stream to the replica
    health: health_pb2_grpc.HealthStub | None = None  # None: never watched, `serving` is set by its owner
    serving: bool = True
    in_flight: int = 0  # requests of this gateway running there now
    stalled: bool = False  # its engine ran no step for stall_timeout_s while it had requests running
    degraded: bool = False  # its CPU pool is lost: it serves on the accelerator only (as of its last GetStats)
    submitted: int = 0  # requests sent there since start (retries included)
    completed: int = 0  # of them, those that ended (finished, failed or cancelled)


@dataclass(frozen=True)
class ReplicaSnapshot:
    """A replica's routing counters and its scheduler's GetStats (None when it did not answer)."""

    address: str
    serving: bool
    in_flight: int
    submitted: int
    completed: int
    stats: scheduler_pb2.SchedulerStats | None
    error: str = ""


@dataclass(frozen=True)
class ReplicaMetrics:
    """A replica's engine metric families, or why it did not answer (families None)."""

    address: str
    families: list[Metric] | None
    error: str = ""


def check_same_model(infos: Sequence[tuple[str, WorkerInfo]]) -> None:
    """Raises ReplicaMismatch naming the first replica whose model differs from the first one's."""
    first_address, first = infos[0]
    for address, info in infos[1:]:
        for name in _SAME_MODEL_FIELDS:
            theirs, ours = getattr(info, name), getattr(first, name)
            if theirs != ours:
                raise ReplicaMismatch(
                    f"scheduler_address: replica {address} serves a different model than {first_address}: "
                    f"{name} {theirs!r} != {ours!r}"
                )


class Replicas:
    def __init__(self, replicas: Sequence[Replica], unavailable_retry_s: float = 0.0) -> None:
        """unavailable_retry_s: how long a request that found no SERVING replica (or failed UNAVAILABLE before its
        first token with none other to go to) waits for one; 0: it fails at once."""
        if not replicas:
            raise ValueError("replicas: need at least one scheduler replica")
        if unavailable_retry_s < 0:
            raise ValueError(f"unavailable_retry_s: must be >= 0, got {unavailable_retry_s}")
        self.replicas = tuple(replicas)
        self.unavailable_retry_s = unavailable_retry_s
        self._cursor = 0  # round-robin start among equally loaded replicas
        self._holders: dict[str, Replica] = {}  # request id -> the replica running it
        self._channels: list[grpc.aio.Channel] = []
        self._attached: list[AttachedScheduler] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._serving_again = asyncio.Event()  # set, then replaced, each time a replica turns SERVING

    @classmethod
    async def connect(
        cls, addresses: Sequence[str], timeout_s: float, unavailable_retry_s: float = 0.0
    ) -> tuple["Replicas", WorkerInfo]:
        """Waits until every replica is SERVING, checks they serve the same model, and watches their
        health. Returns the replicas and the (common) worker info; raises ReplicaMismatch or TimeoutError."""
        await asyncio.gather(*(rpc.wait_healthy(a, timeout_s=timeout_s) for a in addresses))
        channels = [
            grpc.aio.insecure_channel(a, options=_CHANNEL_OPTIONS, interceptors=tracing.client_interceptors())
            for a in addresses
        ]
        attached = [AttachedScheduler(scheduler_pb2_grpc.SchedulerStub(c)) for c in channels]
        replicas = [
            Replica(a, s, health_pb2_grpc.HealthStub(c)) for a, s, c in zip(addresses, attached, channels, strict=True)
        ]
        routed = cls(replicas, unavailable_retry_s)
        routed._channels = channels
        routed._attached = attached
        try:
            replies = await asyncio.gather(
                *(r.scheduler.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest()) for r in replicas)
            )
            infos = [convert.worker_info_from_pb(reply) for reply in replies]
            check_same_model(list(zip(addresses, infos, strict=True)))
        except BaseException:
            await routed.close()
            raise
        routed._watchers = [asyncio.create_task(routed._watch(r), name=f"health {r.address}") for r in replicas]
        return routed, infos[0]

    @property
    def serving(self) -> bool:
        return any(r.serving for r in self.replicas)

    @property
    def ready(self) -> bool:
        """A replica is SERVING and its engine is not stalled."""
        return any(r.serving and not r.stalled for r in self.replicas)

    @property
    def degraded(self) -> list[Replica]:
        """The ready replicas whose CPU pool is lost (they serve on the accelerator only)."""
        return [r for r in self.replicas if r.serving and not r.stalled and r.degraded]

    def watch_progress(self, stall_timeout_s: float, poll_s: float = PROGRESS_POLL_S) -> None:
        """Polls each replica's GetStats: keeps its degraded state, and marks it stalled while its scheduler reports
        requests running but no new step (or does not answer GetStats) for stall_timeout_s (0: never marked);
        close() ends the watch."""
        self._watchers += [
            asyncio.create_task(self._watch_progress(r, stall_timeout_s, poll_s), name=f"progress {r.address}")
            for r in self.replicas
        ]

    def pick(self, exclude: Replica | None = None) -> Replica | None:
        """The SERVING replica with the fewest requests in flight (round-robin among equals), or None."""
        candidates = [(i, r) for i, r in enumerate(self.replicas) if r.serving and r is not exclude]
        if not candidates:
            return None
        least = min(r.in_flight for _, r in candidates)
        n = len(self.replicas)
        index, choice = min(
            ((i, r) for i, r in candidates if r.in_flight == least), key=lambda ir: (ir[0] - self._cursor) % n
        )
        self._cursor = (index + 1) % n
        return choice

    def submit(
        self, request: scheduler_pb2.SubmitRequest, trace_context: otel_context.Context | None = None
    ) -> "RoutedCall":
        """Sends the request to the least-loaded replica (its Submit calls made in trace_context, when given). When
        none is SERVING: raises Unavailable if unavailable_retry_s is 0, else the call waits for one as it is
        iterated."""
        replica = self.pick()
        if replica is None and not self.unavailable_retry_s:
            raise _none_serving(self.replicas)
        return RoutedCall(self, request, replica, trace_context)

    async def wait_serving(self, deadline: float) -> Replica | None:
        """The SERVING replica pick() chooses, waiting until time.monotonic() reaches deadline for one to turn
        SERVING; None when none did."""
        while (replica := self.pick()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await self._serving_again.wait()
            except TimeoutError:
                return None
        return replica

    def hold(self, request_id: str, replica: Replica) -> None:
        replica.in_flight += 1
        replica.submitted += 1
        self._holders[request_id] = replica

    def release(self, request_id: str, replica: Replica) -> None:
        replica.in_flight -= 1
        replica.completed += 1
        if self._holders.get(request_id) is replica:
            del self._holders[request_id]

    async def abort(self, request_id: str) -> bool:
        """Aborts on the replica holding the request; a request this gateway does not hold (another
        gateway's, or finished) is asked of every SERVING replica. False when none had it."""
        holder = self._holders.get(request_id)
        targets = [holder] if holder is not None else [r for r in self.replicas if r.serving]
        replies = await asyncio.gather(
            *(r.scheduler.Abort(scheduler_pb2.AbortRequest(request_id=request_id)) for r in targets),
            return_exceptions=True,
        )
        if any(not isinstance(reply, BaseException) and reply.aborted for reply in replies):
            return True
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        if failures and len(failures) == len(replies):
            raise failures[0]  # nobody could say: the caller learns why
        return False

    async def snapshot(self, timeout_s: float = 2.0) -> list[ReplicaSnapshot]:
        """Every replica's counters and GetStats, asked concurrently."""
        replies = await asyncio.gather(
            *(r.scheduler.GetStats(scheduler_pb2.GetStatsRequest(), timeout=timeout_s) for r in self.replicas),
            return_exceptions=True,
        )
        snapshots = []
        for replica, reply in zip(self.replicas, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                stats, error = None, f"{reply.code().name}: {reply.details()}"
            elif isinstance(reply, BaseException):
                raise reply
            else:
                stats, error = reply, ""
            snapshots.append(
                ReplicaSnapshot(
                    replica.address, replica.serving, replica.in_flight, replica.submitted, replica.completed,
                    stats, error,
                )
            )
        return snapshots

    async def metric_families(self, timeout_s: float) -> list[ReplicaMetrics]:
        """Every replica's GetMetrics, asked concurrently; a replica that fails or times out has families None."""
        replies = await asyncio.gather(
            *(r.scheduler.GetMetrics(scheduler_pb2.GetMetricsRequest(), timeout=timeout_s) for r in self.replicas),
            return_exceptions=True,
        )
        answers = []
        for replica, reply in zip(self.replicas, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                answers.append(ReplicaMetrics(replica.address, None, f"{reply.code().name}: {reply.details()}"))
            elif isinstance(reply, BaseException):
                raise reply
            else:
                answers.append(ReplicaMetrics(replica.address, metric_families.from_pb(reply)))
        return answers

    async def _watch(self, replica: Replica) -> None:
        """Follows the replica's grpc.health.v1 status; a broken watch counts as NOT_SERVING until it
        can be opened again."""
        assert replica.health is not None
        while True:
            try:
                async for reply in replica.health.Watch(health_pb2.HealthCheckRequest(service="")):
                    self._set_serving(replica, reply.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError as exc:
                if replica.serving:
                    logger.warning("replica %s: health watch failed (%s)", replica.address, exc.code().name)
            self._set_serving(replica, False)
            await asyncio.sleep(HEALTH_RETRY_S)

    @staticmethod
    async def _watch_progress(replica: Replica, stall_timeout_s: float, poll_s: float) -> None:
        steps, running = -1, False
        progressed = time.monotonic()
        while True:
            try:
                stats = await replica.scheduler.GetStats(scheduler_pb2.GetStatsRequest(), timeout=poll_s)
            except grpc.aio.AioRpcError:
                stats = None
            now = time.monotonic()
            if stats is not None:
                running = stats.num_running > 0
                if stats.num_steps != steps or not running:
                    steps, progressed = stats.num_steps, now
                if stats.cpu_pool_degraded != replica.degraded:
                    if stats.cpu_pool_degraded:
                        logger.warning("replica %s: CPU pool lost, serving on the accelerator only", replica.address)
                    else:
                        logger.info("replica %s: CPU pool attached again", replica.address)
                    replica.degraded = stats.cpu_pool_degraded
            stalled = running and stall_timeout_s > 0 and now - progressed >= stall_timeout_s
            if stalled != replica.stalled:
                if stalled:
                    logger.warning("replica %s: no engine step for %.0f s with requests running: not ready",
                                   replica.address, now - progressed)
                else:
                    logger.info("replica %s: its engine steps again", replica.address)
                replica.stalled = stalled
            await asyncio.sleep(poll_s)

    def _set_serving(self, replica: Replica, serving: bool) -> None:
        if serving != replica.serving:
            logger.info("replica %s is %s", replica.address, "SERVING" if serving else "NOT_SERVING")
        replica.serving = serving
        if serving:
            self._serving_again.set()
            self._serving_again = asyncio.Event()

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for attached in self._attached:
            attached.close()
        await asyncio.gather(*(c.close() for c in self._channels))
        self._watchers, self._channels, self._attached = [], [], []


def _none_serving(replicas: Sequence[Replica]) -> Unavailable:
    return Unavailable(f"no scheduler replica is SERVING ({', '.join(r.address for r in replicas)})")


class RoutedCall:
    """One request on the replica it was routed to, over its Attach stream (None: none was SERVING; iterating waits
    for one). Iterate it for the scheduler's messages; cancel() ends it (a no-op when it is done) and frees its place
    in the replica's count. A waiting iteration ends early when its task is cancelled (the client went away)."""

    def __init__(
        self, replicas: Replicas, request: scheduler_pb2.SubmitRequest, replica: Replica | None,
        trace_context: otel_context.Context | None = None,
    ) -> None:
        self._replicas = replicas
        self._request = request
        self._trace_context = trace_context
        self._released = True
        self.replica = replica
        self._call: AttachedCall | None = None
        if replica is not None:
            self._start(replica)

    def _start(self, replica: Replica) -> None:
        self.replica = replica
        self._replicas.hold(self._request.request_id, replica)
        self._released = False
        # the submit carries the context current when it is made: a retry is the request span's child too
        token = None if self._trace_context is None else otel_context.attach(self._trace_context)
        try:
            self._call = replica.scheduler.Submit(self._request)
        finally:
            if token is not None:
                otel_context.detach(token)

    def _release(self) -> None:
        if not self._released and self.replica is not None:
            self._released = True
            self._replicas.release(self._request.request_id, self.replica)

    async def _first(self) -> tuple[scheduler_pb2.SubmitResponse | None, AsyncIterator[scheduler_pb2.SubmitResponse]]:
        """The first message and the stream it came on, after the retries an UNAVAILABLE before it allows: at once on
        another SERVING replica (once), else on the first replica SERVING within unavailable_retry_s of the first
        failure (or of the submission, when none was SERVING then)."""
        replicas, request_id = self._replicas, self._request.request_id
        window_end: float | None = None
        if self._call is None:
            window_end = time.monotonic() + replicas.unavailable_retry_s
            logger.warning("request %s: no scheduler replica is SERVING; waiting up to %.0f s for one", request_id,
                           replicas.unavailable_retry_s)
            if (replica := await replicas.wait_serving(window_end)) is None:
                raise _none_serving(replicas.replicas)
            self._start(replica)
        rerouted = False
        while True:
            messages = aiter(self._call)
            try:
                return await anext(messages, None), messages
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                failed = self.replica
                assert failed is not None  # the call that failed was made on it
                self._release()
                if window_end is None:
                    window_end = time.monotonic() + replicas.unavailable_retry_s
                other = None if rerouted else replicas.pick(exclude=failed)
                if other is not None:
                    logger.warning("request %s: replica %s UNAVAILABLE before the first token (%s); retrying on %s",
                                   request_id, failed.address, exc.details(), other.address)
                else:
                    if time.monotonic() >= window_end:
                        raise
                    logger.warning("request %s: replica %s UNAVAILABLE before the first token (%s); waiting for a "
                                   "SERVING replica", request_id, failed.address, exc.details())
                    await asyncio.sleep(min(RETRY_PAUSE_S, window_end - time.monotonic()))
                    if (other := await replicas.wait_serving(window_end)) is None:
                        raise
                rerouted = True
                self._start(other)

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        try:
            first, messages = await self._first()
            if first is None:
                return
            yield first
            async for msg in messages:
                yield msg
        finally:
            self._release()

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._release()
