"""A secured local Apache Kafka for tests and demos: SASL_SSL with SCRAM-SHA-512, TLS from a
throw-away CA made at start, and the KRaft StandardAuthorizer with ACLs on.

Production clusters authenticate and authorize every client; this broker lets tests prove the
worker runs with exactly its least-privilege ACLs, and fails clearly without one of them.

The broker has two client listeners: PLAINTEXT, whose anonymous principal is a super user (the
inter-broker and controller connections, and the tests' own admin, producer and read_committed
reader, which must see everything regardless of the worker's ACLs), and SASL_SSL, where the
worker authenticates as an ordinary SCRAM user and gets only the ACLs granted to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import trustme
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from cryptography.hazmat.primitives import serialization

from devkit.apache_kafka import LocalKafka
from devkit.ports import free_port

#: The one SASL mechanism the secured listener offers: salted, and the password never crosses
#: the wire (unlike PLAIN), so it is what production clusters without Kerberos/OAuth use.
MECHANISM = "SCRAM-SHA-512"
#: SCRAM's iteration count; 4096 is the minimum Kafka accepts and keeps the test's logins fast.
SCRAM_ITERATIONS = 4096
SCRAM_LOGIN_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
ADMIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throw-away CA and the broker's certificate signed by it."""

    ca: Path
    #: PKCS#8 key and certificate chain, inline in server.properties (Kafka's PEM key store).
    server_key_pem: str
    server_chain_pem: str


