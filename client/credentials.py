"""How the client reaches a protected server: bearer-token metadata, TLS / mutual TLS channel credentials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class Credentials:
    """`token`: sent as `authorization: Bearer <token>`; `tls_ca`: trust this CA (PEM) and use TLS;
    `tls_cert` + `tls_key`: present this client certificate (mutual TLS). All optional."""

    token: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls: bool = False  # TLS with the system's trusted CAs when no tls_ca is given

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key (--tls-cert/--tls-key) must be given together")

    @property
    def secure(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            try:
                return None if path is None else Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read {str(path)!r}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca),
                                            private_key=read(self.tls_key),
                                            certificate_chain=read(self.tls_cert))


def open_channel(target: str, credentials: Credentials | None, *, aio: bool = False) -> Any:
    """A grpc (or grpc.aio) channel to `target`: TLS when the credentials ask for it, else plaintext."""
    module: Any = grpc.aio if aio else grpc
    if credentials is not None and credentials.secure:
        return module.secure_channel(target, credentials.channel_credentials())
    return module.insecure_channel(target)
