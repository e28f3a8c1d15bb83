"""The event envelope and one pydantic model per event type.

Everything on the wire is UTF-8 JSON. Models keep unknown fields (``extra="allow"``)
so a newer producer never loses data in an older consumer. ``decode`` turns bytes into
a typed event or raises :class:`EventDecodeError` naming the field and the reason.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Final, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import SchemaValidator, core_schema

from horizons_platform.ids import uuid7

SCHEMA_VERSION = 1

JOB_SUBMITTED: Final = "job.submitted"
JOB_STARTED: Final = "job.started"
JOB_COMPLETED: Final = "job.completed"
JOB_FAILED: Final = "job.failed"
JOB_CANCELLED: Final = "job.cancelled"
JOB_METRICS: Final = "job.metrics"
HEALTH_ALERT: Final = "health.alert"
HEALTH_RECOVERED: Final = "health.recovered"
CONSUMER_STARTED: Final = "consumer.started"
CONSUMER_STOPPED: Final = "consumer.stopped"
CONSUMER_BROKER_LOST: Final = "consumer.broker_lost"
AUDIT_RECORD: Final = "audit.record"

# A W3C ``traceparent``: version-traceid(32 hex)-spanid(16 hex)-flags.
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

LIFECYCLE_TYPES = (JOB_SUBMITTED, JOB_STARTED, JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED)
TERMINAL_TYPES = (JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED)

# The job status each lifecycle event leads to, and how far along the state machine it
# is: a job's stored state only moves forward, whatever order (or how often) its events
# arrive — a replayed job.started never reopens a completed job.
JOB_STATUS_OF = {
    JOB_SUBMITTED: "submitted",
    JOB_STARTED: "running",
    JOB_COMPLETED: "completed",
    JOB_FAILED: "failed",
    JOB_CANCELLED: "cancelled",
}
JOB_STATUS_RANK = {"submitted": 0, "running": 1, "completed": 2, "failed": 2, "cancelled": 2}


class _Open(BaseModel):
    """Base for every wire model: unknown fields survive a decode/encode round trip.
    Numbers are finite: JSON has no NaN or Infinity, yet a parser admits them (and
    ``1e400`` is Infinity), and one such duration poisons every rollup over it."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)


# What the store's BIGINT columns (and every reader's int64) hold: a larger number was
# valid to one group and refused by another's insert (one verdict for every group).
INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Instants a datetime can hold in UTC: 9999-12-31T23:59-14:00 is in year 10000 in UTC,
# which DuckDB stores but Python reads back only as text. (Compared as instants.)
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)


# --- payloads -------------------------------------------------------------------------


