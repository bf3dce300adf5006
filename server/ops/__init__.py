"""Operations: model registry and reload, metrics, security, request log, and the server config."""