def make_tls(directory: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A new CA and a server certificate for `hosts`; only the CA is written to a file, for clients."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="classify-worker test CA")
    leaf = ca.issue_cert(*hosts)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    # Kafka's PEM key store reads PKCS#8 only, not the traditional EC/RSA format trustme writes
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    chain = "".join(blob.bytes().decode() for blob in leaf.cert_chain_pems)
    return TlsFiles(ca=ca_file, server_key_pem=pkcs8, server_chain_pem=chain)


def untrusted_ca(directory: Path) -> Path:
    """A CA file that did not sign the broker's certificate: a client trusting only it must refuse."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "other-ca.pem"
    trustme.CA(organization_name="not the broker's CA").cert_pem.write_to_path(str(path))
    return path


def _inline(pem: str) -> str:
    """A PEM block as one server.properties value (java.util.Properties reads `\\n` as a newline)."""
    return pem.strip().replace("\n", "\\n")


def secured_properties(tls: TlsFiles, listener: str = "SASL_SSL") -> dict[str, str]:
    """Server properties for a SASL_SSL listener named `listener` with SCRAM and ACLs."""
    prefix = f"listener.name.{listener.lower()}"
    return {
        "sasl.enabled.mechanisms": MECHANISM,
        f"{prefix}.{MECHANISM.lower()}.sasl.jaas.config": f"{SCRAM_LOGIN_MODULE} required;",
        f"{prefix}.ssl.keystore.type": "PEM",
        f"{prefix}.ssl.keystore.key": _inline(tls.server_key_pem),
        f"{prefix}.ssl.keystore.certificate.chain": _inline(tls.server_chain_pem),
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        # the PLAINTEXT listener (broker, controller, test harness) is anonymous; everyone else
        # gets exactly their ACLs
        "super.users": "User:ANONYMOUS;User:admin",
        "allow.everyone.if.no.acl.found": "false",
    }


class SecuredKafka:
    """`with SecuredKafka(tmp) as k:` a LocalKafka with a SASL_SSL listener, SCRAM users and ACLs.

    `k.plain` is the super-user PLAINTEXT bootstrap, `k.secure` the SASL_SSL one; `k.client_config`
    gives the librdkafka settings a SCRAM user needs there."""

    def __init__(self, directory: Path) -> None:
        self.tls = make_tls(directory / "tls")
        self.secure_port = free_port()
        self.kafka = LocalKafka(
            data_dir=directory / "kafka",
            properties=secured_properties(self.tls),
            listeners={"SASL_SSL": (self.secure_port, "SASL_SSL")},
        )
        self.secure = f"127.0.0.1:{self.secure_port}"

    @property
    def plain(self) -> str:
        return self.kafka.bootstrap

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.plain})

    def add_user(self, name: str, password: str) -> None:
        """Create or replace the SCRAM credential of `name`."""
        upsert = UserScramCredentialUpsertion(
            name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS), password.encode()
        )
        admin = self.admin()  # must outlive its futures
        for future in admin.alter_user_scram_credentials([upsert]).values():
            future.result(ADMIN_TIMEOUT_S)

    def client_config(self, user: str, password: str | None = None) -> dict[str, str]:
        """librdkafka settings for `user` on the SASL_SSL listener (password left out when None)."""
        return {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM,
            "sasl.username": user,
            "ssl.ca.location": str(self.tls.ca),
            **({"sasl.password": password} if password is not None else {}),
        }

    def __enter__(self) -> SecuredKafka:
        self.kafka.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kafka.close()


# -- ACLs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acl:
    """One ALLOW entry for a principal; `name` is a prefix when `prefixed`."""

    operation: str  # READ, WRITE, DESCRIBE, CREATE
    resource: str  # TOPIC, GROUP, TRANSACTIONAL_ID
    name: str
    prefixed: bool = False

    def __str__(self) -> str:
        pattern = "prefix " if self.prefixed else ""
        return f"{self.operation} on {self.resource.lower().replace('_', '-')} {pattern}{self.name}"

    def binding(self, principal: str) -> AclBinding:
        return AclBinding(*self._fields(principal))

    @property
    def key(self) -> tuple[str, str, str, str]:
        """As `acls_of` describes it: (operation, resource type, name, pattern)."""
        return (self.operation, self.resource, self.name, "PREFIXED" if self.prefixed else "LITERAL")

    def filter(self, principal: str) -> AclBindingFilter:
        """Matches exactly this entry, to delete it."""
        return AclBindingFilter(*self._fields(principal))

    def _fields(
        self, principal: str
    ) -> tuple[ResourceType, str, ResourcePatternType, str, str, AclOperation, AclPermissionType]:
        pattern = ResourcePatternType.PREFIXED if self.prefixed else ResourcePatternType.LITERAL
        resource = ResourceType[self.resource]
        return (resource, self.name, pattern, principal, "*", AclOperation[self.operation], AclPermissionType.ALLOW)


def worker_acls(
    input_topic: str, group: str, output_prefix: str, dlq: str, transactional_prefix: str, auto_create: bool = False
) -> list[Acl]:
    """The least-privilege set a worker principal needs (docs/security.md lists the same set).

    Kafka lets READ and WRITE imply DESCRIBE; the DESCRIBE entries are listed anyway, as
    `kafka-acls --consumer/--producer` grant them, so the set reads the same in both places."""
    acls = [
        Acl("READ", "TOPIC", input_topic),
        Acl("DESCRIBE", "TOPIC", input_topic),
        Acl("READ", "GROUP", group),
        Acl("WRITE", "TOPIC", output_prefix, prefixed=True),
        Acl("DESCRIBE", "TOPIC", output_prefix, prefixed=True),
        Acl("WRITE", "TOPIC", dlq),
        Acl("DESCRIBE", "TOPIC", dlq),
        Acl("WRITE", "TRANSACTIONAL_ID", transactional_prefix, prefixed=True),
        Acl("DESCRIBE", "TRANSACTIONAL_ID", transactional_prefix, prefixed=True),
    ]
    if auto_create:  # on the topics it creates, rather than on the whole cluster
        acls += [
            Acl("CREATE", "TOPIC", input_topic),
            Acl("CREATE", "TOPIC", output_prefix, prefixed=True),
            Acl("CREATE", "TOPIC", dlq),
        ]
    return acls


def grant(admin: AdminClient, principal: str, acls: Iterable[Acl]) -> None:
    wanted = list(acls)
    for future in admin.create_acls([a.binding(principal) for a in wanted]).values():
        future.result(ADMIN_TIMEOUT_S)
    _settle(admin, principal, lambda held: all(a.key in held for a in wanted))


def revoke(admin: AdminClient, principal: str, acls: Iterable[Acl]) -> None:
    gone = list(acls)
    for future in admin.delete_acls([a.filter(principal) for a in gone]).values():
        future.result(ADMIN_TIMEOUT_S)
    _settle(admin, principal, lambda held: not any(a.key in held for a in gone))


def acls_of(admin: AdminClient, principal: str) -> set[tuple[str, str, str, str]]:
    """(operation, resource type, name, pattern) of every ACL `principal` holds now."""
    flt = AclBindingFilter(
        ResourceType.ANY,
        None,  # type: ignore[arg-type]  # None matches any name; the stubs say str
        ResourcePatternType.ANY,
        principal,
        None,  # type: ignore[arg-type]  # any host
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    found = admin.describe_acls(flt).result(ADMIN_TIMEOUT_S)
    return {(b.operation.name, b.restype.name, b.name, b.resource_pattern_type.name) for b in found}


#: How long an ACL change may take to reach the authorizer on a loaded machine.
SETTLE_TIMEOUT_S = 30.0


def _settle(admin: AdminClient, principal: str, done: Callable[[set[tuple[str, str, str, str]]], bool]) -> None:
    """The StandardAuthorizer applies ACL records from the metadata log a moment after the
    admin call returns (seconds on a loaded machine): wait until it describes the change."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while not done(acls_of(admin, principal)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ACL change for {principal} not applied within {SETTLE_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
