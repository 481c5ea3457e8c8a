"""What an OP's discovery document says it offers, and which configured features it refuses.

The discovery document decides what is possible (issue 12, point 6). Two lists, each open to
extension by the modules that add a feature (``register_probe``, ``register_requirement``):

* **probes** describe one thing the document offers or not, as a line of ``bff check-config``
  (``offered``);
* **requirements** say why a provider's settings cannot work with this OP (``refusals``): a
  feature the config demands that the OP does not advertise, or a feature the config turns off
  that the OP requires.

``OidcClient`` applies the requirements to every discovery document it loads: a refused
provider is not used (its logins answer 503 with the reason, ``/readyz`` reports it, and
``oidc.feature_refused`` is logged at error level on each retry) until its OP's document allows
the config, so an OP that turns a feature on later is picked up without a restart.
``bff check-config`` reports the same refusals as errors (exit 1) and prints every probe.

A requirement must only read the document and the settings: no network, no state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from bff.config import OidcSettings

__all__ = [
    "Probe",
    "Requirement",
    "offered",
    "par_endpoint",
    "refusals",
    "register_probe",
    "register_requirement",
    "uses_par",
]

#: (document) -> a line about one feature (``"PAR: yes (https://...)"``).
Probe = Callable[[Mapping[str, Any]], str]
#: (the provider's settings, document) -> why they cannot work together, or None.
Requirement = Callable[["OidcSettings", Mapping[str, Any]], "str | None"]

TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105

_PROBES: list[Probe] = []
_REQUIREMENTS: list[Requirement] = []


def register_probe(probe: Probe) -> Probe:
    """Add a line to ``offered`` (usable as a decorator)."""
    _PROBES.append(probe)
    return probe


def register_requirement(requirement: Requirement) -> Requirement:
    """Add a check to ``refusals`` (usable as a decorator)."""
    _REQUIREMENTS.append(requirement)
    return requirement


def offered(doc: Mapping[str, Any]) -> list[str]:
    """One line per known feature: what this OP's discovery document offers."""
    return [probe(doc) for probe in _PROBES]


def refusals(settings: OidcSettings, doc: Mapping[str, Any]) -> list[str]:
    """Why these settings cannot work with this OP; empty when they can."""
    return [r for check in _REQUIREMENTS if (r := check(settings, doc)) is not None]


def par_endpoint(doc: Mapping[str, Any]) -> str | None:
    endpoint = doc.get("pushed_authorization_request_endpoint")
    return endpoint if isinstance(endpoint, str) and endpoint else None


def uses_par(settings: OidcSettings, doc: Mapping[str, Any]) -> bool:
    """``par: auto`` pushes whenever the OP has the endpoint; ``required`` always; ``off`` never
    (refused anyway when the OP requires it)."""
    return settings.par != "off" and par_endpoint(doc) is not None


def _yes(value: object) -> bool:
    return value is True


def _names(doc: Mapping[str, Any], key: str) -> list[str]:
    value = doc.get(key)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


# -- probes ----------------------------------------------------------------------------------


@register_probe
def _par(doc: Mapping[str, Any]) -> str:
    endpoint = par_endpoint(doc)
    if endpoint is None:
        return "pushed authorization requests (PAR, RFC 9126): no"
    required_by_op = _yes(doc.get("require_pushed_authorization_requests"))
    required = "required by the OP" if required_by_op else "optional"
    return f"pushed authorization requests (PAR, RFC 9126): yes, {required} ({endpoint})"


@register_probe
def _iss_parameter(doc: Mapping[str, Any]) -> str:
    supported = _yes(doc.get("authorization_response_iss_parameter_supported"))
    return f"iss in authorization responses (RFC 9207): {'yes' if supported else 'no'}"


@register_probe
def _dpop(doc: Mapping[str, Any]) -> str:
    algs = _names(doc, "dpop_signing_alg_values_supported")
    return f"DPoP (RFC 9449): {'yes, ' + ', '.join(algs) if algs else 'no'}"


@register_probe
def _token_exchange(doc: Mapping[str, Any]) -> str:
    grants = _names(doc, "grant_types_supported")
    if not grants:
        return "token exchange (RFC 8693): unknown (no grant_types_supported)"
    return f"token exchange (RFC 8693): {'yes' if TOKEN_EXCHANGE in grants else 'no'}"


@register_probe
def _resource_indicators(doc: Mapping[str, Any]) -> str:
    # RFC 8707 defines no metadata; some OPs say so in a non-standard key.
    for key in ("resource_indicators_supported", "resource_parameter_supported"):
        if key in doc:
            return f"resource indicators (RFC 8707): {'yes' if _yes(doc[key]) else 'no'} ({key})"
    return "resource indicators (RFC 8707): not knowable from discovery (no standard metadata)"


@register_probe
def _revocation(doc: Mapping[str, Any]) -> str:
    endpoint = doc.get("revocation_endpoint")
    shown = f"yes ({endpoint})" if isinstance(endpoint, str) and endpoint else "not in discovery"
    return f"revocation (RFC 7009): {shown}"


@register_probe
def _end_session(doc: Mapping[str, Any]) -> str:
    endpoint = doc.get("end_session_endpoint")
    shown = f"yes ({endpoint})" if isinstance(endpoint, str) and endpoint else "no"
    return f"RP-initiated logout (end_session_endpoint): {shown}"


@register_probe
def _backchannel(doc: Mapping[str, Any]) -> str:
    supported = _yes(doc.get("backchannel_logout_supported"))
    session = _yes(doc.get("backchannel_logout_session_supported"))
    shown = ("yes, with sid" if session else "yes, without sid") if supported else "no"
    return f"back-channel logout: {shown}"


# -- requirements ----------------------------------------------------------------------------


@register_requirement
def _par_requirement(settings: OidcSettings, doc: Mapping[str, Any]) -> str | None:
    required_by_op = _yes(doc.get("require_pushed_authorization_requests"))
    if settings.par == "required" and par_endpoint(doc) is None:
        return (
            f"par: required, but {settings.issuer} advertises no "
            "pushed_authorization_request_endpoint; set par: auto or off, or enable PAR at the OP"
        )
    if settings.par == "off" and required_by_op:
        return (
            f"par: off, but {settings.issuer} requires pushed authorization requests "
            "(require_pushed_authorization_requests); set par: auto or required"
        )
    if required_by_op and par_endpoint(doc) is None:
        return (
            f"{settings.issuer} requires pushed authorization requests but advertises no "
            "pushed_authorization_request_endpoint"
        )
    return None
