"""Load-time checks of a whole session document, cross-references included.

One small function per invariant; each raises ``SessionError`` with a message that names the
offending part, so that ``cloister session check`` tells the owner exactly what to fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from cloister.errors import SessionError
from cloister.session import _keys, template
from cloister.session._models import Attestation, SessionDocument


def _unique(what: str, names: Iterable[str]) -> None:
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise SessionError(f"{what} defined more than once: {', '.join(dupes)}")


def unique_names(doc: SessionDocument) -> None:
    _unique("service(s)", (s.name for s in doc.services))
    _unique("secret(s)", (s.name for s in doc.secrets))
    _unique("image(s)", (i.name for i in doc.images))


def images_exist(doc: SessionDocument) -> None:
    images = {i.name for i in doc.images}
    for s in doc.services:
        if s.image_name is not None and s.image_name not in images:
            raise SessionError(
                f"service {s.name!r} names image {s.image_name!r}, which is not defined"
            )


def issuers_exist(doc: SessionDocument) -> None:
    kinds = {s.name: s.kind for s in doc.secrets}
    for s in doc.secrets:
        if s.issuer is not None and kinds.get(s.issuer) != "x509-ca":
            raise SessionError(
                f"secret {s.name!r} names issuer {s.issuer!r}, which is not an x509-ca secret "
                "of this session"
            )
        if s.private_key is not None and kinds.get(s.private_key) != "private-key":
            raise SessionError(
                f"secret {s.name!r} names private_key {s.private_key!r}, which is not a "
                "private-key secret of this session"
            )


def placeholders_resolve(doc: SessionDocument) -> None:
    kinds = {s.name: s.kind for s in doc.secrets}
    for svc in doc.services:
        where = f"service {svc.name!r}"
        for arg in svc.argv() or []:
            _find_all(arg, kinds, f"{where} command")
        for key, value in svc.environment.items():
            _find_all(value, kinds, f"{where} environment {key}")
        if svc.pwd:
            _find_all(svc.pwd, kinds, f"{where} pwd")
    for image in doc.images:
        for f in image.injection_files:
            _find_all(f.content, kinds, f"image {image.name!r} file {f.path}")


def _find_all(text: str, kinds: Mapping[str, str], where: str) -> None:
    try:
        list(template.find(text, kinds))
    except SessionError as exc:
        raise SessionError(f"{where}: {exc.message}") from None


def services_are_measured(doc: SessionDocument) -> None:
    # An empty rule set is a load error, never a pass (cf. sigstore's AllOf refusing vacuity).
    for svc in doc.services:
        if not svc.attestation:
            raise SessionError(
                f"service {svc.name!r} has no attestation rule; every service needs at least "
                "one alternative with a measurement constraint"
            )
        for i, alt in enumerate(svc.attestation):
            if not any(getattr(alt, k) for k in Attestation.MEASUREMENT_KEYS[alt.tee]):
                keys = " or ".join(sorted(Attestation.MEASUREMENT_KEYS[alt.tee]))
                raise SessionError(
                    f"service {svc.name!r} attestation[{i}] ({alt.tee}) has no measurement "
                    f"constraint; give {keys}"
                )


def simulation_is_tolerated(doc: SessionDocument) -> None:
    tolerated = "simulation" in doc.security.attestation.tolerate
    for svc in doc.services:
        for i, alt in enumerate(svc.attestation):
            if alt.tee == "simulation" and not tolerated:
                raise SessionError(
                    f"service {svc.name!r} attestation[{i}] accepts simulation evidence, but "
                    "security.attestation.tolerate does not list 'simulation'"
                )


def access_policy_is_valid(doc: SessionDocument) -> None:
    for verb in ("read", "update"):
        entries = getattr(doc.access_policy, verb)
        if not entries:
            raise SessionError(f"access_policy.{verb} is empty; write NONE to deny everyone")
        if "NONE" in entries and len(entries) > 1:
            raise SessionError(f"access_policy.{verb}: NONE cannot be combined with other entries")
        for entry in entries:
            if entry in ("CREATOR", "NONE"):
                continue
            try:
                _keys.parse_public_key(entry)
            except ValueError as exc:
                raise SessionError(f"access_policy.{verb}: {exc}") from None


ALL: tuple[Callable[[SessionDocument], None], ...] = (
    unique_names,
    images_exist,
    issuers_exist,
    placeholders_resolve,
    services_are_measured,
    simulation_is_tolerated,
    access_policy_is_valid,
)


def check(doc: SessionDocument) -> None:
    for rule in ALL:
        rule(doc)
