"""Load-time checks of a whole session document, cross-references included.

One small function per invariant; each raises ``SessionError`` with a message that names the
offending part, so that ``cloister session check`` tells the owner exactly what to fix.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from cloister.errors import SessionError
from cloister.session import _access, template
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
    kinds = secret_kinds(doc)
    for s in doc.secrets:
        if s.issuer is not None and kinds.get(s.issuer) not in ("x509-ca", template.IMPORTED):
            raise SessionError(
                f"secret {s.name!r} names issuer {s.issuer!r}, which is not an x509-ca secret "
                "of this session"
            )
        if s.private_key is not None and kinds.get(s.private_key) not in (
            "private-key",
            template.IMPORTED,
        ):
            raise SessionError(
                f"secret {s.name!r} names private_key {s.private_key!r}, which is not a "
                "private-key secret of this session"
            )


def secret_kinds(doc: SessionDocument) -> dict[str, str]:
    """Secret name → kind; an imported secret without a declared kind is ``imported``."""
    return {s.name: s.kind or template.IMPORTED for s in doc.secrets}


def placeholders_resolve(doc: SessionDocument) -> None:
    placeholders_resolve_with(doc, secret_kinds(doc))


def placeholders_resolve_with(doc: SessionDocument, kinds: Mapping[str, str]) -> None:
    for svc in doc.services:
        where = f"service {svc.name!r}"
        for arg in svc.argv() or []:
            _find_all(arg, kinds, f"{where} command", "command")
        for key, value in svc.environment.items():
            _find_all(value, kinds, f"{where} environment {key}", "environment")
        if svc.pwd:
            _find_all(svc.pwd, kinds, f"{where} pwd", "pwd")
    for image in doc.images:
        for f in image.injection_files:
            _find_all(f.content, kinds, f"image {image.name!r} file {f.path}", "file")
    bound = {s.name for s in doc.secrets if s.is_workload_bound()}
    for svc in doc.services:
        used = next((i for i in doc.images if i.name == svc.image_name), None)
        texts = [*(svc.argv() or []), *svc.environment.values(), svc.pwd or ""]
        texts += [f.content for f in used.injection_files] if used else []
        for text in texts:
            for p in template.find(text, kinds, "file"):
                if p.secret in bound and p.format in ("key-der", "pkcs12"):
                    raise SessionError(
                        f"placeholder for {p.secret!r} as {p.spelled!r}: that certificate's key "
                        "is the workload's own and reaches it only as PEM (:key); give the "
                        "secret a private_key to use this format"
                    )


def _find_all(text: str, kinds: Mapping[str, str], where: str, context: template.Context) -> None:
    try:
        list(template.find(text, kinds, context))
    except SessionError as exc:
        raise SessionError(f"{where}: {exc.message}") from None


def host_arguments_are_distinct(doc: SessionDocument) -> None:
    # SCONE: a position asked for twice (@@1 @@1) is a fatal error.
    for svc in doc.services:
        positions = template.host_argument_positions(svc.argv() or [])
        dupes = sorted({p for p in positions if positions.count(p) > 1})
        if dupes:
            raise SessionError(
                f"service {svc.name!r} command asks for host argument(s) "
                f"{', '.join(f'@@{p}' for p in dupes)} more than once"
            )
        if 0 in positions:
            raise SessionError(
                f"service {svc.name!r}: host arguments count from @@1 (@@0 is the program)"
            )


def services_are_measured(doc: SessionDocument) -> None:
    # An empty rule set is a load error, never a pass (cf. sigstore's AllOf refusing vacuity).
    if doc.security.attestation.mode == "none":
        return  # attestation is off, loudly (see no_attestation_is_tolerated)
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
    for verb in ("read", "update", "create_sessions"):
        _access.parse(
            doc.access_policy.rules_for(verb),
            f"access_policy.{verb}",
            governance=verb != "read",
        )


def no_attestation_is_tolerated(doc: SessionDocument) -> None:
    att = doc.security.attestation
    if att.mode == "none" and "no-attestation" not in att.tolerate:
        raise SessionError(
            "security.attestation.mode: none switches attestation off, so anyone who reaches "
            "the CAS gets this session's secrets; it loads only with tolerate: [no-attestation] "
            "(development only)"
        )


def one_time_passwords_are_strong(doc: SessionDocument) -> None:
    kinds = secret_kinds(doc)
    where_values = [
        ("security.attestation", doc.security.attestation.one_time_password_shared_secret)
    ]
    where_values += [
        (f"service {s.name!r}", s.one_time_password_shared_secret) for s in doc.services
    ]
    for where, value in where_values:
        if value is None:
            continue
        refs = list(template.find(value, kinds, "environment"))
        if refs:
            ref = refs[0]
            secret = next(s for s in doc.secrets if s.name == ref.secret)
            if secret.kind == "binary" and (secret.size or 20) < 16:
                raise SessionError(
                    f"{where}: the OTP secret {ref.secret!r} must be at least 16 bytes"
                )
            continue
        try:
            key = base32_decode(value)
        except ValueError:
            raise SessionError(
                f"{where}: one_time_password_shared_secret is not RFC 4648 base32"
            ) from None
        if len(key) < 16:
            raise SessionError(
                f"{where}: one_time_password_shared_secret must carry at least 128 bits"
            )


def base32_decode(text: str) -> bytes:
    t = text.strip().replace(" ", "").upper()
    try:
        return base64.b32decode(t + "=" * (-len(t) % 8))
    except (binascii.Error, ValueError):
        raise ValueError("not base32") from None


def imports_are_well_formed(doc: SessionDocument) -> None:
    from cloister.session import _sharing

    for s in doc.secrets:
        for target in s.export:
            _sharing.resolve(doc.name, target.session or target.namespace or "")
        if s.import_ is not None and _sharing.resolve(doc.name, s.import_.session) == doc.name:
            raise SessionError(f"secret {s.name!r} imports from its own session")
        if s.export_public and s.kind in ("private-key", "binary", "ascii") and s.value is None:
            # Publishing a generated secret to the world is almost always a mistake; SCONE
            # allows it, so it loads, but only for values someone chose on purpose.
            raise SessionError(
                f"secret {s.name!r}: export_public publishes the value to anyone; a generated "
                f"{s.kind} published like that is refused (give an explicit value)"
            )
        if s.export_public and s.kind == "x509" and s.private_key is None and s.value is None:
            raise SessionError(
                f"secret {s.name!r}: a certificate bound to each workload's key cannot be "
                "published; export_public applies to stored certificates (give private_key)"
            )


# --- encrypted volumes and the mesh --------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def volumes_are_defined(doc: SessionDocument) -> None:
    _unique("volume(s)", (v.name for v in doc.volumes))
    defined = {v.name for v in doc.volumes}
    for image in doc.images:
        _unique(f"image {image.name!r} volume(s)", (v.name for v in image.volumes))
        _unique(f"image {image.name!r} volume path(s)", (v.path for v in image.volumes))
        for v in image.volumes:
            if v.name not in defined:
                raise SessionError(
                    f"image {image.name!r} mounts volume {v.name!r}, which is not defined in "
                    "volumes"
                )
        paths = sorted(v.path for v in image.volumes)
        for outer, inner in itertools.pairwise(paths):
            if inner.startswith(outer + "/"):
                raise SessionError(
                    f"image {image.name!r}: volume path {inner} lies inside volume path {outer}"
                )


def volume_imports_are_well_formed(doc: SessionDocument) -> None:
    from cloister.session import _sharing

    for v in doc.volumes:
        for target in v.export:
            _sharing.resolve(doc.name, target.session or target.namespace or "")
        if v.import_ is not None and _sharing.resolve(doc.name, v.import_.session) == doc.name:
            raise SessionError(f"volume {v.name!r} imports from its own session")


def _peer_is_known(doc: SessionDocument, name: str, where: str) -> None:
    services = {s.name for s in doc.services}
    service, dot, session = name.partition(".")
    if not dot:
        if name not in services:
            raise SessionError(
                f"{where} names service {name!r}, which this session does not define (write "
                "'service.session' for another session's service)"
            )
        return
    if not _DNS_LABEL.match(service) or not all(_DNS_LABEL.match(p) for p in session.split(".")):
        raise SessionError(f"{where}: {name!r} is not 'service.session' in lower-case DNS labels")


def mesh_names_resolve(doc: SessionDocument) -> None:
    meshed = [s for s in doc.services if s.mesh is not None]
    if not meshed:
        return
    # The mesh names services as DNS labels (``<service>.<session>``, cloister.mesh.identity).
    for part in doc.name.split("/"):
        if not _DNS_LABEL.match(part):
            raise SessionError(
                f"session name {doc.name!r}: the mesh needs every part to be a lower-case DNS "
                "label (letters, digits, '-')"
            )
    own = doc.name.replace("/", ".")
    for svc in meshed:
        assert svc.mesh is not None
        where = f"service {svc.name!r} mesh"
        if not _DNS_LABEL.match(svc.name):
            raise SessionError(f"{where}: a meshed service's name must be a lower-case DNS label")
        if not svc.mesh.ingress and not svc.mesh.egress:
            raise SessionError(f"{where} has neither ingress nor egress rules")
        for i, rule in enumerate(svc.mesh.ingress):
            for name in rule.allow_from:
                _peer_is_known(doc, name, f"{where}.ingress[{i}].allow_from")
        for i, egress in enumerate(svc.mesh.egress):
            _peer_is_known(doc, egress.service, f"{where}.egress[{i}].service")
        ports = [r.port for r in svc.mesh.ingress] + [r.port for r in svc.mesh.egress]
        dupes = sorted({p for p in ports if ports.count(p) > 1})
        if dupes:
            raise SessionError(f"{where}: port(s) {dupes} used by more than one rule")
        for name in svc.mesh.dns:
            # An extra name that reads as another service's identity would let this service
            # pass as that one to DNS-only checks (docs/mesh.md, "Identity convention").
            label, _, rest = name.lower().partition(".")
            if rest == own and label != svc.name:
                raise SessionError(f"{where}.dns: {name!r} is the identity of service {label!r}")


def mesh_ca_exists(doc: SessionDocument) -> None:
    kinds = secret_kinds(doc)
    cas = [n for n, k in kinds.items() if k == "x509-ca"]
    for svc in doc.services:
        if svc.mesh is None:
            continue
        where = f"service {svc.name!r} mesh"
        if svc.mesh.ca is not None:
            if kinds.get(svc.mesh.ca) not in ("x509-ca", template.IMPORTED):
                raise SessionError(
                    f"{where}.ca names {svc.mesh.ca!r}, which is not an x509-ca secret of this "
                    "session"
                )
        elif len(cas) != 1:
            raise SessionError(
                f"{where}: the session has {len(cas)} x509-ca secrets; name the mesh's CA "
                "in mesh.ca"
            )


ALL: tuple[Callable[[SessionDocument], None], ...] = (
    unique_names,
    images_exist,
    issuers_exist,
    placeholders_resolve,
    services_are_measured,
    simulation_is_tolerated,
    access_policy_is_valid,
    no_attestation_is_tolerated,
    one_time_passwords_are_strong,
    host_arguments_are_distinct,
    imports_are_well_formed,
    volumes_are_defined,
    volume_imports_are_well_formed,
    mesh_names_resolve,
    mesh_ca_exists,
)


def check(doc: SessionDocument) -> None:
    for rule in ALL:
        rule(doc)