@lru_cache(maxsize=65_536)
def _owner_address(value: str) -> str:
    """The normalised address, or ValueError. Cached: a full email-validator check costs
    ~34 µs and a stream has few distinct owners (a cache hit costs ~0.1 µs)."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"value is not a valid email address: {exc}") from None


# The job owner's e-mail address, validated where the event enters (email-validator):
# CR/LF, a second address or a display name never get as far as an e-mail header.
Owner = Annotated[str, AfterValidator(_owner_address)]


class JobSubmittedPayload(_Open):
    owner: Owner
    job_type: str
    priority: Int64 = 0
    params: dict[str, Any] = Field(default_factory=dict)


class JobStartedPayload(_Open):
    owner: Owner
    job_type: str
    worker: str


class JobCompletedPayload(_Open):
    owner: Owner
    job_type: str
    output_bytes: Count = 0


class JobFailedPayload(_Open):
    owner: Owner
    job_type: str
    error: str
    exit_code: Int64 | None = None


class JobCancelledPayload(_Open):
    owner: Owner
    job_type: str
    reason: str = ""
    cancelled_by: str = ""


class JobMetricsPayload(_Open):
    job_type: str
    outcome: Literal["completed", "failed", "cancelled"]
    duration_s: float = Field(ge=0)
    queue_time_s: float = Field(ge=0)
    cpu_hours: float = Field(default=0.0, ge=0)
    bytes_processed: Count = 0
    peak_memory_mb: float = Field(default=0.0, ge=0)


class HealthAlertPayload(_Open):
    alert_id: str
    rule: str
    severity: Literal["info", "warning", "critical"]
    subject: str
    value: float
    threshold: float
    message: str = ""


class HealthRecoveredPayload(_Open):
    alert_id: str
    rule: str
    subject: str
    value: float
    threshold: float


class ConsumerPayload(_Open):
    consumer_group: str
    host: str
    pid: Int64
    detail: str = ""


class AuditRecordPayload(_Open):
    action: str  # e.g. "health.alert.raised", "retention.run"
    actor: str
    details: dict[str, Any] = Field(default_factory=dict)


# --- envelope -------------------------------------------------------------------------


class Envelope(_Open):
    event_id: uuid.UUID
    event_type: str
    job_id: str | None = None
    occurred_at: AwareDatetime = Field(ge=EARLIEST, le=LATEST)
    producer: str
    schema_version: int = Field(default=SCHEMA_VERSION, ge=0, le=2**31 - 1)  # an INTEGER
    trace_id: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)


class _JobEvent(Envelope):
    job_id: str = Field(min_length=1)


class JobSubmitted(_JobEvent):
    event_type: Literal["job.submitted"] = JOB_SUBMITTED
    payload: JobSubmittedPayload


class JobStarted(_JobEvent):
    event_type: Literal["job.started"] = JOB_STARTED
    payload: JobStartedPayload


class JobCompleted(_JobEvent):
    event_type: Literal["job.completed"] = JOB_COMPLETED
    payload: JobCompletedPayload


class JobFailed(_JobEvent):
    event_type: Literal["job.failed"] = JOB_FAILED
    payload: JobFailedPayload


class JobCancelled(_JobEvent):
    event_type: Literal["job.cancelled"] = JOB_CANCELLED
    payload: JobCancelledPayload


class JobMetrics(_JobEvent):
    event_type: Literal["job.metrics"] = JOB_METRICS
    payload: JobMetricsPayload


class HealthAlert(Envelope):
    event_type: Literal["health.alert"] = HEALTH_ALERT
    payload: HealthAlertPayload


class HealthRecovered(Envelope):
    event_type: Literal["health.recovered"] = HEALTH_RECOVERED
    payload: HealthRecoveredPayload


class ConsumerStarted(Envelope):
    event_type: Literal["consumer.started"] = CONSUMER_STARTED
    payload: ConsumerPayload


class ConsumerStopped(Envelope):
    event_type: Literal["consumer.stopped"] = CONSUMER_STOPPED
    payload: ConsumerPayload


class ConsumerBrokerLost(Envelope):
    event_type: Literal["consumer.broker_lost"] = CONSUMER_BROKER_LOST
    payload: ConsumerPayload


class AuditRecord(Envelope):
    event_type: Literal["audit.record"] = AUDIT_RECORD
    payload: AuditRecordPayload


Event = Annotated[
    JobSubmitted
    | JobStarted
    | JobCompleted
    | JobFailed
    | JobCancelled
    | JobMetrics
    | HealthAlert
    | HealthRecovered
    | ConsumerStarted
    | ConsumerStopped
    | ConsumerBrokerLost
    | AuditRecord,
    Field(discriminator="event_type"),
]

EVENT_TYPES: dict[str, type[Envelope]] = {
    JOB_SUBMITTED: JobSubmitted,
    JOB_STARTED: JobStarted,
    JOB_COMPLETED: JobCompleted,
    JOB_FAILED: JobFailed,
    JOB_CANCELLED: JobCancelled,
    JOB_METRICS: JobMetrics,
    HEALTH_ALERT: HealthAlert,
    HEALTH_RECOVERED: HealthRecovered,
    CONSUMER_STARTED: ConsumerStarted,
    CONSUMER_STOPPED: ConsumerStopped,
    CONSUMER_BROKER_LOST: ConsumerBrokerLost,
    AUDIT_RECORD: AuditRecord,
}

_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def _as_dicts(node: Any) -> Any:
    """``node`` (a pydantic-core schema) with every model validated into a plain dict.

    Same fields, same validators, same errors, same verdict — only the output differs:
    building frozen model instances is half of what validating an event costs, and the
    consumers' hot path only reads fields. The models stay the one definition.
    """
    if isinstance(node, list):
        return [_as_dicts(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "model":
        fields_schema = node["schema"]
        if fields_schema.get("type") != "model-fields":  # pragma: no cover - guards upgrades
            raise TypeError(f"unexpected model schema {fields_schema.get('type')!r}")
        fields = {}
        for name, model_field in fields_schema["fields"].items():
            inner = _as_dicts(model_field["schema"])
            fields[name] = core_schema.typed_dict_field(
                inner,
                required=inner.get("type") != "default",
                validation_alias=model_field.get("validation_alias"),
            )
        config = node.get("config", {})
        extra = config.get("extra_fields_behavior", "ignore")
        return core_schema.typed_dict_schema(
            fields, extra_behavior=extra, ref=node.get("ref"), config=config or None
        )
    return {k: _as_dicts(v) for k, v in node.items()}


def _ids_as_text(node: Any) -> Any:
    """``node`` with every UUID schema replaced by a string schema."""
    if isinstance(node, list):
        return [_ids_as_text(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "uuid":
        return core_schema.str_schema()
    return {k: _ids_as_text(v) for k, v in node.items()}


_DICT_VALIDATOR = SchemaValidator(_as_dicts(_ADAPTER.core_schema))
# The same validator with ids taken as text: what every event from our producers passes
# (see validate()).
_TEXT_ID_VALIDATOR = SchemaValidator(_ids_as_text(_as_dicts(_ADAPTER.core_schema)))
_CANONICAL_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
).fullmatch
EventDict = dict[str, Any]


class EventDecodeError(ValueError):
    """A message that is not a valid event. ``field`` is a dotted path, or ``None``."""

    def __init__(self, reason: str, field: str | None = None, kind: str = "invalid") -> None:
        self.reason = reason
        self.field = field
        self.kind = kind  # "malformed" (not JSON / not an object) or "invalid" (schema)
        super().__init__(f"{field}: {reason}" if field else reason)


def new_event(cls: type[Envelope], *, producer: str, **fields: Any) -> Any:
    """Build an event with a fresh id and the current UTC time unless given. The id is
    time-ordered (UUIDv7): the store's primary keys then stay cheap to checkpoint as it
    grows (ids.py)."""
    fields.setdefault("event_id", uuid7())
    fields.setdefault("occurred_at", datetime.now(UTC))
    return cls(producer=producer, **fields)


def encode(event: Envelope) -> bytes:
    return event.model_dump_json().encode("utf-8")


def audit_record(actor: str, action: str, details: dict[str, Any], producer: str) -> Any:
    """An ``audit.record`` for ``audit-trail`` (what the auditor stores, chained)."""
    return new_event(
        AuditRecord,
        producer=producer,
        payload={
            "action": action,
            "actor": actor,
            "details": {
                k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in details.items()
            },
        },
    )


def safe_text(value: object, limit: int = 1000) -> str:
    """Text that any UTF-8 store accepts: JSON may carry lone surrogates (\\ud800)."""
    return str(value)[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def headers_for(event: Envelope) -> list[tuple[str, bytes]]:
    headers = [
        ("event_type", event.event_type.encode()),
        ("schema_version", str(event.schema_version).encode()),
    ]
    if event.trace_id:  # W3C trace context, as every Kafka tracing integration reads it
        headers.append(("traceparent", event.trace_id.encode()))
    return headers


def decode(raw: bytes | None) -> Event:
    """Parse and validate one message value; the error names the first bad field."""
    if raw is None:
        raise EventDecodeError("message has no value (tombstone)", kind="malformed")
    try:
        return _ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise _describe(exc) from None


def validate(raw: bytes | None) -> EventDict:
    """:func:`decode`'s verdict and errors, as a plain dict (the consumers' hot path),
    with ``event_id`` as its canonical text."""
    if raw is None:
        raise EventDecodeError("message has no value (tombstone)", kind="malformed")
    # Every group stores the id as text. Validated as a UUID it comes out as an object
    # whose text is built by UUID.__str__, in Python: 5 % of the GIL in a four-group
    # host (py-spy --gil), and the id in an event from any of our producers is already
    # that canonical text. So the id is first taken as text and kept if canonical.
    try:
        event = _TEXT_ID_VALIDATOR.validate_json(raw)
        if _CANONICAL_UUID(event["event_id"]) is not None:
            return event
    except ValidationError:
        pass
    # Anything else — an invalid event, an id in another of UUID's spellings — is decided
    # by the validator with the UUID type: the models' verdict, error and canonical text.
    try:
        event = _DICT_VALIDATOR.validate_json(raw)
    except ValidationError as exc:
        raise _describe(exc) from None
    event["event_id"] = str(event["event_id"])
    return event


def _describe(exc: ValidationError) -> EventDecodeError:
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    if kind == "union_tag_invalid":
        tag = str(err.get("ctx", {}).get("tag", "?"))[:100]
        return EventDecodeError(f"unknown event_type {tag!r}", "event_type")
    if kind == "union_tag_not_found":
        return EventDecodeError("field required", "event_type")
    if (
        kind in ("json_invalid", "json_type", "model_type", "model_attributes_type", "dict_type")
        or not err["loc"]
    ):
        return EventDecodeError(f"not a JSON object: {err['msg']}", kind="malformed")
    loc = [str(p) for p in err["loc"]]
    # The discriminated union puts the event_type tag first in the location.
    if loc and loc[0] in EVENT_TYPES:
        loc = loc[1:]
    return EventDecodeError(err["msg"], ".".join(loc) or None)
