"""Development-only helpers (local Redis, SeaweedFS and service processes for tests, benchmarks and the
demo). Not shipped: ``pyproject.toml``'s package list leaves this folder out, and nothing in ``editserve/``,
``service/`` or ``worker/`` imports it."""
