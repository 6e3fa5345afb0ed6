"""A PHI audit trail from the OpenTelemetry spans an application already produces.

Application teams should not write audit code. Add one call at start-up::

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from phiaudit.instrumentation import configure

    configure(OTLPSpanExporter(endpoint="http://127.0.0.1:4317", insecure=True))

or none at all::

    OTEL_PYTHON_DISTRO=phiaudit opentelemetry-instrument python app.py

and every request, query or export that touches PHI becomes an audit event: a span with
``phi.audit.event = true`` and the other ``phi.*`` attributes of the audit contract, which
the phiaudit receiver turns into encrypted, append-only audit records.

What is recognised out of the box (see :class:`ClassificationConfig` to extend it):

* FHIR REST under ``/fhir``: read, vread, history, search (GET, POST ``_search``),
  create, update, patch, delete, ``$everything``, ``$export``; resource type and id from
  the path; patients from the path or the ``patient``/``subject`` search parameters;
* your own routes (:class:`RouteRule`), e.g. ``/api/patients/{patient_id}/notes``;
* database client spans on the tables you declare PHI (``phi_tables``);
* ``/login`` and ``/logout``; 4xx answers on PHI routes are failed accesses.

The pieces, if you assemble them yourself:

* :class:`PhiSampler` wraps any sampler and always samples PHI spans;
* :class:`PhiSpanProcessor` tags PHI spans and hands them to an :class:`AuditDelivery`,
  which spools to disk and retries until the exporter acknowledges, so audit spans are
  never dropped silently (only past the spool cap, counted and reported);
* :func:`without_phi` keeps PHI spans out of your other span processors.

What the instrumentation cannot see, say explicitly: :func:`access`, :func:`disclosure`,
:func:`record_access`, :func:`annotate`, :func:`login`, :func:`logout`,
:func:`break_glass`, and :func:`identify` for who is acting.

Nothing here raises into the application: a faulty configuration is reported at start-up
and replaced by the defaults, and a faulty user callback is logged and ignored.
"""

from phiaudit.instrumentation._api import (
    AuditScope,
    access,
    annotate,
    audit_attributes,
    break_glass,
    disclosure,
    login,
    logout,
    record_access,
)
from phiaudit.instrumentation._attributes import Action, ActorType, Outcome
from phiaudit.instrumentation._classify import Classifier
from phiaudit.instrumentation._config import (
    ClassificationConfig,
    ConfigError,
    DeliveryConfig,
    InstrumentationConfig,
    InstrumentationError,
    RouteRule,
)
from phiaudit.instrumentation._configure import PhiAudit, configure
from phiaudit.instrumentation._delivery import DROPPED_METRIC, AuditDelivery
from phiaudit.instrumentation._processor import PhiSpanProcessor, without_phi
from phiaudit.instrumentation._sampler import PhiSampler
from phiaudit.instrumentation._users import (
    Actor,
    UserResolver,
    django_response_hook,
    flask_user,
    identify,
    user_from_request,
)

__all__ = [
    "DROPPED_METRIC",
    "Action",
    "Actor",
    "ActorType",
    "AuditDelivery",
    "AuditScope",
    "ClassificationConfig",
    "Classifier",
    "ConfigError",
    "DeliveryConfig",
    "InstrumentationConfig",
    "InstrumentationError",
    "Outcome",
    "PhiAudit",
    "PhiSampler",
    "PhiSpanProcessor",
    "RouteRule",
    "UserResolver",
    "access",
    "annotate",
    "audit_attributes",
    "break_glass",
    "configure",
    "disclosure",
    "django_response_hook",
    "flask_user",
    "identify",
    "login",
    "logout",
    "record_access",
    "user_from_request",
    "without_phi",
]
